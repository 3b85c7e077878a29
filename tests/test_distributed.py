"""Real multi-process runs on CPU (gloo) under `accelerate launch`; the intra-op threads a process chooses."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from framework import distributed
from framework.distributed import choose_threads
from framework.logging import read_metrics
from framework.testing import run_steps, tiny_recipe, write_recipe
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


HERE = " on this machine"


@pytest.mark.parametrize(
    ("cores", "workers", "env", "count", "why"),
    [
        (2, 2, {}, 1, "2 cores, 2 data workers; OMP_NUM_THREADS unset"),  # the loaded 2-core machine
        (16, 1, {}, 15, "16 cores, 1 data worker; OMP_NUM_THREADS unset"),
        (1, 0, {}, 1, "1 core, 0 data workers; OMP_NUM_THREADS unset"),
        (
            112,
            8,
            {"LOCAL_WORLD_SIZE": "8"},
            6,
            "112 cores, 8 processes on this machine, 8 data workers; OMP_NUM_THREADS unset",
        ),
        (
            8,
            4,
            {"LOCAL_WORLD_SIZE": "4"},
            1,
            "8 cores, 4 processes on this machine, 4 data workers; OMP_NUM_THREADS unset",
        ),
        (64, 2, {"OMP_NUM_THREADS": "4"}, 4, "OMP_NUM_THREADS=4"),  # torch applied it (`current`)
    ],
)
def test_intra_op_threads_are_the_cores_per_process_less_the_data_workers(cores, workers, env, count, why):
    assert choose_threads(None, workers, cores, env, current=4) == (count, why)


def test_the_recipe_sets_the_intra_op_threads_over_the_environment():
    threads = choose_threads(3, workers=2, cores=64, env={"OMP_NUM_THREADS": "8", "LOCAL_WORLD_SIZE": "2"}, current=8)
    assert threads.line() == "augssl: 3 intra-op threads (distributed.intra_op_threads=3)"


def test_the_start_up_line_says_how_many_intra_op_threads_the_run_took(tmp_path, fmnist_shards, monkeypatch, capsys):
    """With OMP_NUM_THREADS unset, 4 usable cores and 1 data worker, the run takes 3 threads and says so right
    after the start-up line (torch's default would be a thread per core, the worker's included)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(distributed, "usable_cores", lambda: 4)
    seen = []  # the threads the engine sets (this test process keeps its own)
    monkeypatch.setattr(distributed.torch, "set_num_threads", seen.append)
    run_steps(tiny_recipe(tmp_path, fmnist_shards, data={"num_workers": 1}), steps=1)
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("augssl: global batch"))
    assert lines[start + 1] == "augssl: 3 intra-op threads (4 cores, 1 data worker; OMP_NUM_THREADS unset)"
    assert seen == [3]
