"""Scaling out without losing a run: DeepSpeed, exact resume after SIGKILL, DDP gradients,
two machines on loopback, learning-rate scaling. Real `accelerate launch` runs on CPU (gloo)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from framework import checkpoint
from framework.logging import read_metrics
from framework.optim import effective_lr
from framework.recipe import OptimConfig
from framework.testing import free_port, run_steps, tiny_recipe, write_recipe
from tests.helpers import ENV, LAUNCH, ROOT, accelerate_launch, ddp_args, final_weights


def run_script(script: str, args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tests" / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


@pytest.mark.slow
def test_deepspeed_zero2_trains_checkpoints_and_resumes(tmp_path, fmnist_shards):
    """ZeRO-2 on CPU, launched with the shipped config file (launch/accelerate/deepspeed_zero2.yaml)
    and 2 micro-steps of gradient accumulation per step: DeepSpeed's own checkpoint format, and
    the resumed run continues the count. (The first run on a machine JIT-builds DeepSpeed's
    shared-memory comm op, about a minute.)"""
    recipe = tiny_recipe(
        tmp_path, fmnist_shards, checkpoint={"every": 2}, distributed={"grad_clip": 1.0, "accumulation_steps": 2}
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)
    config = ROOT / "launch" / "accelerate" / "deepspeed_zero2.yaml"
    launch = ["--config_file", str(config), "--num_processes", "2", "--mixed_precision", "no", "--main_process_port"]
    proc = accelerate_launch([*launch, str(free_port())], [str(path), "train.steps=3"])
    assert "global batch 32" in proc.stdout, "8 per micro-step x 2 ranks x 2 micro-steps"
    out = tmp_path / "run"
    saved = checkpoint.complete_checkpoints(out)[-1]
    assert saved.name == "step_00000003" and (saved / "pytorch_model").is_dir(), "a DeepSpeed (ZeRO) checkpoint"
    assert json.loads((saved / "data_rank0.json").read_text())["batches"] == 6, "2 micro-batches per step"
    proc = accelerate_launch([*launch, str(free_port())], [str(path), "train.steps=5"])
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
    w0, w1 = torch.load(out / "weights_rank0.pt"), torch.load(out / "weights_rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "ZeRO-2 ranks hold the same parameters after the step"


@pytest.mark.slow
def test_a_run_killed_at_a_random_step_resumes_to_identical_weights(tmp_path, fmnist_shards):
    """SIGKILL after step k's update (before checkpoint k), restart with resume=auto: the
    weights at the end equal an uninterrupted run's, bit for bit (2 data workers)."""
    kill_at = random.randint(2, 5)
    paths = {}
    for name in ("whole", "killed"):
        recipe = tiny_recipe(
            tmp_path / name, fmnist_shards, train={"steps": 6}, checkpoint={"every": 1}, data={"num_workers": 2}
        )
        paths[name] = write_recipe(tmp_path / f"{name}.yaml", recipe)
    assert run_script("kill_train.py", [str(paths["whole"]), "0"]).returncode == 0
    killed = run_script("kill_train.py", [str(paths["killed"]), str(kill_at)])
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_script("kill_train.py", [str(paths["killed"]), "0"])
    assert resumed.returncode == 0 and f"at step {kill_at - 1}" in resumed.stdout, resumed.stderr[-2000:]
    whole, again = final_weights(tmp_path / "whole" / "run"), final_weights(tmp_path / "killed" / "run")
    assert whole.keys() == again.keys() and any("running_mean" in k for k in whole), "buffers are compared too"
    differ = [k for k in whole if not torch.equal(whole[k], again[k])]
    assert not differ, f"killed at step {kill_at}: resumed run differs in {differ[:5]}"


