"""Global-batch losses: 2 real processes x batch B train exactly like 1 process x batch 2B.

SimCLR's NT-Xent (two views, or `simclr_multicrop`: its multi-positive form over four crops
of each sample; `simclr_vit`: through a timm ViT) and Barlow Twins' cross-correlation need the whole batch; all gather
with gradient through `framework.distributed.gather_with_grad`. tests/dist_equivalence.py
runs a seeded float64 MLP + the plugin's loss under DDP (gloo, CPU) in 2 processes
and here in 1 process on the full batch.

Scaling, as checked below:
- SimCLR: each rank's value is the mean over its own 2B (multi-crop: KB) anchors (against
  all 2N, KN, candidates), so the two ranks differ and their **mean** is the 1-process loss (the
  engine logs the mean over ranks).
- Barlow Twins: every rank computes the loss of the same global C, so **each** rank's
  value is the 1-process loss.
- Gradients: the gather's backward sums the W ranks' gradients (W x the gradient of the
  mean loss) and DDP averages over ranks, so the gradients every rank applies equal the
  1-process gradients.

BYOL needs no global batch, but its target (the EMA teacher) is changed outside the optimizer; a real
2-process `accelerate launch` run (tests/dist_train.py) checks the ranks' targets agree.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import accelerate_launch, ddp_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("dist_equivalence.py")
METHODS = ("simclr", "barlow", "simclr_multicrop", "simclr_vit")
WORLD = 2


def _script():
    spec = importlib.util.spec_from_file_location("dist_equivalence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        str(SCRIPT),
        str(out),
        *METHODS,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {m: [torch.load(out / f"{m}_rank{r}.pt") for r in range(WORLD)] for m in METHODS}


def _assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one_process(method, two_process_results):
    single = _script().run(method)  # no process group: the whole batch of 2B
    ranks = two_process_results[method]
    assert single["world_size"] == 1 and all(r["world_size"] == WORLD for r in ranks)
    losses = [r["loss"] for r in ranks]
    if method.startswith("simclr"):
        assert losses[0] != pytest.approx(losses[1], rel=1e-6)  # each rank: its own anchors
        assert sum(losses) / WORLD == pytest.approx(single["loss"], rel=1e-12)
    else:
        assert losses == pytest.approx([single["loss"]] * WORLD, rel=1e-12)  # every rank: the global C
    for r in ranks:
        _assert_same_grads(r["grads"], single["grads"])


@pytest.mark.parametrize("method", METHODS)
def test_half_batch_alone_differs(method):
    """The check above can fail: one process on half the batch (no gather) gives other gradients."""
    script = _script()
    full, half = script.run(method), script.run(method, rows=slice(0, script.GLOBAL_BATCH // 2))
    assert half["loss"] != pytest.approx(full["loss"], rel=1e-3)
    assert any(not torch.allclose(half["grads"][n], full["grads"][n], rtol=1e-3) for n in full["grads"])


@pytest.mark.slow
def test_byol_target_stays_identical_across_two_processes(tmp_path, fmnist_shards):
    """The whole engine under `accelerate launch` (DDP, gloo): BYOL's target (the run's EMA teacher) is
    initialised before the first step and EMA-updated on every rank; the ranks' targets must agree after every
    step (tests/dist_byol_ema.py records them right after each update), and move away from the online weights."""
    from framework.testing import tiny_recipe, write_recipe

    byol = {"proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 32}
    plugins = {"backbones": {"encoder": "conv28", "latent_dim": None}, "byol": byol}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards, plugins=plugins))
    accelerate_launch(ddp_args(WORLD), [str(recipe), "train.steps=2"], script="dist_byol_ema.py")
    ranks = [torch.load(tmp_path / "run" / f"ema_rank{r}.pt") for r in range(WORLD)]
    assert sorted(ranks[0]) == [1, 2] and ranks[0][1]["target"].numel() > 10_000
    for step in (1, 2):
        for key in ("target", "online"):
            assert torch.equal(ranks[0][step][key], ranks[1][step][key]), f"ranks disagree on the {key} at {step}"
        assert not torch.equal(ranks[0][step]["target"], ranks[0][step]["online"])  # a real EMA, not a copy
