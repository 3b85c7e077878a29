"""FSDP2 (`accelerate launch --config_file launch/accelerate/fsdp2.yaml`), checked on CPU processes (gloo): the
engine shards the model itself (`framework.sharding`), so these runs take the code path GPUs take.

Gradients of 2 processes equal 1 process's on the global batch (ResNet, ViT, BYOL); FSDP2 and DDP hold the
same weights after the same steps (an EMA target, LARS, a probe's own lr group, one rank's NaN skipped on
both); checkpoints resume bit-exactly at the same world size and at another one (DCP reshards); SIGTERM
stops, checkpoints and resumes; eval and export read the consolidated weights; a damaged shard is skipped;
what FSDP2 cannot run is refused in one line.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework import checkpoint
from framework.distributed import FSDPOptions, activation_checkpointing, check_launch, fsdp_options
from framework.logging import read_metrics
from framework.recipe.schema import DataConfig, DistributedConfig, OptimConfig
from framework.testing import CONV28, free_port, tiny_recipe, tiny_shards, write_recipe
from tests.helpers import (
    ENV,
    LAUNCH,
    ONE_NODE,
    ROOT,
    augssl,
    ddp_args,
    final_weights,
    logged_steps,
    newest_step,
    one_line,
    wait_for_step,
)

FSDP2_CONFIG = ROOT / "launch" / "accelerate" / "fsdp2.yaml"
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # what `accelerate launch --use_fsdp` sets
VIT = {
    "encoder": "timm/vit_tiny_patch16_224",
    "timm_kwargs": {"patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 2},
}
RESNET = {"encoder": "resnet18", "stem": "cifar"}
HEAD = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}
DINOV2 = {  # DINO (2 x 28 px + 2 x 14 px crops, a frozen last layer) + iBOT (every global crop masked) + KoLeo
    "backbones": {**VIT, "timm_kwargs": {**VIT["timm_kwargs"], "dynamic_img_size": True}},
    "dino": {**HEAD, "crops": {"local": {"count": 2, "size": 14}}, "freeze_last_layer_steps": 1},
    "ibot": {**HEAD, "masks": {"probability": 1.0}, "centering": "sinkhorn"},
    "koleo": {},
}


def fsdp2_args(processes: int) -> list[str]:
    """`accelerate launch` arguments of an FSDP2 run of `processes` CPU processes on one machine, on a free port."""
    port = str(free_port())
    return [
        "--config_file",
        str(FSDP2_CONFIG),
        "--num_processes",
        str(processes),
        *ONE_NODE,
        "--main_process_port",
        port,
    ]


def train(args: list[str], recipe: Path, *overrides: str, env: dict[str, str] | None = None, script: str = ""):
    """`accelerate launch ARGS tests/dist_train.py RECIPE OVERRIDES` (one rank's NaN by `AUGSSL_TEST_NAN`), or
    another `script` (e.g. launch/train.py: a run `augssl eval` can read, its recipe naming no test plugin)."""
    cmd = [*LAUNCH, *args, script or str(ROOT / "tests" / "dist_train.py"), str(recipe), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**ENV, **(env or {})}, cwd=ROOT)


def trained(args: list[str], recipe: Path, *overrides: str, env: dict[str, str] | None = None, script: str = "") -> str:
    proc = train(args, recipe, *overrides, env=env, script=script)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The names whose tensors differ (the key sets must agree)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return [k for k in a if not torch.equal(a[k], b[k])]


# ---------------------------------------------------------------------------
# Correctness: FSDP2 computes what one process and DDP compute
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["resnet", "vit", "byol"])
def test_fsdp2_gradients_on_two_processes_equal_one_process_on_the_global_batch(tmp_path, method):
    """tests/fsdp_grads.py: float64, GroupNorm for BatchNorm; every parameter sharded on 2 ranks."""
    one = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fsdp_grads.py"), str(tmp_path / "one"), method],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=ROOT,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [*LAUNCH, *fsdp2_args(2), str(ROOT / "tests" / "fsdp_grads.py"), str(tmp_path / "two"), method]
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    ref, got = torch.load(tmp_path / "one" / "grads.pt"), torch.load(tmp_path / "two" / "grads.pt")
    assert ref["world_size"] == 1 and not ref["sharded"] and got["world_size"] == 2
    assert sorted(got["sharded"]) == sorted(ref["grads"]), "every parameter is sharded"
    for name, grad in ref["grads"].items():
        assert grad.abs().sum() > 0, f"{name}: no gradient"
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-10, atol=1e-12, msg=f"{name} differs")


LARS = {"optimizer": "lars", "lr": 0.3, "weight_decay": 1e-4, "exclude_norm_bias_from_wd": True}


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, plugins, sections, nan",
    [
        ("vit_byol", {"backbones": VIT, "byol": {"proj_hidden_dim": 64, "pred_hidden_dim": 64}}, {}, "1:1"),
        ("vit_dinov2", DINOV2, {}, "1:1"),
        (
            "resnet_lars_probe_accumulated",
            {"backbones": RESNET, "simclr": {}, "probe": {"lr": 0.5}},
            {"optim": LARS, "distributed": {"accumulation_steps": 2}},
            "",
        ),
    ],
)
def test_fsdp2_and_ddp_hold_the_same_weights(tmp_path, fmnist_shards, name, plugins, sections, nan):
    """The same recipe on 2 processes under DDP and FSDP2 gives the same weights and BatchNorm statistics.

    BYOL on a ViT, and DINOv2's three terms (the centre and Sinkhorn-Knopp all-reduced, masks, the teacher's two
    heads, a frozen last layer), 3 steps with rank 1's loss NaN at the second micro-step (skipped on both ranks):
    bit for bit, the EMA teacher included. SimCLR on a ResNet-18 with LARS and the probe's own lr group, one step
    accumulated over two micro-steps:
    to float32 rounding, as LARS' trust ratios take the whole norm of a sharded parameter (its shards' sums
    of squares, all-reduced: another summation order); three such steps drift 0.5% apart at lr 0.02, as
    BatchNorm over 8 images amplifies rounding, so LARS is compared after its first step."""
    steps = 3 if nan else 1
    recipe = write_recipe(
        tmp_path / f"{name}.yaml",
        tiny_recipe(tmp_path, fmnist_shards, plugins, train={"steps": steps}, **sections),
    )
    logs = {}
    for launch, args in (("ddp", ddp_args(2)), ("fsdp2", fsdp2_args(2))):
        logs[launch] = trained(args, recipe, f"output_dir={tmp_path / launch}", env={"AUGSSL_TEST_NAN": nan or "-1:-1"})
    assert "FSDP2 over 2 ranks" in logs["fsdp2"] and "FSDP2" not in logs["ddp"]
    ddp, fsdp2 = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp2")
    if not sections:
        assert same(ddp, fsdp2) == []
    else:
        for key, tensor in ddp.items():
            torch.testing.assert_close(fsdp2[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    for launch in ("ddp", "fsdp2"):
        records = read_metrics(tmp_path / launch)
        assert records[-1]["step"] == steps and records[-1]["skipped_steps"] == (1 if nan else 0)


@pytest.mark.slow
def test_fsdp2_trains_in_bf16_with_float32_master_weights(tmp_path, fmnist_shards):
    """The shipped config's bf16 on 2 CPU processes: the blocks compute with bf16 parameters (the first Linear,
    in a block, gives bf16), every hook runs under bf16 autocast, and the weights and checkpoints are float32."""
    check_bf16_run(tmp_path, fmnist_shards, processes=2)


@pytest.mark.gpu
def test_fsdp2_trains_in_bf16_on_one_gpu(tmp_path, fmnist_shards):
    """As on CPU, over NCCL on one GPU (a one-rank group): scripts/gpu_check.sh runs it."""
    check_bf16_run(tmp_path, fmnist_shards, processes=1)


def check_bf16_run(tmp_path: Path, shards: dict[str, str], processes: int) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, shards, {"backbones": VIT, "simclr": {}}))
    args = fsdp2_args(processes)
    args[args.index("--mixed_precision") + 1] = "bf16"
    out = trained(args, recipe, env={"AUGSSL_TEST_AUTOCAST": str(tmp_path / "ac")})
    assert "precision bf16" in out and f"FSDP2 over {processes} rank" in out
    for rank in range(processes):
        seen = json.loads((tmp_path / f"ac.rank{rank}").read_text())
        assert seen["enabled"] and seen["dtype"] == "torch.bfloat16" and seen["first_linear"] == "torch.bfloat16"
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    weights = final_weights(tmp_path / "run")
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float32}


@pytest.mark.slow
def test_the_two_node_config_on_loopback_trains_as_two_processes_of_one_node(tmp_path, fmnist_shards):
    """launch/accelerate/fsdp2_two_nodes_x8.yaml as two "machines" of one process each on 127.0.0.1 (each its
    `--machine_rank`): the same weights as `fsdp2.yaml` with 2 processes on one machine."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards, {"backbones": VIT, "simclr": {}}))
    trained(fsdp2_args(2), recipe, f"output_dir={tmp_path / 'one_node'}")
    port = str(free_port())
    nodes = [
        [
            *LAUNCH,
            "--config_file",
            str(FSDP2_CONFIG.parent / "fsdp2_two_nodes_x8.yaml"),
            *["--num_processes", "2", "--machine_rank", str(node), "--main_process_ip", "127.0.0.1"],
            *["--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no"],
            str(ROOT / "tests" / "dist_train.py"),
            str(recipe),
            f"output_dir={tmp_path / 'two_nodes'}",
        ]
        for node in (0, 1)
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        for cmd in nodes
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    assert same(final_weights(tmp_path / "one_node"), final_weights(tmp_path / "two_nodes")) == []


# ---------------------------------------------------------------------------
# Checkpoints: sharded, consolidated, resumed at any world size
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp2_checkpoints_resume_exactly_and_at_another_world_size(tmp_path, fmnist_shards):
    """A 2-process FSDP2 run checkpoints its shards (`sharded/`) and the whole model (`model.safetensors`).
    Resumed from step 2 on 2 processes it ends bit-identical to the uninterrupted run; on 1 process, then
    back on 2 (train.steps raised), DCP reshards the model and the optimizer state and the runs go on."""
    plugins = {"backbones": VIT, "byol": {"proj_hidden_dim": 64, "pred_hidden_dim": 64}}
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(tmp_path, fmnist_shards, plugins, train={"steps": 4}, checkpoint={"every": 2, "keep": 5}),
    )
    whole = tmp_path / "whole"
    trained(fsdp2_args(2), recipe, f"output_dir={whole}")
    step2 = checkpoint.complete_checkpoints(whole)[0]
    state = json.loads((step2 / checkpoint.STATE_FILE).read_text())
    assert state["fsdp"] and state["world_size"] == 2 and not state["deepspeed"]
    assert sorted(p.name for p in (step2 / checkpoint.SHARDED_FOLDER).iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert checkpoint.verify(step2) is None

    again = tmp_path / "again"
    out = trained(fsdp2_args(2), recipe, f"output_dir={again}", f"train.resume={step2}")
    assert f"resumed from {step2} at step 2" in out
    assert same(final_weights(whole), final_weights(again)) == []

    fewer = tmp_path / "fewer"
    trained(fsdp2_args(1), recipe, f"output_dir={fewer}", f"train.resume={step2}")
    assert logged_steps(fewer) == [3, 4]
    assert (
        json.loads((checkpoint.complete_checkpoints(fewer)[-1] / checkpoint.STATE_FILE).read_text())["world_size"] == 1
    )
    more = trained(fsdp2_args(2), recipe, f"output_dir={fewer}", "train.steps=6")
    assert "at step 4" in more and logged_steps(fewer) == [3, 4, 5, 6]

    refused = train(ddp_args(2), recipe, f"output_dir={tmp_path / 'ddp'}", f"train.resume={step2}")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode != 0 and any(
        "written by 2 processes of FSDP2, this launch has 2 processes without DeepSpeed or FSDP2" in line
        for line in lines
    ), refused.stderr[-2000:]


@pytest.mark.slow
def test_an_fsdp2_run_is_evaluated_exported_and_a_damaged_shard_is_skipped(tmp_path, fmnist_shards):
    """The online k-NN runs under FSDP2 with a test set split unevenly over the ranks (3 shards on 2 ranks:
    the rank out of batches encodes stand-ins while the other goes on, each encoder call being a collective);
    `augssl eval` and `augssl export` read the consolidated weights of an FSDP2 run; a checkpoint whose
    shard file was damaged fails its checksums, and `train.resume=auto` resumes from the one before it."""
    odd = tiny_shards(tmp_path / "odd", n_train=48, n_test=72)  # test: 3 shards of 24
    knn = {"train": odd["train"], "test": odd["test"], "knn_every": 1}
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(tmp_path, fmnist_shards, {"backbones": CONV28, "kl": {}}, checkpoint={"every": 1}, eval=knn),
    )
    out, script = tmp_path / "run", str(ROOT / "launch" / "train.py")
    trained(fsdp2_args(2), recipe, script=script)
    assert [r["step"] for r in read_metrics(out) if "knn.acc" in r] == [1, 2]
    exported = tmp_path / "encoder.safetensors"
    proc = augssl("export", str(out), "--out", str(exported))
    assert proc.returncode == 0, proc.stderr[-2000:]
    weights = final_weights(out)
    from safetensors.torch import load_file

    for name, tensor in load_file(exported).items():
        assert torch.equal(tensor, weights[f"plugins.backbones.encoder.{name}"]), name
    proc = augssl("eval", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]

    newest = checkpoint.complete_checkpoints(out)[-1]
    shard = newest / checkpoint.SHARDED_FOLDER / "__1_0.distcp"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    assert checkpoint.verify(newest) == f"{checkpoint.SHARDED_FOLDER}/__1_0.distcp does not match its checksum"
    resumed = trained(fsdp2_args(2), recipe, "train.steps=3", script=script)
    assert "damaged" in resumed and "resumed from" in resumed and "step_00000001" in resumed


