"""Checkpoints across launches: DeepSpeed runs evaluated and exported from their consolidated
weights (ZeRO-2 and ZeRO-3), resuming on another number of processes (DDP continues, DeepSpeed
stops with one line), and the learning rate of a resumed run under `optim.lr_scaling: linear`.
Real `accelerate launch` runs on CPU (gloo)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from framework import checkpoint, hookimpl
from framework.cli import main
from framework.logging import read_metrics
from framework.optim import lr_factor
from framework.recipe import OptimConfig
from framework.testing import CONV28, free_port, run_steps, tiny_recipe, write_recipe
from tests.helpers import ENV, ONE_NODE, ROOT

DUMP, TRAIN = ROOT / "tests" / "dist_dump.py", ROOT / "launch" / "train.py"
ENCODER = "plugins.backbones.encoder."
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install .[deepspeed]")


def launch(how: list[str], script, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *how,
        "--main_process_port",
        str(free_port()),
        str(script),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def ddp(processes: int) -> list[str]:
    return [*(["--multi_gpu"] if processes > 1 else []), "--num_processes", str(processes), *ONE_NODE]


def deepspeed(stage: int, processes: int) -> list[str]:
    config = ROOT / "launch" / "accelerate" / f"deepspeed_zero{stage}.yaml"
    return ["--config_file", str(config), "--num_processes", str(processes), "--mixed_precision", "no"]


def trainer_state(path) -> dict:
    return json.loads((path / checkpoint.STATE_FILE).read_text())


def check_eval_and_export(out, tmp_path, engine: dict[str, torch.Tensor]) -> None:
    """The newest checkpoint's model.safetensors is the engine's model (every parameter and buffer),
    and `augssl export` / `augssl eval` read it."""
    saved = checkpoint.complete_checkpoints(out)[-1]
    weights = load_file(checkpoint.model_weights_file(saved))
    assert weights.keys() == engine.keys() and any("running_mean" in k for k in weights), "parameters and buffers"
    assert not [k for k in engine if not torch.equal(weights[k], engine[k])], "the consolidated weights differ"
    main(["export", str(out), "--out", str(tmp_path / "encoder.safetensors")])
    exported = load_file(tmp_path / "encoder.safetensors")
    assert {ENCODER + k for k in exported} == {k for k in engine if k.startswith(ENCODER)}
    assert all(torch.equal(v, engine[ENCODER + k]) for k, v in exported.items()), "export differs from the engine"
    main(["eval", str(out), "--protocol", "fast"])
    result = json.loads((out / "eval.json").read_text())
    assert result["checkpoint"] == str(saved) and 0 < result["accuracies"]["fast"] <= 1


@pytest.mark.slow
@needs_deepspeed
def test_a_zero2_run_is_evaluated_exported_and_not_resumed_on_another_world_size(tmp_path, fmnist_shards):
    """ZeRO-2 on 2 processes: rank 0 consolidates DeepSpeed's partitions into model.safetensors. The
    same run relaunched on 1 process stops before loading anything, with one line saying what to do."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards))
    proc = launch(deepspeed(2, 2), DUMP, [str(recipe)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "run"
    saved = checkpoint.complete_checkpoints(out)[-1]
    assert (saved / "pytorch_model").is_dir(), "DeepSpeed's own checkpoint is there too (for resuming)"
    assert {k: trainer_state(saved)[k] for k in ("world_size", "deepspeed", "zero_stage")} == {
        "world_size": 2,
        "deepspeed": True,
        "zero_stage": 2,
    }
    dump = torch.load(out / "state_rank0.pt")
    check_eval_and_export(out, tmp_path, dump["state"])

    before = (out / "metrics.jsonl").read_text(), sorted(p.name for p in saved.iterdir())
    proc = launch(deepspeed(2, 1), TRAIN, [str(recipe), "train.steps=3"])
    errors = [line for line in proc.stderr.splitlines() if "augssl: error:" in line]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-4000:]
    assert errors[0].startswith(
        f"augssl: error: checkpoint {saved} was written by 2 processes of DeepSpeed "
        "ZeRO-2, this launch has 1 process of DeepSpeed ZeRO-2"
    )
    assert "relaunch with --use_deepspeed --num_processes 2 --zero_stage 2" in errors[0]
    assert "ZeRORuntimeException" not in proc.stderr, "stopped before DeepSpeed tried to load"
    assert ((out / "metrics.jsonl").read_text(), sorted(p.name for p in saved.iterdir())) == before


@pytest.mark.slow
@needs_deepspeed
def test_a_zero3_run_with_sharded_parameters_is_evaluated_and_exported(tmp_path, fmnist_shards):
    """ZeRO-3 (launch/accelerate/deepspeed_zero3.yaml) with every parameter sharded: DeepSpeed keeps
    parameters under 1e5 elements whole unless stage3_param_persistence_threshold is 0."""
    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards, distributed={"deepspeed": zero3}))
    proc = launch(deepspeed(3, 2), DUMP, [str(recipe)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "run"
    assert trainer_state(checkpoint.complete_checkpoints(out)[-1])["zero_stage"] == 3
    dump = torch.load(out / "state_rank0.pt")
    params = sum(v.numel() for k, v in dump["state"].items() if "running" not in k and "num_batches" not in k)
    assert 0 < dump["local_numel"] < params, "each rank held only a shard of the parameters"
    check_eval_and_export(out, tmp_path, dump["state"])


class FirstForward:
    """Records the model's parameters as the first step of a run sees them."""

    params: dict[str, torch.Tensor] = {}  # replaced per instance, never mutated

    @hookimpl
    def regularize(self, modules, ctx):
        self.params = self.params or {f"plugins.{k}": v.detach().clone() for k, v in modules.named_parameters()}
        return {}


@pytest.mark.slow
def test_a_ddp_run_resumes_on_one_process_where_two_left_it(tmp_path, fmnist_shards, capsys):
    """2 processes train 2 of 4 steps (cosine schedule); 1 process continues at step 2 with the saved
    model, optimizer and schedule, its data stream reseeded."""
    recipe = tiny_recipe(tmp_path, fmnist_shards, optim={"schedule": "cosine"}, checkpoint={"every": 2})
    proc = launch(ddp(2), DUMP, [str(write_recipe(tmp_path / "r.yaml", recipe)), "train.steps=2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "run"
    saved = checkpoint.complete_checkpoints(out)[-1]
    assert trainer_state(saved)["world_size"] == 2 and not trainer_state(saved)["deepspeed"]
    first = FirstForward()
    capsys.readouterr()
    run_steps(recipe, steps=4, extra_plugins={"first": first})
    assert f"resumed from {saved} at step 2" in capsys.readouterr().out
    weights = load_file(saved / "model.safetensors")
    assert first.params and all(torch.equal(v, weights[k]) for k, v in first.params.items()), "model restored"
    metrics, cfg = read_metrics(out), OptimConfig(lr=1e-3, schedule="cosine")
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert [r["lr"] for r in metrics[2:]] == pytest.approx([1e-3 * lr_factor(s, cfg, 4) for s in (3, 4)])
    final = checkpoint.complete_checkpoints(out)[-1]
    assert final.name == "step_00000004" and trainer_state(final)["world_size"] == 1
    adam = torch.load(final / "optimizer.bin", weights_only=False)["state"]
    assert adam and all(int(s["step"]) == 4 for s in adam.values()), "Adam's moments continued from step 2"
    assert torch.load(final / "scheduler.bin", weights_only=False)["last_epoch"] == 4


@pytest.mark.slow
def test_linear_lr_scaling_takes_the_new_global_batch_when_a_run_resumes_on_more_processes(tmp_path, fmnist_shards):
    """1 process (global batch 8) trains 2 steps, 2 processes (16) continue: every param group's lr
    (the probe has its own) doubles; both ranks' RNGs are reseeded alike (only rank 0's was saved)."""
    plugins = {"backbones": CONV28, "kl": {}, "probe": {"lr": 1e-4}}
    recipe = tiny_recipe(
        tmp_path, fmnist_shards, plugins=plugins, optim={"lr": 0.01, "lr_scaling": "linear"}, checkpoint={"every": 2}
    )
    out = run_steps(recipe, steps=2)
    proc = launch(ddp(2), DUMP, [str(write_recipe(tmp_path / "r.yaml", recipe)), "train.steps=4"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "augssl: lr 0.0003125 -> 0.000625 on resume (global batch 8 -> 16, optim.lr_scaling=linear)" in proc.stdout
    assert [r["lr"] for r in read_metrics(out)] == pytest.approx([0.01 * 8 / 256] * 2 + [0.01 * 16 / 256] * 2)
    groups = torch.load(checkpoint.complete_checkpoints(out)[-1] / "optimizer.bin", weights_only=False)["param_groups"]
    assert {g["plugin"]: g["lr"] for g in groups} == pytest.approx(
        {"backbones": 0.01 * 16 / 256, "probe": 1e-4 * 16 / 256}
    )
    d0, d1 = (torch.load(out / f"state_rank{r}.pt") for r in (0, 1))
    assert torch.equal(d0["rng"], d1["rng"]), "every rank reseeded alike (rank 1 had no saved RNG state)"
    assert all(
        torch.equal(v, d1["state"][k]) for k, v in d0["state"].items() if "running" not in k and "num_batches" not in k
    )


def test_a_checkpoint_is_read_only_in_the_layout_augssl_writes(tmp_path):
    """No reader for pre-release layouts: a folder without checksums.json, or whose weights are Accelerate's
    pickle (`pytorch_model.bin`) or DeepSpeed's unconsolidated partitions, is not a checkpoint augssl reads."""
    (tmp_path / checkpoint.STATE_FILE).write_text(json.dumps({"step": 1}))
    (tmp_path / "pytorch_model").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert checkpoint.verify(tmp_path) == "checksums.json is missing"
    with pytest.raises(FileNotFoundError, match=r"no model weights \(model.safetensors\)"):
        checkpoint.model_weights_file(tmp_path)


def test_which_checkpoints_a_launch_can_resume(tmp_path):
    """DDP and FSDP2 continue at any world size (DCP reshards FSDP2's shards); DeepSpeed needs its world size
    and stage; no format loads into another. A checkpoint from before FSDP2 (no "fsdp" key) is DDP's."""

    def launch_(world: int, stage: int | None = None, fsdp: bool | None = False) -> dict:
        state = {"world_size": world, "deepspeed": stage is not None, "zero_stage": stage}
        return state if fsdp is None else {**state, "fsdp": fsdp}

    resumable = [
        (launch_(2), launch_(1)),
        (launch_(1), launch_(8)),
        (launch_(2, 3), launch_(2, 3)),
        (launch_(2, fsdp=True), launch_(1, fsdp=True)),
        (launch_(1, fsdp=True), launch_(2, fsdp=True)),
        (launch_(2, fsdp=None), launch_(2)),  # written before FSDP2
    ]
    for saved, now in resumable:
        checkpoint.check_resumable(tmp_path, saved, now)
    cases = {
        (
            2,
            2,
            False,
            4,
            2,
            False,
        ): "written by 2 processes of DeepSpeed ZeRO-2, this launch has 4 processes of DeepSpeed ZeRO-2",
        (2, 2, False, 2, 3, False): "relaunch with --use_deepspeed --num_processes 2 --zero_stage 2",
        (
            2,
            None,
            False,
            2,
            2,
            False,
        ): "2 processes without DeepSpeed or FSDP2, this launch has 2 processes of DeepSpeed ZeRO-2",
        (1, 2, False, 1, None, False): "this launch has 1 process without DeepSpeed or FSDP2",
        (
            2,
            None,
            True,
            2,
            None,
            False,
        ): "written by 2 processes of FSDP2, this launch has 2 processes without DeepSpeed "
        "or FSDP2 (its model and optimizer are sharded with torch.distributed.checkpoint): relaunch with --use_fsdp",
        (2, None, False, 4, None, True): "this launch has 4 processes of FSDP2 (FSDP2 reads sharded checkpoints only): "
        "relaunch with --num_processes 4 without --use_fsdp",
        (
            2,
            3,
            False,
            2,
            None,
            True,
        ): "written by 2 processes of DeepSpeed ZeRO-3, this launch has 2 processes of FSDP2",
    }
    for (w0, s0, f0, w1, s1, f1), expected in cases.items():
        with pytest.raises(checkpoint.CheckpointError, match=re.escape(expected)) as info:
            checkpoint.check_resumable(tmp_path, launch_(w0, s0, f0), launch_(w1, s1, f1))
        assert "\n" not in str(info.value)


def test_a_checkpoint_resumes_only_where_its_views_were_augmented(tmp_path):
    """`data.augment_on: auto` resolves by device: a run that augmented on a GPU, resumed on a CPU, would
    change its random stream with the same recipe. The checkpoint records where, and a resume that differs
    is one line saying which setting continues it; a checkpoint from before it was recorded resumes."""

    def launch_(on_device: bool | None) -> dict:
        return {"world_size": 1, "deepspeed": False, "zero_stage": None, "views_on_device": on_device}

    checkpoint.check_resumable(tmp_path, launch_(True), launch_(True))
    checkpoint.check_resumable(tmp_path, launch_(None), launch_(False))  # written before it was recorded
    for was, now, setting in [(True, False, "device"), (False, True, "workers")]:
        with pytest.raises(checkpoint.CheckpointError, match=f"set data.augment_on={setting} to continue it") as info:
            checkpoint.check_resumable(tmp_path, launch_(was), launch_(now))
        assert "\n" not in str(info.value)


def test_a_restored_schedule_takes_this_launchs_base_lrs_and_keeps_its_step():
    cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine")

    def schedule(lrs: list[float]) -> torch.optim.lr_scheduler.LambdaLR:
        params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
        opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)])
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, 10))

    old = schedule([0.1, 0.01])
    for _ in range(3):
        old.optimizer.step()
        old.step()
    resumed = schedule([0.2, 0.02])
    resumed.optimizer.load_state_dict(old.optimizer.state_dict())
    resumed.load_state_dict(old.state_dict())
    assert resumed.base_lrs == [0.1, 0.01], "what a checkpoint gives back"
    assert checkpoint.rebase_lr(resumed, [0.2, 0.02]) == [0.1, 0.01]
    expected = [0.2 * lr_factor(3, cfg, 10), 0.02 * lr_factor(3, cfg, 10)]
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx(expected)
    assert resumed.get_last_lr() == pytest.approx(expected) and resumed.last_epoch == 3
    resumed.step()
    assert resumed.get_last_lr() == pytest.approx([0.2 * lr_factor(4, cfg, 10), 0.02 * lr_factor(4, cfg, 10)])
    assert checkpoint.rebase_lr(resumed, [0.2, 0.02]) is None, "unchanged: nothing to say"
