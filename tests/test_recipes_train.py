"""Every shipped recipe loads, validates and trains 2 steps on tiny shards (timm-style: the whole registry).

Each recipe runs as shipped - its plugins, their settings, its encoder and decoder - with
only the data pointed at tiny shards, a batch of 4 and 2 steps. 96-px (STL-10) recipes
run at 32 px (a patch-14 ViT at 28) so that ResNet-50 encoders and decoders fit a CPU test budget; their
96-px shapes are covered by tests/test_backbones.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from framework.engine import train
from framework.logging import read_metrics
from framework.recipe.loading import apply_overrides, load_raw
from framework.startup import validate
from framework.testing import tiny_shards
from tests.helpers import small_crops, small_size

pytestmark = pytest.mark.slow  # the engine trains every recipe; the fast check: tests/test_model_forward.py
RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("[!_]*.yaml"))


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_shards")
    return {(28, 1): tiny_shards(root), (32, 3): tiny_shards(root, size=32, channels=3)}


def run_recipe(path: Path, tmp_path: Path, shard_sets: dict, steps: int) -> None:
    """Train the shipped recipe `path` for `steps` on the tiny shards, and check its log."""
    raw = load_raw(path)
    size = small_size(raw)
    shards = shard_sets[(min(raw["data"]["image_size"], 32), raw["data"]["channels"])]
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"data.train={shards['train']}",
        f"data.image_size={size}",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "data.resize=null",
        f"eval.train={shards['train']}",
        f"eval.test={shards['test']}",
        f"train.steps={steps}",
        "log.every=1",
        "checkpoint.every=1000",
        "optim.warmup_steps=0",
        *small_crops(raw, size),
    ]
    recipe, hooks = validate(apply_overrides(raw, overrides))
    out = train(recipe, hooks)
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    terms = [k for k in records[-1] if k.split(".")[0] in recipe.plugins]
    assert terms, "every recipe logs its plugins' terms"
    assert all(math.isfinite(records[-1][k]) for k in terms + ["loss"])


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_two_steps(path, tmp_path, shard_sets):
    run_recipe(path, tmp_path, shard_sets, steps=2)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_a_step_under_fsdp2(path, tmp_path, shard_sets, monkeypatch):
    """Under FSDP2 (one process: a one-rank group), with the checkpoint of its shards and its whole model."""
    from framework import checkpoint
    from framework.distributed import FSDP_LAUNCHED

    for name, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", FSDP_LAUNCHED: "false"}.items():
        monkeypatch.setenv(name, value)  # what `accelerate launch --use_fsdp --fsdp_version 2` sets; restored
    run_recipe(path, tmp_path, shard_sets, steps=1)
    saved = checkpoint.complete_checkpoints(tmp_path / "run")[-1]
    assert (saved / checkpoint.SHARDED_FOLDER).is_dir()
    assert json.loads((saved / checkpoint.STATE_FILE).read_text())["fsdp"]
