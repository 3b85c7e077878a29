"""YAML recipes: the sections (`schema`) and reading, inheriting, overriding and validating them (`loading`).

A recipe is data: it picks plugins and their settings; behaviour lives in plugins.
Precedence: CLI overrides > recipe > the files it extends > the defaults in `schema`.
Every problem is a `RecipeError` (`framework.recipe.loading`) with a one-line message that
names the key path, raised before any process group, output folder or data worker exists.

This package re-exports the schema only; the loader is `framework.recipe.loading`, and
`framework.startup` loads a recipe together with its plugin manager.
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
