"""The losses against independent, maintained implementations (issue 14, item 3).

Oracles:
- lightly (lightly-ai/lightly on GitHub, pinned in scripts/setup.sh): `lightly.loss.NTXentLoss`,
  `NegativeCosineSimilarity` (the criterion of lightly's BYOL example) and `BarlowTwinsLoss`.
  It is installed with `--no-deps`: these modules import only torch, torchvision, numpy, PIL and
  tqdm, which augssl already brings; its declared pytorch-lightning and hydra-core serve its
  trainer and command line, never imported here.
- torch.distributions (`Normal`, `Independent`, `kl_divergence`) for the Gaussian KLs.

Every comparison runs in float64 on random inputs (several seeds, batch sizes and widths) and must
agree to 1e-10 absolute, values and gradients (float64 agreement is about 1e-16). Where a convention
differs, the test writes the relation out instead of loosening the tolerance. The plugins' hooks are
compared too, with identity heads, so the comparison covers how each hook combines its terms and its
defaults. With AUGSSL_REQUIRE_ORACLES=1 (scripts/test.sh, hence CI) a missing lightly fails the
lightly comparisons instead of skipping them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

from framework import Encoding
from framework.testing import step_context
from plugins import barlow, byol, simclr
from plugins.barlow import BarlowConfig
from plugins.blocks import barlow_twins_loss, byol_loss, kl_gaussians, kl_standard_normal, nt_xent
from plugins.byol import BYOLConfig
from plugins.simclr import SimCLRConfig
from tests.helpers import needs_lightly

TOL = 1e-10
APART = 1e-3  # the controls: a different convention is at least this far from the oracle
SEEDS = (0, 1, 2)


def _pair(seed: int, b: int, d: int, *, noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (b, d) float64 batches whose rows are correlated (positives are closer than negatives)
    and whose norms vary over two orders of magnitude (the losses must normalise them away)."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64)
    z2 = z1 + noise * torch.randn(b, d, generator=g, dtype=torch.float64)
    scale = torch.logspace(-1, 1, b, dtype=torch.float64)[torch.randperm(b, generator=g)].unsqueeze(1)
    return z1 * scale, z2 * scale.flip(0)


def _value_and_grads(loss_fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`loss_fn(*inputs)` and its gradient with respect to every input (fresh leaves)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = loss_fn(*leaves)
    return value.detach(), list(torch.autograd.grad(value, leaves))


def _assert_same(ours, theirs, *inputs: torch.Tensor) -> float:
    """Value and gradients of `ours` and `theirs` agree to TOL; returns the largest difference."""
    v_ours, g_ours = _value_and_grads(ours, *inputs)
    v_theirs, g_theirs = _value_and_grads(theirs, *inputs)
    assert v_ours.dtype == torch.float64 and v_theirs.dtype == torch.float64
    diffs = [(v_ours - v_theirs).abs().item()] + [
        (a - b).abs().max().item() for a, b in zip(g_ours, g_theirs, strict=True)
    ]
    assert max(diffs) <= TOL, f"ours {v_ours.item()!r} vs oracle {v_theirs.item()!r}: max abs difference {max(diffs)}"
    return max(diffs)


def _ctx(views: dict[str, torch.Tensor], *, step: int = 0, steps: int = 10, teacher_modules=None):
    """A step context whose encoder and teacher are the identity: `ctx.encode(view).h` is the view itself."""
    recipe = SimpleNamespace(train=SimpleNamespace(steps=steps))
    plugin = next(name.split(".")[0] for name in views if "." in name)  # the views' plugin: its hook's context
    identity = lambda v: Encoding(h=v)  # noqa: E731
    return step_context(
        recipe, views, encode=identity, step=step, plugin=plugin, teacher=identity, teacher_modules=teacher_modules
    )


# --- SimCLR: NT-Xent ------------------------------------------------------------------


@needs_lightly
@pytest.mark.parametrize("temperature", [0.5, 0.2])
@pytest.mark.parametrize("b, d", [(2, 3), (8, 16), (64, 128)])
@pytest.mark.parametrize("seed", SEEDS)
def test_nt_xent_equals_lightly(seed, b, d, temperature):
    # Same convention: cosine / temperature, each of the 2B anchors against the other 2B - 1
    # embeddings, one positive each, cross-entropy averaged over the 2B anchors. No factor.
    from lightly.loss import NTXentLoss

    oracle = NTXentLoss(temperature=temperature)
    _assert_same(lambda a, c: nt_xent(a, c, temperature), oracle, *_pair(seed, b, d))


@needs_lightly
@pytest.mark.parametrize("temperature", [0.5, 0.2])
def test_the_simclr_hook_equals_lightly(temperature):
    from lightly.loss import NTXentLoss

    z1, z2 = _pair(3, 16, 8)
    own = nn.ModuleDict({"projector": nn.Identity()})
    cfg = SimCLRConfig(temperature=temperature)
    terms = simclr.regularize(ctx=_ctx({"simclr.v1": z1, "simclr.v2": z2}), cfg=cfg, own=own)
    assert set(terms) == {"nt_xent"}
    assert abs(terms["nt_xent"].item() - NTXentLoss(temperature=temperature)(z1, z2).item()) <= TOL


# --- BYOL -----------------------------------------------------------------------------


@needs_lightly
@pytest.mark.parametrize("b, d", [(2, 3), (8, 16), (64, 256)])
@pytest.mark.parametrize("seed", SEEDS)
def test_byol_loss_is_two_plus_twice_lightlys_negative_cosine(seed, b, d):
    # lightly's NegativeCosineSimilarity is -mean_i cos(p_i, z_i); the BYOL paper's (and augssl's)
    # || p/|p| - z/|z| ||^2 = 2 - 2 cos, averaged over the batch: exactly 2 + 2 * lightly's.
    from lightly.loss import NegativeCosineSimilarity

    oracle = NegativeCosineSimilarity()
    _assert_same(byol_loss, lambda p, z: 2 + 2 * oracle(p, z), *_pair(seed, b, d))


@needs_lightly
@pytest.mark.parametrize("seed", SEEDS)
def test_the_byol_hook_sums_both_directions(seed):
    # The plugin's term is byol_loss(q(v1), z'(v2)) + byol_loss(q(v2), z'(v1)), the two directions
    # summed (range [0, 8]); lightly's BYOL example averages them, 0.5 * (NCS(p0, z1) + NCS(p1, z0)).
    # So augssl's term = 4 + 4 * lightly's loss. Here the projector and the teacher (its encoder and its copy
    # of the projector) are the identity and the predictor a fixed random linear map, so q(v) = W v and z'(v) = v.
    from lightly.loss import NegativeCosineSimilarity

    v1, v2 = _pair(seed, 16, 8)
    predictor = nn.Linear(8, 8, dtype=torch.float64)
    own = nn.ModuleDict({"projector": nn.Identity(), "predictor": predictor})
    ctx = _ctx({"byol.v1": v1, "byol.v2": v2}, teacher_modules={"byol": nn.ModuleDict({"projector": nn.Identity()})})
    terms = byol.regularize(ctx=ctx, cfg=BYOLConfig(), own=own)
    assert set(terms) == {"loss"}
    ncs = NegativeCosineSimilarity()
    with torch.no_grad():
        lightly_loss = 0.5 * (ncs(predictor(v1), v2) + ncs(predictor(v2), v1))
    assert abs(terms["loss"].item() - (4 + 4 * lightly_loss.item())) <= TOL


# --- Barlow Twins ---------------------------------------------------------------------


def _unbiased_barlow(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """The Barlow Twins loss with the unbiased std (torch.std's default) and no eps, to show the
    comparison below tells the two conventions apart."""
    n1, n2 = ((z - z.mean(0)) / z.std(0) for z in (z1, z2))
    c = n1.T @ n2 / z1.shape[0]
    off = c - torch.diag(torch.diagonal(c))
    return (1 - torch.diagonal(c)).pow(2).sum() + lambd * off.pow(2).sum()


@needs_lightly
@pytest.mark.parametrize("lambda_", ["5e-3", "1/dim"])
@pytest.mark.parametrize("b, d", [(3, 4), (16, 32), (64, 256)])
@pytest.mark.parametrize("seed", SEEDS)
def test_barlow_twins_loss_equals_lightly(seed, b, d, lambda_):
    # lightly normalises each feature along the batch with F.batch_norm(training=True): the biased
    # variance (divided by N) plus batch_norm's default eps = 1e-5, no affine; C = z1n.T @ z2n / N,
    # sum (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2, no further scaling. augssl's batch_normalise
    # is the same (biased variance + eps, BarlowConfig.eps = 1e-5): equal, no factor.
    from lightly.loss import BarlowTwinsLoss

    lambd = 5e-3 if lambda_ == "5e-3" else 1 / d
    z1, z2 = _pair(seed, b, d)
    _assert_same(lambda a, c: barlow_twins_loss(a, c, lambd, eps=1e-5), BarlowTwinsLoss(lambda_param=lambd), z1, z2)
    if b <= 16:  # the unbiased std would scale C by (N - 1) / N: far outside the tolerance at small N
        unbiased = _unbiased_barlow(z1, z2, lambd).item()
        assert abs(unbiased - BarlowTwinsLoss(lambda_param=lambd)(z1, z2).item()) > APART


@needs_lightly
def test_the_barlow_hook_and_defaults_equal_lightly():
    # BarlowConfig's defaults (lambda 5e-3, eps 1e-5) are lightly's (lambda_param 5e-3, batch_norm's eps).
    from lightly.loss import BarlowTwinsLoss

    z1, z2 = _pair(4, 16, 32)
    own = nn.ModuleDict({"projector": nn.Identity()})
    terms = barlow.regularize(ctx=_ctx({"barlow.v1": z1, "barlow.v2": z2}), cfg=BarlowConfig(), own=own)
    assert set(terms) == {"loss"}
    assert abs(terms["loss"].item() - BarlowTwinsLoss()(z1, z2).item()) <= TOL


# --- Gaussian KLs ---------------------------------------------------------------------


def _posterior(mu: torch.Tensor, logvar: torch.Tensor) -> Independent:
    """The diagonal Gaussian augssl's KLs describe: std = exp(logvar / 2) + 1e-6, exactly as
    plugins.blocks.vae (and the backbone's sampling) define it; latent dims are one event."""
    return Independent(Normal(mu, torch.exp(logvar / 2) + 1e-6), 1)


def _gaussian(seed: int, b: int, d: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = 2 * torch.randn(b, d, generator=g, dtype=torch.float64)
    logvar = spread * torch.randn(b, d, generator=g, dtype=torch.float64)
    return mu, logvar


# spread 3: logvar mostly in [-9, 9], so the 1e-6 on the std matters at the small end
@pytest.mark.parametrize("b, d, spread", [(1, 1, 1.0), (8, 16, 1.0), (64, 128, 3.0)])
@pytest.mark.parametrize("seed", SEEDS)
def test_kl_standard_normal_equals_torch_distributions(seed, b, d, spread):
    # KL summed over the latent dims (the Independent event), averaged over the batch.
    mu, logvar = _gaussian(seed, b, d, spread)
    prior = Independent(Normal(torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)), 1)

    def oracle(m: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        return kl_divergence(_posterior(m, lv), prior).mean()

    _assert_same(kl_standard_normal, oracle, mu, logvar)


@pytest.mark.parametrize("b, d, spread", [(1, 1, 1.0), (8, 16, 1.0), (64, 128, 3.0)])
@pytest.mark.parametrize("seed", SEEDS)
def test_kl_gaussians_equals_torch_distributions(seed, b, d, spread):
    mu_q, logvar_q = _gaussian(seed, b, d, spread)
    mu_p, logvar_p = _gaussian(seed + 100, b, d, spread)

    def oracle(mq: torch.Tensor, lq: torch.Tensor, mp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
        return kl_divergence(_posterior(mq, lq), _posterior(mp, lp)).mean()

    _assert_same(kl_gaussians, oracle, mu_q, logvar_q, mu_p, logvar_p)
    # KL(q || q) = 0, and the KL is not symmetric: the order of the arguments is the oracle's
    assert kl_gaussians(mu_q, logvar_q, mu_q, logvar_q).abs().item() <= TOL
    swapped = kl_divergence(_posterior(mu_p, logvar_p), _posterior(mu_q, logvar_q)).mean()
    assert abs(kl_gaussians(mu_q, logvar_q, mu_p, logvar_p).item() - swapped.item()) > APART