@pytest.mark.slow
def test_sigterm_under_fsdp2_checkpoints_the_step_and_the_resumed_run_ends_bit_identical(tmp_path, fmnist_shards):
    """As under DDP (tests/test_faults_signals.py): SIGTERM to the launcher stops both ranks after the same
    step, which is checkpointed (shards and all); the resumed launch ends as an uninterrupted one."""
    runs = {}
    for run in ("whole", "stopped"):
        recipe = tiny_recipe(tmp_path / run, fmnist_shards, train={"steps": 30}, checkpoint={"every": 1000})
        runs[run] = write_recipe(tmp_path / f"{run}.yaml", recipe)

    def launch(path: Path) -> subprocess.Popen:
        cmd = [*LAUNCH, *fsdp2_args(2), str(ROOT / "tests" / "dist_train.py"), str(path)]
        return subprocess.Popen(
            cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )

    whole = launch(runs["whole"])
    assert whole.wait(timeout=600) == 0, whole.communicate()[1][-3000:]
    stopped, out = launch(runs["stopped"]), tmp_path / "stopped" / "run"
    wait_for_step(out, 3, stopped, timeout=300)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=300)
    assert "stopped by SIGTERM after step" in err, err[-3000:]
    step = newest_step(out)
    assert 3 <= step < 30 and (checkpoint.complete_checkpoints(out)[-1] / checkpoint.SHARDED_FOLDER).is_dir()
    resumed = launch(runs["stopped"])
    assert resumed.wait(timeout=600) == 0, resumed.communicate()[1][-3000:]
    assert logged_steps(out) == list(range(1, 31))
    assert same(final_weights(tmp_path / "whole" / "run"), final_weights(out)) == []


