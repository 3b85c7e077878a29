"""Real multi-process runs on CPU (gloo) under `accelerate launch`."""

from __future__ import annotations

import pytest
import torch

from framework.logging import read_metrics
from framework.testing import tiny_recipe, write_recipe
from tests.helpers import accelerate_launch, assert_only_frozen_kept, ddp_args


@pytest.mark.slow
def test_two_processes_train_and_hold_identical_weights(tmp_path, fmnist_shards):
    """Parameters agree exactly. (BatchNorm running statistics are rank-local under DDP, which
    broadcasts rank 0's at every forward; checkpoints hold rank 0's. `distributed.sync_batchnorm`
    syncs them on GPUs.)"""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards, train={"checkpoint_every": 2}))
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
