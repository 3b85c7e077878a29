"""Plugin `barlow`: the loss against explicit loops and torch.corrcoef, the projector, 2 real steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from framework.logging import read_metrics
from framework.model import Model
from framework.startup import validate
from framework.testing import run_steps, tiny_recipe
from plugins.blocks import barlow_twins_loss, batch_normalise

CONTRASTIVE_BACKBONE = {"encoder": "conv28", "latent_dim": None}

ROOT = Path(__file__).resolve().parents[1]
NAME = "barlow"


def barlow_by_loops(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> float:
    """Cross-correlation entry by entry: C_ij = sum_b a_bi c_bj / sqrt(sum_b a_bi^2 sum_b c_bj^2), centred."""
    a, c = (z - z.mean(0) for z in (z1.double(), z2.double()))
    n, d = a.shape
    loss = 0.0
    for i in range(d):
        for j in range(d):
            num = sum(float(a[b, i] * c[b, j]) for b in range(n))
            den = (sum(float(a[b, i]) ** 2 for b in range(n)) * sum(float(c[b, j]) ** 2 for b in range(n))) ** 0.5
            cij = num / den
            loss += (1 - cij) ** 2 if i == j else lambd * cij**2
    return loss


def barlow_by_corrcoef(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> float:
    d = z1.shape[1]
    c = torch.corrcoef(torch.cat([z1, z2], dim=1).double().T)[:d, d:]  # Pearson: cross block
    off = c - torch.diag(torch.diagonal(c))
    return float(((1 - torch.diagonal(c)) ** 2).sum() + lambd * (off**2).sum())


@pytest.mark.parametrize("lambd", [5e-3, 0.25])
def test_loss_matches_loops_and_corrcoef(lambd):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(10, 4, generator=g, dtype=torch.float64)
    z2 = 0.7 * z1 + torch.randn(10, 4, generator=g, dtype=torch.float64)
    want = barlow_by_loops(z1, z2, lambd)
    assert want == pytest.approx(barlow_by_corrcoef(z1, z2, lambd), rel=1e-10)
    assert barlow_twins_loss(z1, z2, lambd, eps=0).item() == pytest.approx(want, rel=1e-10)
    # the default eps (BatchNorm1d's 1e-5) barely moves it at unit-scale variances
    assert barlow_twins_loss(z1.float(), z2.float(), lambd).item() == pytest.approx(want, rel=1e-4)


def test_fixed_values():
    z = torch.tensor([[1.0, 2.0], [-1.0, 0.0], [0.0, -2.0], [2.0, 1.0]])
    # identical views, uncorrelated features: C = I exactly, loss 0
    u = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert barlow_twins_loss(u, u, 5e-3, eps=0).item() == pytest.approx(0.0, abs=1e-7)
    # perfectly anti-correlated views: diagonal -1 -> (1 - -1)^2 per feature
    assert barlow_twins_loss(u, -u, 5e-3, eps=0).item() == pytest.approx(8.0, rel=1e-6)
    # invariant to per-feature shift and positive scale (batch normalisation)
    shifted = z * torch.tensor([3.0, 0.5]) + torch.tensor([10.0, -4.0])
    assert barlow_twins_loss(shifted, z, 0.1).item() == pytest.approx(barlow_twins_loss(z, z, 0.1).item(), rel=1e-4)


def test_batch_normalise_is_biased_and_along_the_batch():
    z = torch.randn(32, 3) * 5 + 2
    n = batch_normalise(z, eps=0)
    torch.testing.assert_close(n.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.pow(2).mean(0), torch.ones(3))  # biased variance 1


def test_gradient_flows_to_both_views():
    z1, z2 = torch.randn(8, 3, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    barlow_twins_loss(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def _recipe(tmp_path, shards, **barlow):
    plugins = {
        "backbones": CONTRASTIVE_BACKBONE,
        "barlow": {"proj_hidden_dim": 64, "proj_output_dim": 32, **barlow},
    }
    return tiny_recipe(tmp_path, shards, plugins=plugins)


def test_config_defaults_and_projector(tmp_path, fmnist_shards):
    plugins = {"backbones": CONTRASTIVE_BACKBONE, "barlow": {}}
    cfg, _ = validate(tiny_recipe(tmp_path, fmnist_shards, plugins=plugins), check_data=False)
    assert cfg.plugins["barlow"].lambda_offdiag == 5e-3
    cfg, hooks = validate(_recipe(tmp_path, fmnist_shards), check_data=False)
    head = Model(hooks, cfg).plugins["barlow"]["projector"]  # sized by the encoder's num_features
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[6].out_features) == (256, 64, 32)
    assert {"barlow.v1", "barlow.v2"} <= set(hooks.augment(cfg))
    assert sum(p.numel() for p in head.parameters()) == 256 * 64 + 64 * 64 + 64 * 32 + (64 + 64 + 32) + 4 * 64


def test_the_official_projector_has_no_biases(tmp_path, fmnist_shards):
    """facebookresearch/barlowtwins `main.py` builds every projector Linear with bias=False: `proj_bias: false`."""
    cfg, hooks = validate(_recipe(tmp_path, fmnist_shards, proj_bias=False), check_data=False)
    head = Model(hooks, cfg).plugins["barlow"]["projector"]
    assert [m.bias for m in head if isinstance(m, nn.Linear)] == [None] * 3
    assert sum(p.numel() for p in head.parameters()) == 256 * 64 + 64 * 64 + 64 * 32 + 4 * 64  # BatchNorm's affine


def test_trains_two_steps_and_logs_loss(tmp_path, fmnist_shards):
    out = run_steps(_recipe(tmp_path, fmnist_shards), steps=2)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        # at most D (diagonal) + lambda * D(D-1) (|C_ij| <= 1): 32 + 5e-3 * 992
        assert 0 < r["barlow.loss"] <= 32 + 5e-3 * 32 * 31
        assert r["loss"] == pytest.approx(r["barlow.loss"])


def test_loss_runs_in_float32_under_autocast():
    z1, z2 = torch.randn(16, 4).bfloat16(), torch.randn(16, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = barlow_twins_loss(z1, z2, 5e-3, eps=0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(barlow_by_loops(z1.float(), z2.float(), 5e-3), rel=1e-5)
