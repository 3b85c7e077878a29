"""Plugin `consistency`: CR-VAE's consistency regularisation (METHODS.md section 3).

As a loss (all terms summed over pixels / latent dims, averaged over the batch):

    L_vae(x) + L_vae(t(x)) + lambda * KL( q(z|t(x)) || q(z|x) )
    L_vae(v) = -log p(v | z) + beta * KL( q(z|v) || N(0, I) ),  z ~ q(z|v)

with beta1 for `x` and beta2 for `t(x)`. `t(x)` is this plugin's own view
`consistency.t` (`framework.views.crvae_affine_view`: RandomAffine preset
"simple"|"large", optional `flip` and `color_jitter`). Both KLs are analytic
(`plugins.vae_terms`) with std = exp(logvar/2) + 1e-6: the authors' code took
exp(logvar) as the std, a bug not copied here. Gradients flow through both posteriors
of the consistency KL, as in the authors' code.

Terms returned (the engine prefixes `consistency.` and multiplies each by `weight`):

| recipe plugins            | L_vae(x) comes from                   | this plugin returns                                |
|---------------------------|---------------------------------------|----------------------------------------------------|
| consistency (alone)       | this plugin                           | recon_x, kl_x, recon_t, kl_t, consistency          |
| kl + consistency          | `kl` (kl.recon, kl.kl: kl's beta)     | recon_t, kl_t, consistency                         |
| aavae + consistency       | `aavae` (aavae.recon: x from t_a(x))  | recon_t, kl_t, consistency                         |
| kl + aavae + consistency  | `kl` and `aavae`                      | recon_t, kl_t, consistency                         |

* `recon_x` = -log p(x | z), z ~ q(z|x);   `kl_x` = beta1 * KL(q(z|x) || N(0, I)).
* `recon_t` = -log p(t(x) | z), z ~ q(z|t(x));   `kl_t` = beta2 * KL(q(z|t(x)) || N(0, I)).
* `consistency` = lambda * KL(q(z|t(x)) || q(z|x)); `consistency.kl_unweighted` is
  logged as a metric (without lambda).

When `kl` is in the recipe it already provides L_vae(x) (with its own beta, schedule
and likelihood; `beta1` is then unused), so it is not added twice. With `aavae`, the
reconstruction of the clean `x` from AAVAE's augmented view takes the place of
L_vae(x) (AAVAE has no KL); q(z|x) in the consistency KL is still the posterior of the
clean `x`. `elbo_x: true|false` overrides this detection (e.g. for a third-party VAE
plugin). `likelihood` unset follows `kl`'s, else `aavae`'s, else gaussian, so the two
ELBOs use one likelihood.

`lambda` (recipe key `lambda`) has no default: the authors' gamma = 1e-3 multiplies a
per-sample KL against a BCE *averaged* per pixel; our reconstruction is *summed* over
pixels, so the same balance is about 1e-3 * C*H*W (see the recipes).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field
from torchvision.transforms import v2

from framework import Encoding, PluginConfig, View, hookimpl
from framework.views import crvae_affine_view
from plugins.vae_terms import kl_gaussians, kl_standard_normal, reconstruction_term

NAME = "consistency"
VIEW = f"{NAME}.t"
Likelihood = Literal["gaussian", "bernoulli"]

# Plugins whose terms already stand for L_vae(x) when they are in the recipe.
ELBO_X_PROVIDERS: tuple[str, ...] = ("kl", "aavae")


class ConsistencyConfig(PluginConfig):
    model_config = ConfigDict(serialize_by_alias=True)

    lam: float = Field(
        ge=0, alias="lambda"
    )  # weight of KL(q(z|t(x)) || q(z|x)); recipe key `lambda`
    beta1: float = Field(1.0, ge=0)  # KL weight of L_vae(x) (when this plugin provides it)
    beta2: float = Field(1.0, ge=0)  # KL weight of L_vae(t(x))
    likelihood: Likelihood | None = None  # None: kl's, else aavae's, else gaussian
    preset: Literal["simple", "large"] = "simple"
    flip: bool = False
    color_jitter: bool = False
    elbo_x: bool | None = (
        None  # None: add L_vae(x) only when no plugin of ELBO_X_PROVIDERS is present
    )


def adds_elbo_x(cfg: ConsistencyConfig, plugins: dict) -> bool:
    """Whether this plugin returns L_vae(x) (`recon_x`, `kl_x`) for a recipe with `plugins`."""
    if cfg.elbo_x is not None:
        return cfg.elbo_x
    return not any(name in plugins for name in ELBO_X_PROVIDERS)


def likelihood_of(cfg: ConsistencyConfig, plugins: dict) -> Likelihood:
    if cfg.likelihood is not None:
        return cfg.likelihood
    for name in ELBO_X_PROVIDERS:
        other = getattr(plugins.get(name), "likelihood", None)
        if other is not None:
            return other
    return "gaussian"


@hookimpl
def config_schema() -> type[PluginConfig]:
    return ConsistencyConfig


@hookimpl
def augment(config) -> dict[str, View]:
    cfg: ConsistencyConfig = config.plugins[NAME]
    d = config.data
    t = crvae_affine_view(
        d.image_size, d.mean, d.std, d.channels, cfg.preset, cfg.flip, cfg.color_jitter
    )
    if d.resize is not None:  # transform the same pixels as the clean view `x` sees
        t = v2.Compose([v2.Resize(d.resize), v2.CenterCrop(d.image_size), t])
    return {"t": View(t)}


def _posterior(enc: Encoding) -> Encoding:
    if enc.mu is None or enc.logvar is None:
        raise ValueError("the encoder has no VAE head: set plugins.backbones.latent_dim")
    return enc


@hookimpl
def regularize(ctx) -> dict[str, torch.Tensor]:
    cfg: ConsistencyConfig = ctx.config.plugins[NAME]
    plugins = ctx.config.plugins
    likelihood = likelihood_of(cfg, plugins)
    enc_x, enc_t = _posterior(ctx.encode("x")), _posterior(ctx.encode(VIEW))

    terms: dict[str, torch.Tensor] = {}
    if adds_elbo_x(cfg, plugins):
        terms["recon_x"] = reconstruction_term(ctx, enc_x, ctx.views["x"], likelihood, f"{NAME}.recon_x")
        terms["kl_x"] = cfg.beta1 * kl_standard_normal(enc_x.mu, enc_x.logvar)
    terms["recon_t"] = reconstruction_term(ctx, enc_t, ctx.views[VIEW], likelihood, f"{NAME}.recon_t")
    terms["kl_t"] = cfg.beta2 * kl_standard_normal(enc_t.mu, enc_t.logvar)
    kl = kl_gaussians(enc_t.mu, enc_t.logvar, enc_x.mu, enc_x.logvar)
    ctx.metrics[f"{NAME}.kl_unweighted"] = kl.detach()
    terms["consistency"] = cfg.lam * kl
    return terms
