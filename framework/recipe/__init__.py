"""YAML recipes: load, inherit (`extends:`), override from the command line, validate.

A recipe is data: it picks plugins and their settings; behaviour lives in plugins.
Precedence: CLI overrides > recipe > the files it extends > the defaults in `schema`.
Every problem is a `RecipeError` with a one-line message that names the key path,
raised before any process group, output folder or data worker exists.

`schema` holds the sections and `Recipe`; `loading` reads, merges and validates files.
Code inside `framework/` imports from those submodules; this package re-exports both.
"""

from framework.recipe.loading import (
    RecipeError,
    apply_overrides,
    deep_merge,
    load_raw,
    load_recipe,
    validate,
    write_resolved,
)
from framework.recipe.schema import (
    DataConfig,
    DistributedConfig,
    EvalConfig,
    Recipe,
    TrainConfig,
)

__all__ = [
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "Recipe",
    "RecipeError",
    "TrainConfig",
    "apply_overrides",
    "deep_merge",
    "load_raw",
    "load_recipe",
    "validate",
    "write_resolved",
]
