"""YAML recipes: the sections (`schema`) and reading, inheriting, overriding and validating them (`loading`).

A recipe is data: it picks plugins and their settings; behaviour lives in plugins.
Precedence: CLI overrides > recipe > the files it extends > the defaults in `schema`.
Every problem is a `RecipeError` (`framework.recipe.loading`) with a one-line message that
names the key path, raised before any process group, output folder or data worker exists.

This package re-exports the schema only: `framework.recipe.loading` builds the plugin
manager to validate plugin sections, and the manager's own types come from the schema, so
re-exporting the loader here would make the package import itself through the manager.
"""

from framework.recipe.schema import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LogConfig,
    OptimConfig,
    PluginConfig,
    Recipe,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "LogConfig",
    "OptimConfig",
    "PluginConfig",
    "Recipe",
    "TrainConfig",
]
