"""The training loop on real Fashion-MNIST shards: steps, logging, checkpoints, resume, guards."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from framework import checkpoint, hookimpl
from framework.checkpoint import CheckpointError
from framework.engine import TrainingError, nonfinite_flag
from framework.logging import read_metrics
from framework.optim import lr_factor
from framework.recipe import OptimConfig
from framework.recipe.schema import MOVED
from framework.testing import CONV28, run_steps, tiny_recipe, write_recipe
from framework.types import View
from tests.helpers import DeviceBright, FlipBright, accelerate_launch, ddp_args, final_weights


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
    recipe = tiny_recipe(tmp_path, fmnist_shards, checkpoint={"every": 2})
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


def test_a_checkpoint_written_before_train_was_split_is_read_and_resumed(tmp_path, fmnist_shards):
    """A checkpoint's recipe.yaml from before the split (`train.lr`, `train.checkpoint_every`, ...) is read as
    the keys are now: `load_run` (eval, export) takes it, a resume is checked against it and continues."""
    recipe = tiny_recipe(tmp_path, fmnist_shards, checkpoint={"every": 2})
    out = run_steps(recipe, steps=2)
    (ckpt,) = checkpoint.complete_checkpoints(out)
    old = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    for before, now in MOVED.items():
        section, key = now.split(".")
        old["train"][before.removeprefix("train.")] = old[section].pop(key)
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump({k: v for k, v in old.items() if v != {}}, sort_keys=False))
    checkpoint.write_checksums(ckpt)
    _, saved, path = checkpoint.load_run(out)
    assert path == ckpt and (saved.optim.lr, saved.checkpoint.every) == (1e-3, 2)
    with pytest.raises(CheckpointError, match='was trained with optim.optimizer="adam", this recipe has "sgd"'):
        run_steps(recipe, steps=3, overrides=["optim.optimizer=sgd"])
    run_steps(recipe, steps=3)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_resume_fresh_starts_over_and_keeps_the_old_run_aside(tmp_path, fmnist_shards):
    """(`train.resume=never` into a folder with checkpoints refuses: tests/test_faults_checkpoints.py.)"""
    recipe = tiny_recipe(tmp_path, fmnist_shards, checkpoint={"every": 2})
    out = run_steps(recipe, steps=2)
    run_steps(recipe, steps=2, overrides=["train.resume=fresh"])
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert [r["step"] for r in read_metrics(next((out / "previous").iterdir()))] == [1, 2]


def test_an_unfinished_checkpoint_is_never_loaded(tmp_path, fmnist_shards):
    recipe = tiny_recipe(tmp_path, fmnist_shards, checkpoint={"every": 2})
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
    recipe = tiny_recipe(tmp_path, fmnist_shards, train={"max_bad_steps": 3}, checkpoint={"every": 2})
    with pytest.raises(
        TrainingError, match=r"3 non-finite losses in a row at step 2; last good checkpoint: .*step_00000002"
    ):
        run_steps(recipe, steps=10, extra_plugins={"nan": NaNAfter(start=2)})
    out = tmp_path / "run"
    assert checkpoint.find_resume(out, "auto").name == "step_00000002", "the last good checkpoint is kept"


class NaNGradAt:
    """At step `at` (0-based) a term that is 0 but whose gradient is NaN (d sqrt(u)/du at u = 0 is inf,
    times 0): a finite loss whose update fills the weights with NaN."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def regularize(self, ctx):
        h = ctx.encode("x").h
        return {"nan_grad": torch.sqrt((h * 0).sum()) if ctx.step == self.at else (h * 0).sum()}


def test_a_step_that_leaves_a_weight_non_finite_stops_the_run_at_the_next_vote(tmp_path, fmnist_shards):
    """No checkpoint is due: the next step's vote carries the flag, and the run stops naming the tensor
    (it used to skip 10 NaN losses of the NaN weights first, and to checkpoint them when one was due)."""
    recipe = tiny_recipe(tmp_path, fmnist_shards, checkpoint={"every": 1000})
    with pytest.raises(TrainingError, match=r"^step 2 left \S+ non-finite \(.*; last good checkpoint: None$"):
        run_steps(recipe, steps=5, extra_plugins={"nan": NaNGradAt(1)})
    assert not checkpoint.complete_checkpoints(tmp_path / "run")


