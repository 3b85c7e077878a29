"""The training loop on real Fashion-MNIST shards: steps, logging, checkpoints, resume, guards."""

from __future__ import annotations

import json
import math

import pytest
import torch

from framework import checkpoint, hookimpl
from framework.engine import TrainingError
from framework.logging import read_metrics
from framework.optim import lr_factor
from framework.recipe import TrainConfig
from framework.testing import run_steps, tiny_recipe


def test_a_few_steps_on_real_shards_log_every_term(tmp_path, fmnist_shards):
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards), steps=3)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for rec in records:
        assert {"kl.recon", "kl.kl", "loss", "lr", "images/s"} <= set(rec)
        assert math.isfinite(rec["loss"]) and rec["images/s"] > 0
    assert (out / "recipe.yaml").is_file()
    assert list((out / "augssl").glob("**/events.out.tfevents.*")), "TensorBoard scalars through Accelerate"


def test_checkpoint_and_resume_continue_the_step_count(tmp_path, fmnist_shards):
    recipe = tiny_recipe(tmp_path, fmnist_shards, train={"checkpoint_every": 2})
    out = run_steps(recipe, steps=4)
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step_00000002", "step_00000004"]
    state = json.loads((out / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and (out / "checkpoints" / "step_00000004" / "recipe.yaml").is_file()
    data = json.loads((out / "checkpoints" / "step_00000004" / "data_rank0.json").read_text())
    assert data["workers"]["0"][1] == 4 * 8, "the stream position: 4 batches of 8 samples"

    run_steps(recipe, steps=6)  # train.resume=auto is the default
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == [1, 2, 3, 4, 5, 6], "the resumed run continues at step 5"
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step_00000004", "step_00000006"]


def test_resume_fresh_starts_over_and_keeps_the_old_run_aside(tmp_path, fmnist_shards):
    """(`train.resume=never` into a folder with checkpoints refuses: tests/test_faults_checkpoints.py.)"""
    recipe = tiny_recipe(tmp_path, fmnist_shards, train={"checkpoint_every": 2})
    out = run_steps(recipe, steps=2)
    run_steps(recipe, steps=2, overrides=["train.resume=fresh"])
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert [r["step"] for r in read_metrics(next((out / "previous").iterdir()))] == [1, 2]


def test_an_unfinished_checkpoint_is_never_loaded(tmp_path, fmnist_shards):
    recipe = tiny_recipe(tmp_path, fmnist_shards, train={"checkpoint_every": 2})
    out = run_steps(recipe, steps=2)
    partial = out / "checkpoints" / "step_00000004.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"garbage from a killed save")
    assert checkpoint.find_resume(out, "auto").name == "step_00000002"


class NaNAfter:
    """Returns a non-finite term from step `start` on."""

    def __init__(self, start: int) -> None:
        self.start = start

    @hookimpl
    def regularize(self, ctx):
        return {"boom": torch.tensor(float("nan") if ctx.step >= self.start else 0.0)}


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, fmnist_shards):
    recipe = tiny_recipe(tmp_path, fmnist_shards, train={"checkpoint_every": 2, "max_bad_steps": 3})
    with pytest.raises(
        TrainingError, match=r"3 non-finite losses in a row at step 2; last good checkpoint: .*step_00000002"
    ):
        run_steps(recipe, steps=10, extra_plugins={"nan": NaNAfter(start=2)})
    out = tmp_path / "run"
    assert checkpoint.find_resume(out, "auto").name == "step_00000002", "the last good checkpoint is kept"


def test_lr_schedule():
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, schedule="cosine")
    assert [lr_factor(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cfg) == pytest.approx(1.0) and lr_factor(10, cfg) == pytest.approx(0.0)
    assert lr_factor(6, cfg) == pytest.approx(0.5)
    assert lr_factor(7, TrainConfig(steps=10, lr=1.0)) == 1.0
