"""Likelihoods and KL divergences shared by the autoencoding plugins (docs/methods.md#conventions).

Every term is summed over pixels / latent dimensions and averaged over the batch, so
reconstruction and KL stay on the same scale. Every term is computed in (at least) float32,
whatever precision autocast ran the decoder in.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from framework import Encoding, StepContext, at_least_float32, denormalize, normalize
from plugins.blocks.capabilities import VAE_HEAD

__all__ = [
    "VAE_HEAD",
    "bernoulli_nll",
    "gaussian_nll",
    "kl_gaussians",
    "kl_standard_normal",
    "posterior_std",
    "reconstruction_nll",
    "reconstruction_term",
    "warmup_factor",
]


def gaussian_nll(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) for a unit-variance Gaussian, constants dropped: 0.5 * ||x - x_hat||^2 over C,H,W."""
    return 0.5 * (at_least_float32(x_hat) - at_least_float32(x)).pow(2).flatten(1).sum(1).mean()


def bernoulli_nll(logits: torch.Tensor, target01: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) for a Bernoulli likelihood (BCE with logits) over C,H,W; target in [0, 1]."""
    logits, target01 = at_least_float32(logits), at_least_float32(target01)
    return F.binary_cross_entropy_with_logits(logits, target01, reduction="none").flatten(1).sum(1).mean()


def reconstruction_nll(
    x_hat: torch.Tensor, x: torch.Tensor, likelihood: str, mean: list[float], std: list[float]
) -> torch.Tensor:
    """The reconstruction term for a normalised target `x` under `likelihood` (gaussian|bernoulli)."""
    if likelihood == "gaussian":
        return gaussian_nll(x_hat, x)
    return bernoulli_nll(x_hat, denormalize(x, mean, std).clamp(0, 1))


def reconstruction_term(
    ctx: StepContext, enc: Encoding, target: torch.Tensor, likelihood: str, image: str
) -> torch.Tensor:
    """Decode `enc` and return -log p(target | z); on preview steps keep the reconstruction as
    `ctx.images[image]` (a short name, e.g. "recon"; normalised like the views: Bernoulli logits go through a
    sigmoid)."""
    x_hat = ctx.decode(enc)
    data = ctx.config.data
    if ctx.preview:
        shown = x_hat.detach()
        if likelihood == "bernoulli":
            shown = normalize(torch.sigmoid(shown), data.mean, data.std)
        ctx.images[image] = shown
    return reconstruction_nll(x_hat, target, likelihood, data.mean, data.std)


def warmup_factor(step: int, warmup_steps: int, cycle_steps: int | None = None) -> float:
    """The schedule of a prior KL's weight after `step` optimizer steps, a factor in [0, 1]: a linear ramp from 0
    over `warmup_steps` (1 throughout without one), restarted every `cycle_steps` when set (the cyclical
    schedule of Fu et al. 2019). `kl`'s beta and every KL that follows its schedule use this one function."""
    if cycle_steps is not None:
        step %= cycle_steps
    if warmup_steps == 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def posterior_std(logvar: torch.Tensor) -> torch.Tensor:
    """The posterior's standard deviation, exp(logvar / 2) + 1e-6 (docs/methods.md#backbones): the backbone
    samples z with it and every KL here is computed with it."""
    return torch.exp(logvar / 2) + 1e-6


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Analytic KL(N(mu, std^2) || N(0, I)), summed over latent dims, averaged over the batch."""
    mu, std = at_least_float32(mu), posterior_std(at_least_float32(logvar))
    return (0.5 * (std.pow(2) + mu.pow(2) - 1) - torch.log(std)).sum(1).mean()


def kl_gaussians(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """Analytic KL(q || p) between diagonal Gaussians, summed over latent dims, averaged over the batch.

    Uses the standard deviation exp(logvar/2) (CR-VAE's code took exp(logvar) as the std: a bug).
    """
    mu_q, mu_p = at_least_float32(mu_q), at_least_float32(mu_p)
    std_q, std_p = posterior_std(at_least_float32(logvar_q)), posterior_std(at_least_float32(logvar_p))
    return (torch.log(std_p / std_q) + (std_q.pow(2) + (mu_q - mu_p).pow(2)) / (2 * std_p.pow(2)) - 0.5).sum(1).mean()
