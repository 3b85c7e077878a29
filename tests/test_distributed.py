"""Real multi-process runs on CPU (gloo) under `accelerate launch`."""

from __future__ import annotations

import pytest
import torch

from framework.logging import read_metrics
from framework.testing import tiny_recipe, write_recipe
from tests.helpers import accelerate_launch, ddp_args


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
