"""Starting from a recipe: load and validate it (`framework.recipe.loading`), register its plugins (the
plugin manager) and check that its local shards exist.

`load_recipe` and `validate` are what the commands, the checkpoint reader and tests call; every problem
is a one-line `RecipeError` naming the key (and the file). The manager and the shard check import torch,
so they come last: a recipe whose YAML, engine sections or plugin names are wrong is refused before.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from framework.recipe.loading import RecipeError, apply_overrides, in_file, load_raw, validate_recipe
from framework.recipe.schema import DataConfig, EvalConfig, Recipe
from framework.registry import PluginError

if TYPE_CHECKING:
    from framework.manager import PluginHooks


def check_recipe_shards(data: DataConfig, evaluation: EvalConfig) -> None:
    """RecipeError naming the key (`data.train`, `eval.train`, `eval.test`) of a local shard that is missing."""
    from framework.data.shards import check_shards  # its package imports torch (the data pipeline)

    try:
        check_shards("data.train", data.train)
        for key in ("train", "test"):
            spec = getattr(evaluation, key)
            if spec is not None:
                check_shards(f"eval.{key}", spec)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


def validate(
    data: dict[str, Any], check_data: bool = True, extra_plugins: dict[str, object] | None = None
) -> tuple[Recipe, PluginHooks]:
    """Validate merged recipe data (`validate_recipe`), register its plugins and, with `check_data`, check
    its shards; returns the recipe and the registered plugins. `extra_plugins` registers plugin objects
    by name beside those the recipe names (tests and embedding applications)."""
    recipe = validate_recipe(data, extra_plugins)
    from framework.manager import PluginHooks  # imports torch: only once the recipe is valid

    try:
        hooks = PluginHooks(list(recipe.plugins), extra=extra_plugins)
    except PluginError as exc:
        raise RecipeError(f"plugins: {exc}") from None
    if check_data:
        check_recipe_shards(recipe.data, recipe.eval)
    return recipe, hooks


def load_recipe(
    path: str | Path,
    overrides: Sequence[str] = (),
    check_data: bool = True,
    extra_plugins: dict[str, object] | None = None,
) -> tuple[Recipe, PluginHooks]:
    """Load, merge, override and validate a recipe file; errors are `RecipeError` naming the file."""
    try:
        return validate(apply_overrides(load_raw(path), list(overrides)), check_data, extra_plugins)
    except RecipeError as exc:
        raise in_file(path, exc) from None