def test_the_last_good_checkpoint_is_an_intact_one_whose_weights_are_finite(tmp_path, fmnist_shards):
    """step_2 is intact but holds NaN weights (as one written before augssl checked them): the run
    resumed from it skips its NaN losses and stops naming step_1, not step_2, as the last good one."""
    recipe = tiny_recipe(tmp_path, fmnist_shards, train={"max_bad_steps": 2}, checkpoint={"every": 1})
    out = run_steps(recipe, steps=2)
    one, two = checkpoint.complete_checkpoints(out)
    weights = load_file(two / checkpoint.WEIGHTS_FILE)
    nan = {k: v * math.nan if v.is_floating_point() else v for k, v in weights.items()}
    save_file(nan, two / checkpoint.WEIGHTS_FILE, {"format": "pt"})
    checkpoint.write_checksums(two)
    assert checkpoint.verify(two) is None
    with pytest.raises(TrainingError, match=rf"in a row at step 2; last good checkpoint: {re.escape(str(one))}$"):
        run_steps(recipe, steps=4)
    assert not checkpoint.finite_weights(two) and checkpoint.finite_weights(one)


def test_lr_schedule():
    cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine")
    assert [lr_factor(s, cfg, 10) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cfg, 10) == pytest.approx(1.0) and lr_factor(10, cfg, 10) == pytest.approx(0.0)
    assert lr_factor(6, cfg, 10) == pytest.approx(0.5)
    assert lr_factor(7, OptimConfig(lr=1.0), 10) == 1.0


def test_the_nonfinite_weight_check_skips_zero3_partition_padding():
    """Under ZeRO-3 a rank holds `ds_tensor`, its partition of each parameter; the last rank's is padded with
    memory DeepSpeed allocates and never writes, which may hold NaNs (a healthy ZeRO-3 run was stopped as
    'non-finite' now and then). Only the values the partition really holds count."""
    model = torch.nn.Linear(2, 3)
    last = model.weight  # 6 values over 2 ranks of 4: rank 1 holds values 4-5, then 2 of padding
    last.ds_tensor, last.ds_numel, last.ds_zero_partition_rank = torch.tensor([1.0, 2.0, math.nan, math.inf]), 6, 1
    assert nonfinite_flag(model).item() == 0.0
    last.ds_tensor[1] = math.nan  # a held value
    assert nonfinite_flag(model).item() == 1.0
    first = model.bias  # rank 0 of 2: all 2 of its values held
    first.ds_tensor, first.ds_numel, first.ds_zero_partition_rank = torch.tensor([0.0, math.inf]), 3, 0
    last.ds_tensor[1] = 2.0
    assert nonfinite_flag(model).item() == 1.0


def _bright_recipe(tmp_path, shards, **sections):
    return tiny_recipe(tmp_path, shards, plugins={"backbones": CONV28, "kl": {}, "bright": {}}, **sections)


@pytest.mark.parametrize("augment_on, calls", [("device", [1.0, 2.0]), ("auto", [0.0, 0.0])])
def test_a_view_that_splits_runs_its_step_on_the_device_where_the_recipe_says(
    tmp_path, fmnist_shards, capsys, augment_on, calls
):
    """`data.augment_on=device` on a CPU: the device step runs once a step, on the uint8 the workers
    emit; `auto` on a CPU keeps every step in the workers. The start-up line says which."""
    plugin = DeviceBright()
    recipe = _bright_recipe(tmp_path, fmnist_shards, data={"augment_on": augment_on})
    out = run_steps(recipe, steps=2, extra_plugins={"bright": plugin})
    assert [r["bright.device_calls"] for r in read_metrics(out)] == calls
    where = "on the device (1 view split)" if augment_on == "device" else "in the workers"
    assert f"eager, views: photometric steps {where}\n" in capsys.readouterr().out