# ---------------------------------------------------------------------------
# Refusals: one line, before anything starts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, distributed, expected",
    [
        ({**FSDP_ENV, "FSDP_VERSION": "1"}, {}, "accelerate launch with FSDP version 1: augssl shards with FSDP2"),
        (FSDP_ENV, {"mixed_precision": "fp16"}, "FSDP2 with fp16: use bf16"),
    ],
)
def test_what_fsdp2_cannot_run_is_refused_in_one_line(env, distributed, expected):
    data = DataConfig(train="unused", image_size=28, channels=1, mean=[0.5], std=[0.25])
    with pytest.raises(ValueError, match=expected) as info:
        check_launch(DistributedConfig(**distributed), data, OptimConfig(lr=1e-3), env)
    assert "\n" not in str(info.value)


def test_an_fsdp1_launch_is_refused_before_anything_starts(tmp_path, fmnist_shards):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards))
    line = one_line([recipe], env={**ENV, **FSDP_ENV, "FSDP_VERSION": "1"})
    assert "FSDP version 1: augssl shards with FSDP2 (fsdp_version: 2 in the config file" in line
    assert not (tmp_path / "run").exists()


def test_cpu_offload_without_a_gpu_is_one_line_and_leaves_no_run_folder(tmp_path, fmnist_shards):
    """FSDP2 pins the offloaded shards in page-locked memory, which needs CUDA: without it, one line."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards, {"backbones": VIT, "simclr": {}}))
    line = one_line([recipe, "distributed.fsdp.cpu_offload=true"], env={**ENV, **FSDP_ENV})
    assert "distributed.fsdp.cpu_offload without a GPU: offloading parameters to the CPU needs one" in line
    assert not (tmp_path / "run").exists()


def test_the_launch_configs_say_fsdp2():
    import yaml

    for name in ("fsdp2.yaml", "fsdp2_two_nodes_x8.yaml"):
        config = yaml.safe_load((FSDP2_CONFIG.parent / name).read_text())
        assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2, name
        assert config["mixed_precision"] == "bf16"


def test_the_recipe_overrides_the_launch_configs_fsdp_fields():
    """`distributed.fsdp.*` and `distributed.activation_checkpointing` win; unset, the launch's fields decide;
    neither set: FSDP2's defaults (reshard after forward, no offload) and no checkpointing."""
    launch = {**FSDP_ENV, "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_OFFLOAD_PARAMS": "true"}
    assert fsdp_options(DistributedConfig(), FSDP_ENV) == FSDPOptions(reshard_after_forward=True, cpu_offload=False)
    assert fsdp_options(DistributedConfig(), launch) == FSDPOptions(reshard_after_forward=False, cpu_offload=True)
    recipe = DistributedConfig(fsdp={"reshard_after_forward": True, "cpu_offload": False})
    assert fsdp_options(recipe, launch) == FSDPOptions(reshard_after_forward=True, cpu_offload=False)
    checkpointing = {**FSDP_ENV, "FSDP_ACTIVATION_CHECKPOINTING": "true"}
    assert not activation_checkpointing(DistributedConfig(), FSDP_ENV)
    assert activation_checkpointing(DistributedConfig(), checkpointing)
    assert not activation_checkpointing(DistributedConfig(activation_checkpointing=False), checkpointing)


def test_the_backbones_plugin_lists_each_encoders_blocks():
    """A ViT's transformer blocks and a ResNet's four stages are the units; the conv28 net has none."""
    from plugins.backbones import encoder_blocks, resnet_encoder, timm_encoder

    vit, _ = timm_encoder("vit_tiny_patch16_224", 3, 32, {"patch_size": 8, "depth": 3}, None)
    assert encoder_blocks(vit) == list(vit.blocks) and len(encoder_blocks(vit)) == 3
    resnet = resnet_encoder("resnet18", "cifar", 3)
    assert encoder_blocks(resnet) == [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]
    convnext, _ = timm_encoder("convnext_atto", 3, 32, {}, None)
    assert encoder_blocks(convnext) == list(convnext.stages)
    assert encoder_blocks(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU())) == []
