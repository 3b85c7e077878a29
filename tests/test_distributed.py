"""Real multi-process runs on CPU (gloo) under `accelerate launch`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from framework.logging import read_metrics
from framework.testing import tiny_recipe, write_recipe
from tests.helpers import ENV, ROOT, accelerate_launch, assert_only_frozen_kept, ddp_args


@pytest.mark.slow
def test_two_processes_train_and_hold_identical_weights(tmp_path, fmnist_shards):
    """Parameters agree exactly. (BatchNorm running statistics are rank-local under DDP, which
    broadcasts rank 0's at every forward; checkpoints hold rank 0's. `distributed.sync_batchnorm`
    syncs them on GPUs.)"""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards, checkpoint={"every": 2}))
    accelerate_launch(ddp_args(2), [str(recipe), "train.steps=3"])
    out = tmp_path / "run"
    w0, w1 = torch.load(out / "weights_rank0.pt"), torch.load(out / "weights_rank1.pt")
    assert w0.keys() == w1.keys() and len(w0) > 10
    for key in w0:
        assert torch.equal(w0[key], w1[key]), f"ranks disagree on {key}"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert (out / "checkpoints" / "step_00000002" / "data_rank1.json").is_file(), "every rank saves its stream position"


@pytest.mark.slow
def test_on_after_backward_sees_reduced_gradients_under_ddp(tmp_path, fmnist_shards):
    """`on_after_backward` sees the gradients reduced (the same on both ranks, from different data); a head
    whose gradients it drops is unchanged on every rank; the rest trains."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards))
    accelerate_launch(ddp_args(2), [str(recipe), "train.steps=2"], env={"AUGSSL_TEST_FREEZE": "1"})
    out = tmp_path / "run"
    for rank in (0, 1):
        start = torch.load(out / f"start_rank{rank}.pt")
        weights = {f"plugins.{k}": v for k, v in torch.load(out / f"weights_rank{rank}.pt").items()}
        assert_only_frozen_kept(weights, "freeze", start)
    for step in (0, 1):
        assert torch.equal(torch.load(out / f"grad_rank0_step{step}.pt"), torch.load(out / f"grad_rank1_step{step}.pt"))


# A process whose interpreter finalization aborts (as gloo's and DeepSpeed's leftovers sometimes make it do, after
# a run that succeeded): an object whose __del__ calls os.abort() when the module's globals are cleared.
FINALIZATION_ABORTS = """
import atexit, os, sys
from framework.distributed import ends_without_finalizing
class AbortsWhenFinalized:
    def __del__(self):
        os.abort()
leftover = AbortsWhenFinalized()
atexit.register(lambda: print("atexit ran", flush=True))
with ends_without_finalizing():
    print("working")
    if sys.argv[1] == "raise":
        raise RuntimeError("a failure of its own")
    if sys.argv[1] != "ok":
        raise SystemExit(int(sys.argv[1]))
"""


@pytest.mark.parametrize(("how", "status"), [("ok", 0), ("75", 75), ("raise", 1)])
def test_a_launched_process_ends_with_its_status_whatever_finalization_would_do(how, status):
    """Under a multi-process launch the block's status is the process's (0, SystemExit's, 1 with the traceback),
    after the atexit handlers and with the output flushed; the interpreter's finalization, which would abort
    (SIGABRT, the launcher failing the launch), never runs. One process keeps the ordinary exit (and aborts)."""
    run = [sys.executable, "-c", FINALIZATION_ABORTS, how]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=300, env={**ENV, "WORLD_SIZE": "2"}, cwd=ROOT)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "working\natexit ran\n"
    assert ("RuntimeError: a failure of its own" in proc.stderr) == (how == "raise")
    alone = subprocess.run(run, capture_output=True, text=True, timeout=300, env={**ENV, "WORLD_SIZE": "1"}, cwd=ROOT)
    assert alone.returncode < 0, "the attack: without the launch, finalization aborts"