class WholeBright(DeviceBright):
    """`DeviceBright` with its view whole (no `on_device`)."""

    @hookimpl
    def augment(self, config):
        return {"view": View(FlipBright())}


def test_a_split_view_changes_nothing_when_augmentation_stays_in_the_workers(tmp_path, fmnist_shards):
    """Under `data.augment_on=workers` a view with `on_device` trains as the same view without it, bit for bit."""
    weights = []
    for name, plugin in (("plain", WholeBright()), ("split", DeviceBright())):
        recipe = _bright_recipe(tmp_path / name, fmnist_shards, data={"augment_on": "workers", "num_workers": 2})
        weights.append(final_weights(run_steps(recipe, steps=2, extra_plugins={"bright": plugin})))
    assert [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])] == []


def test_a_run_resumed_under_augment_on_device_ends_as_an_uninterrupted_one(tmp_path, fmnist_shards):
    """2 steps, then resumed to 4, under `data.augment_on=device`: the device steps draw what they drew in an
    uninterrupted 4-step run (seeded from the seed, the step and the micro-step), bit for bit. It changes the
    random stream: a resume may not change it."""
    outs = []
    for name, stops in (("whole", [4]), ("split", [2, 4])):
        recipe = _bright_recipe(tmp_path / name, fmnist_shards, data={"augment_on": "device"})
        for steps in stops:
            outs.append(run_steps(recipe, steps=steps, extra_plugins={"bright": DeviceBright()}))
    a, b = final_weights(outs[0]), final_weights(outs[-1])
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    with pytest.raises(CheckpointError, match='data.augment_on="device", this recipe has "workers"'):
        run_steps(recipe, steps=6, overrides=["data.augment_on=workers"], extra_plugins={"bright": DeviceBright()})


@pytest.mark.slow
def test_a_global_row_gets_the_same_device_draws_in_one_process_as_in_two(tmp_path, fmnist_shards):
    """Under `data.augment_on=device` 2 processes of batch 4 and 1 of batch 8 (gradient accumulation over 2
    micro-steps) draw the same device parameters for each row of the global batch, rank 0's rows first."""
    recipe = _bright_recipe(
        tmp_path, fmnist_shards, data={"augment_on": "device"}, distributed={"accumulation_steps": 2}
    )
    launched = write_recipe(tmp_path / "r.yaml", {**recipe, "output_dir": str(tmp_path / "two")})
    accelerate_launch(ddp_args(2), [str(launched), "data.batch_size=4"], env={"AUGSSL_TEST_BRIGHT": "1"})
    one = DeviceBright()
    run_steps(recipe, steps=2, extra_plugins={"bright": one})
    ranks = [torch.load(tmp_path / "two" / f"bright_rank{r}.pt") for r in (0, 1)]
    assert ranks[0].shape == (4, 4) and not torch.equal(ranks[0], ranks[1])
    assert torch.equal(torch.stack(one.step.factors), torch.cat(ranks, dim=1))


@pytest.mark.parametrize(("plugins", "split"), [({"simclr": {}}, 2), ({"kl": {}, "aavae": {}}, 1)])
def test_the_built_in_presets_train_with_their_photometric_steps_on_the_device(
    tmp_path, fmnist_shards, capsys, plugins, split
):
    """The presets' views split (`plugins.blocks.simclr_split_view`): under `data.augment_on=device` their
    `Photometric` runs on the (CPU) device, and a run resumed to 4 steps ends as an uninterrupted one."""
    plugins = {"backbones": CONV28, **plugins}
    straight = tiny_recipe(tmp_path / "straight", fmnist_shards, plugins=plugins, data={"augment_on": "device"})
    out = run_steps(straight, steps=4)
    assert (
        f"views: photometric steps on the device ({split} view{'s' if split > 1 else ''} split)"
        in capsys.readouterr().out
    )
    halves = tiny_recipe(tmp_path / "halves", fmnist_shards, plugins=plugins, data={"augment_on": "device"})
    run_steps(halves, steps=2)
    resumed = run_steps(halves, steps=4)
    a, b = final_weights(out), final_weights(resumed)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