def test_a_kill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, fmnist_shards):
    """A save killed half-way leaves `step_N.tmp` with some of Accelerate's files, one truncated,
    and no trainer state: resume picks step N-1, trains on, and the new save replaces the debris."""
    recipe = tiny_recipe(tmp_path, fmnist_shards, checkpoint={"every": 1})
    out = run_steps(recipe, steps=3)
    previous = checkpoint.complete_checkpoints(out)[-1]
    partial = previous.with_name("step_00000004.tmp")
    shutil.copytree(previous, partial)
    (partial / checkpoint.STATE_FILE).unlink()
    weights = checkpoint.model_weights_file(partial)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert checkpoint.find_resume(out, "auto") == previous

    run_steps(recipe, steps=5)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5], "continued at step 4"
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step_00000004", "step_00000005"]
    assert not list(checkpoint.checkpoint_root(out).glob("*.tmp")), "the unfinished folder is gone"
    load_file(checkpoint.model_weights_file(checkpoint.complete_checkpoints(out)[0]))  # the rewritten step 4 loads


@pytest.mark.slow
def test_ddp_gradients_on_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """See tests/ddp_grads.py: BatchNorm -> GroupNorm (per-sample statistics), float64, shared noise."""
    one = run_script("ddp_grads.py", [str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [*LAUNCH, *ddp_args(2), str(ROOT / "tests" / "ddp_grads.py"), str(tmp_path / "two")]
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-2000:]
    ref = torch.load(tmp_path / "one" / "grads_rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"grads_rank{r}.pt") for r in (0, 1)]
    assert ref["world_size"] == 1 and ranks[0]["world_size"] == 2
    for name, grad in ref["grads"].items():
        assert grad.abs().sum() > 0, f"{name}: no gradient"
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-10, atol=1e-12, msg=f"{name} differs")


@pytest.mark.slow
def test_two_machines_on_loopback_train_and_agree(tmp_path, fmnist_shards):
    """Two `accelerate launch --num_machines 2` (machine_rank 0 and 1, one process each) on 127.0.0.1."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards))
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_machines",
                "2",
                "--num_processes",
                "2",
                "--machine_rank",
                str(node),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                str(ROOT / "tests" / "dist_train.py"),
                str(recipe),
                "train.steps=3",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=ROOT,
        )
        for node in (0, 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    out = tmp_path / "run"
    w0, w1 = torch.load(out / "weights_rank0.pt"), torch.load(out / "weights_rank1.pt")
    assert len(w0) > 10 and all(torch.equal(w0[k], w1[k]) for k in w0), "the two machines disagree"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_linear_lr_scaling_uses_the_global_batch(tmp_path, fmnist_shards):
    cfg = OptimConfig(lr=0.1, lr_scaling="linear")
    assert effective_lr(cfg, 256) == pytest.approx(0.1) and effective_lr(cfg, 64 * 8 * 2) == pytest.approx(0.4)
    assert effective_lr(OptimConfig(lr=0.1), 4096) == 0.1, "lr_scaling defaults to none"
    recipe = tiny_recipe(
        tmp_path, fmnist_shards, optim={"lr": 0.01, "lr_scaling": "linear"}, distributed={"accumulation_steps": 2}
    )
    out = run_steps(recipe, steps=2)
    assert [r["lr"] for r in read_metrics(out)] == pytest.approx([0.01 * 8 * 2 / 256] * 2), "the logged lr is effective"


def test_the_deepspeed_config_takes_stage_and_offload_from_the_launch_unless_the_recipe_sets_them(tmp_path):
    from framework.distributed import deepspeed_config
    from framework.startup import validate

    def config(deepspeed=None, **env):
        data = tiny_recipe(
            tmp_path, {"train": "x", "test": "x"}, distributed={"accumulation_steps": 4, "deepspeed": deepspeed}
        )
        recipe = validate(data, check_data=False)[0]
        env = {f"ACCELERATE_DEEPSPEED_{k}": v for k, v in env.items()}
        return deepspeed_config(recipe.distributed, recipe.data, recipe.optim, env=env)

    ds = config(ZERO_STAGE="3", OFFLOAD_OPTIMIZER_DEVICE="cpu", OFFLOAD_PARAM_DEVICE="none")
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert config()["zero_optimization"] == {"stage": 2}, "ZeRO-2 when nothing says otherwise"
    assert config({"zero_optimization": {"stage": 1}}, ZERO_STAGE="3")["zero_optimization"] == {"stage": 1}
