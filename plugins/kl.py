"""Plugin `kl`: the VAE (docs/methods.md#vae): -log p(x|z) + beta * KL(q(z|x) || N(0, I)).

The KL is analytic (Bolts issue 565 estimated it from the sampled z: a bug). beta-VAE
is the same plugin with beta != 1; `warmup_steps` ramps beta linearly from 0, and
`cycle_steps` repeats that ramp (the cyclical schedule of Fu et al. 2019). The section declares
the schedule (`KLConfig.kl_factor`), and the other prior KLs of the recipe follow it (consistency's).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from framework import PluginConfig, StepContext, hookimpl
from plugins.blocks import VAE_HEAD, Likelihood, kl_standard_normal, reconstruction_term, warmup_factor


class KLConfig(PluginConfig):
    """A VAE's section: capabilities `StandsForELBO` (recon + KL of the clean view) and `PriorKLSchedule`."""

    needs: ClassVar[frozenset[str]] = frozenset({VAE_HEAD})

    beta: float = Field(1.0, ge=0)
    likelihood: Likelihood = "gaussian"
    warmup_steps: int = Field(0, ge=0)  # beta ramps 0 -> beta over these steps
    cycle_steps: int | None = Field(None, gt=0)  # restart the ramp every cycle_steps

    def kl_factor(self, step: int) -> float:
        """The KL weight's schedule (0..1) after `step` optimizer steps. Declared on the section, so the
        other prior KLs of the recipe can follow it (consistency's `kl_x` and `kl_t` do)."""
        return warmup_factor(step, self.warmup_steps, self.cycle_steps)

    def elbo_likelihood(self) -> Likelihood:
        """The likelihood of the reconstruction of `x` (capability `StandsForELBO`)."""
        return self.likelihood


def beta_at(step: int, cfg: KLConfig) -> float:
    """beta after `step` optimizer steps under the warm-up / cyclic schedule."""
    return cfg.beta * cfg.kl_factor(step)


@hookimpl
def config_schema() -> type[PluginConfig]:
    return KLConfig


@hookimpl
def regularize(ctx: StepContext, cfg: KLConfig) -> dict[str, torch.Tensor]:
    enc = ctx.encode("x")
    if enc.mu is None or enc.logvar is None:
        raise ValueError("the encoder has no VAE head: set plugins.backbones.latent_dim")
    recon = reconstruction_term(ctx, enc, ctx.views["x"], cfg.likelihood, "recon")
    kl = kl_standard_normal(enc.mu, enc.logvar)
    ctx.metrics["kl_unweighted"] = kl.detach()
    return {"recon": recon, "kl": beta_at(ctx.step, cfg) * kl}
