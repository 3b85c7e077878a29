"""Plugin `consistency`: CR-VAE's consistency regularisation (docs/methods.md#cr-vae).

As a loss (all terms summed over pixels / latent dims, averaged over the batch):

    L_vae(x) + L_vae(t(x)) + lambda * KL( q(z|t(x)) || q(z|x) )
    L_vae(v) = -log p(v | z) + beta * KL( q(z|v) || N(0, I) ),  z ~ q(z|v)

with beta1 for `x` and beta2 for `t(x)`. `t(x)` is this plugin's own view
`consistency.t` (`plugins.blocks.crvae_affine_view`: RandomAffine preset
"simple"|"large", optional `vertical_flip` and `color_jitter`, the authors' variants). Both KLs are analytic
(`plugins.blocks.vae`) with std = exp(logvar/2) + 1e-6: the authors' code took
exp(logvar) as the std, a bug not copied here. Gradients flow through both posteriors
of the consistency KL, as in the authors' code.

Terms returned (the engine prefixes `consistency.` and multiplies each by `weight`):

| recipe plugins            | L_vae(x) comes from                   | this plugin returns                        |
|---------------------------|---------------------------------------|--------------------------------------------|
| consistency (alone)       | this plugin                           | recon_x, kl_x, recon_t, kl_t, consistency  |
| kl + consistency          | `kl` (kl.recon, kl.kl: kl's beta)     | recon_t, kl_t, consistency                 |
| aavae + consistency       | `aavae` (aavae.recon: x from t_a(x))  | recon_t, kl_t, consistency                 |
| kl + aavae + consistency  | `kl` and `aavae`                      | recon_t, kl_t, consistency                 |

* `recon_x` = -log p(x | z), z ~ q(z|x);   `kl_x` = s * beta1 * KL(q(z|x) || N(0, I)).
* `recon_t` = -log p(t(x) | z), z ~ q(z|t(x));   `kl_t` = s * beta2 * KL(q(z|t(x)) || N(0, I)).
* s, the prior KLs' schedule (0..1), is that of the plugin providing L_vae(x) when its section declares one
  (`kl`'s `warmup_steps` / `cycle_steps`, through `KLConfig.kl_factor`): the recipe's prior KLs warm up
  together. Without one (consistency alone, or with `aavae`) s = 1. The consistency KL is never scheduled.
* `consistency` = lambda * KL(q(z|t(x)) || q(z|x)); `consistency.kl_unweighted` is
  logged as a metric (without lambda).

A plugin whose section has the capability `StandsForELBO` already stands for L_vae(x): `kl`
(with its own beta, schedule and likelihood; `beta1` is then unused), so it is not added
twice, and `aavae`, whose reconstruction of the clean `x` from its augmented view takes the
place of L_vae(x) (AAVAE has no KL); q(z|x) in the consistency KL is still the posterior of
the clean `x`. This plugin asks the recipe (`Recipe.providers(StandsForELBO)`), so a third-party
VAE plugin that declares it is detected too; `elbo_x: true|false` overrides the detection.
`likelihood` unset follows the first such provider's `elbo_likelihood()`, else gaussian, so the two
ELBOs use one likelihood; the prior KLs follow the first such provider that is also a `PriorKLSchedule`.

`lambda` (recipe key `lambda`) has no default: the authors' gamma = 1e-3 multiplies a
per-sample KL against a BCE *averaged* per pixel; our reconstruction is *summed* over
pixels, so the same balance is about 1e-3 * C*H*W (see the recipes).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import ConfigDict, Field
from torchvision.transforms import v2

from framework import Encoding, PluginConfig, Recipe, StepContext, View, hookimpl
from plugins.blocks import (
    VAE_HEAD,
    Likelihood,
    PriorKLSchedule,
    StandsForELBO,
    crvae_affine_view,
    kl_gaussians,
    kl_standard_normal,
    reconstruction_term,
)


class ConsistencyConfig(PluginConfig):
    """Capability `AugmentedViews` (t(x)); it follows the recipe's `StandsForELBO` and `PriorKLSchedule`."""

    model_config = ConfigDict(serialize_by_alias=True)
    augmented_view: ClassVar[str] = "t"  # t(x): the affine head's default x1 when no plugin before it makes one
    needs: ClassVar[frozenset[str]] = frozenset({VAE_HEAD})

    lam: float = Field(ge=0, alias="lambda")  # weight of KL(q(z|t(x)) || q(z|x)); recipe key `lambda`
    beta1: float = Field(1.0, ge=0)  # KL weight of L_vae(x) (when this plugin provides it)
    beta2: float = Field(1.0, ge=0)  # KL weight of L_vae(t(x))
    likelihood: Likelihood | None = None  # None: kl's, else aavae's, else gaussian
    preset: Literal["simple", "large"] = "simple"
    vertical_flip: bool = False  # RandomVerticalFlip p=0.5 before the affine (the authors' *_vertical_flip)
    color_jitter: bool = False  # ColorJitter(brightness 0.2, contrast 0.5, hue 0.2) after it (the authors' *_jitter)
    elbo_x: bool | None = None  # None: add L_vae(x) only when no other plugin is a StandsForELBO


