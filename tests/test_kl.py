"""The `kl` plugin: analytic KL, likelihoods and the beta schedule (docs/methods.md#vae)."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from framework import Encoding
from framework.testing import CONV28, step_context, tiny_recipe
from plugins import kl
from plugins.blocks import StandsForELBO, bernoulli_nll, gaussian_nll, kl_standard_normal, reconstruction_nll
from plugins.kl import KLConfig, beta_at


def test_analytic_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(16, 8), torch.randn(16, 8)
    std = torch.exp(logvar / 2) + 1e-6
    expected = kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).sum(1).mean()
    assert torch.allclose(kl_standard_normal(mu, logvar), expected, atol=1e-5)
    assert kl_standard_normal(torch.zeros(4, 3), torch.zeros(4, 3)).abs() < 1e-4


def test_gaussian_and_bernoulli_likelihoods():
    x, x_hat = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert gaussian_nll(x_hat, x) == pytest.approx(0.5 * 4)
    logits, target = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5)
    assert bernoulli_nll(logits, target) == pytest.approx(4 * torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    # bernoulli targets are de-normalised to [0, 1]: x_norm = (0.75 - 0.5) / 0.25 = 1 -> 0.75
    normed = torch.ones(1, 1, 1, 1)
    got = reconstruction_nll(torch.zeros(1, 1, 1, 1), normed, "bernoulli", [0.5], [0.25])
    assert got == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-5)


def test_beta_warmup_and_cycles():
    assert beta_at(0, KLConfig(beta=4)) == 4
    warm = KLConfig(beta=2, warmup_steps=10)
    assert [beta_at(s, warm) for s in (0, 5, 10, 20)] == [0, 1, 2, 2]
    cyc = KLConfig(beta=1, warmup_steps=4, cycle_steps=8)
    assert [beta_at(s, cyc) for s in (0, 2, 4, 7, 8, 10)] == [0, 0.5, 1, 1, 0, 0.5]


def test_a_hook_unit_test_needs_only_tiny_recipe(tmp_path):
    """`step_context` takes the recipe data `tiny_recipe` returns, as docs/plugins.md shows, and gives the hook
    what a run gives it: `ctx.config` a validated `Recipe`, its sections the plugins' own config classes."""
    data = tiny_recipe(tmp_path, {"train": "none.tar", "test": "none.tar"}, plugins={"backbones": CONV28, "kl": {}})

    def encode(view: torch.Tensor) -> Encoding:
        z = view.flatten(1)
        return Encoding(h=z, mu=z, logvar=torch.zeros_like(z), z=z)

    x = torch.rand(4, 1, 28, 28)
    ctx = step_context(data, {"x": x}, encode=encode, decode=lambda enc: enc.z.view(-1, 1, 28, 28), plugin="kl")
    assert list(ctx.config.providers(StandsForELBO)) == ["kl"] and isinstance(ctx.config.plugins["kl"], KLConfig)
    terms = kl.regularize(ctx=ctx, cfg=ctx.config.plugins["kl"])
    assert set(terms) == {"recon", "kl"} and all(torch.isfinite(t) for t in terms.values())
