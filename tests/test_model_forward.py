"""Every shipped recipe's plugins, built and run on one tiny batch through `Model.forward` alone: no
Accelerate, no engine, no optimizer. Each loss term is a finite scalar named `<plugin>.<term>`.

The fast counterpart of tests/test_recipes_train.py (which trains each recipe 2 steps): recipes as
shipped, the data pointed at tiny shards, 96- and 224-px recipes at 32 px (multi-crop: local crops at
16), a batch of 4.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from framework.data import batch_to_device, make_loader
from framework.engine import build_views
from framework.model import Model
from framework.recipe.loading import load_raw
from framework.startup import load_recipe
from framework.testing import tiny_shards
from tests.helpers import ROOT, small_crops, small_size

RECIPES = sorted((ROOT / "recipes").glob("[!_]*.yaml"))


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory) -> dict[str, str]:
    """8 synthetic 32-px RGB images (for the CIFAR-10 and STL-10 recipes)."""
    return tiny_shards(tmp_path_factory.mktemp("rgb"), n_train=8, n_test=8, per_shard=8, size=32, channels=3)


def tiny(path: Path, shards: dict[str, dict[str, str]], tmp_path: Path) -> list[str]:
    """The overrides that point the recipe at `path` at tiny shards, at most 32 px and a batch of 4."""
    data = load_recipe(path, check_data=False)[0].data
    spec = shards[(data.channels == 1 and "grey") or "rgb"]["train"]
    size = small_size(load_raw(path))
    return [
        f"output_dir={tmp_path / 'run'}",
        f"data.train={spec}",
        f"data.image_size={size}",
        "data.resize=null",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=0",
        *small_crops(load_raw(path), size),
    ]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_a_recipes_plugins_give_finite_scalar_terms_named_by_plugin(path, tmp_path, fmnist_shards, rgb_shards):
    recipe, hooks = load_recipe(
        path, tiny(path, {"grey": fmnist_shards, "rgb": rgb_shards}, tmp_path), check_data=False
    )
    torch.manual_seed(0)
    model = Model(hooks, recipe).train()
    views, params, labels = batch_to_device(
        next(iter(make_loader(recipe.data, build_views(recipe, hooks), epochs=1))), "cpu"
    )
    terms, _ = model(views, params, labels)
    assert terms, f"{path.name}: no loss terms"
    for name, value in terms.items():
        plugin, _, term = name.partition(".")
        assert plugin in recipe.plugins and term, f"{path.name}: term {name!r} is not <plugin>.<term>"
        assert value.dim() == 0 and math.isfinite(value.item()), f"{path.name}: {name} is not a finite scalar: {value}"