def adds_elbo_x(cfg: ConsistencyConfig, recipe: Recipe) -> bool:
    """Whether this plugin returns L_vae(x) (`recon_x`, `kl_x`) in `recipe`."""
    if cfg.elbo_x is not None:
        return cfg.elbo_x
    return not [other for other in recipe.providers(StandsForELBO).values() if other is not cfg]


def likelihood_of(cfg: ConsistencyConfig, recipe: Recipe) -> Likelihood:
    """`likelihood`, else that of the first plugin providing L_vae(x), else gaussian."""
    if cfg.likelihood is not None:
        return cfg.likelihood
    providers = [other for other in recipe.providers(StandsForELBO).values() if other is not cfg]
    return providers[0].elbo_likelihood() if providers else "gaussian"


def kl_factor(cfg: ConsistencyConfig, recipe: Recipe, step: int) -> float:
    """The schedule (0..1) of `kl_x` and `kl_t` after `step` optimizer steps: that of the first other plugin
    providing L_vae(x) whose section has one (`PriorKLSchedule`, as `kl`'s warm-up / cycles), else 1."""
    for other in recipe.providers(StandsForELBO).values():
        if other is not cfg and isinstance(other, PriorKLSchedule):
            return float(other.kl_factor(step))
    return 1.0


@hookimpl
def config_schema() -> type[PluginConfig]:
    return ConsistencyConfig


@hookimpl
def augment(config: Recipe, cfg: ConsistencyConfig) -> dict[str, View]:
    d = config.data
    t = crvae_affine_view(d.image_size, d.mean, d.std, d.channels, cfg.preset, cfg.vertical_flip, cfg.color_jitter)
    if d.resize is not None:  # transform the same pixels as the clean view `x` sees
        t = v2.Compose([v2.Resize(d.resize), v2.CenterCrop(d.image_size), t])
    return {"t": View(t)}


def _posterior(enc: Encoding) -> tuple[torch.Tensor, torch.Tensor]:
    """`(mu, logvar)` of the encoding's Gaussian posterior."""
    if enc.mu is None or enc.logvar is None:
        raise ValueError("the encoder has no VAE head: set plugins.backbones.latent_dim")
    return enc.mu, enc.logvar


@hookimpl
def regularize(ctx: StepContext, cfg: ConsistencyConfig) -> dict[str, torch.Tensor]:
    likelihood = likelihood_of(cfg, ctx.config)
    enc_x = ctx.encode("x")
    mu_x, logvar_x = _posterior(enc_x)
    enc_t = ctx.encode("t")
    mu_t, logvar_t = _posterior(enc_t)

    factor = kl_factor(cfg, ctx.config, ctx.step)
    terms: dict[str, torch.Tensor] = {}
    if adds_elbo_x(cfg, ctx.config):
        terms["recon_x"] = reconstruction_term(ctx, enc_x, ctx.views["x"], likelihood, "recon_x")
        terms["kl_x"] = factor * cfg.beta1 * kl_standard_normal(mu_x, logvar_x)
    terms["recon_t"] = reconstruction_term(ctx, enc_t, ctx.views["t"], likelihood, "recon_t")
    terms["kl_t"] = factor * cfg.beta2 * kl_standard_normal(mu_t, logvar_t)
    kl = kl_gaussians(mu_t, logvar_t, mu_x, logvar_x)
    ctx.metrics["kl_unweighted"] = kl.detach()
    terms["consistency"] = cfg.lam * kl
    return terms
