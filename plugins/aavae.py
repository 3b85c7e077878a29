"""Plugin `aavae`: the augmentation-augmented autoencoder (docs/methods.md#aavae).

The encoder sees an augmented view `t(x)` (its own view `aavae.aug`, `simclr_view`);
the decoder reconstructs the **clean** original `x` (the engine's view `"x"`):

    loss = -log p(x | z),   z ~ q(z | t(x))   (one sample, by the backbone's rsample)

There is no KL term: augmentation replaces it (the authors trained with `kl_coeff 0`).
Term: `recon` (the engine logs it as `aavae.recon`). `likelihood` is `gaussian`
(unit variance, `0.5 * ||x - x_hat||^2` summed over C,H,W) or `bernoulli` (BCE with
logits against `x` mapped back to [0, 1]); both from `plugins.blocks.vae`.

`strength` picks the SimCLR augmentation of `plugins.blocks.simclr_view`: "cifar"
(32 px), "stl" (96 px, with blur) or "mnist" (grey 28 px, our preset). Left unset it
follows the data: 1 channel -> "mnist", >= 64 px -> "stl", else "cifar".

Guards against the known failure (solo-learn issue 111: an inf loss). Without a KL
term nothing constrains the variance head, so:

* the backbone soft-bounds `logvar` to `plugins.backbones.logvar_range` (default
  [-10, 10], a scaled tanh that keeps a gradient past the bound) before
  `std = exp(logvar / 2) + 1e-6`, so `z` stays finite;
* the engine checks every step's total loss: a non-finite step is skipped (no
  optimizer update), counted (`skipped_steps` in the metrics) and, after
  `train.max_bad_steps` in a row, the run stops with an error naming the last good
  checkpoint.

`aavae.logvar_mean` (a metric, not optimised) tracks the drift of the variance head.

Composes with `consistency` (its `aavae.recon` then stands for L_vae(x): consistency adds
only the ELBO of its own view and its KL, see plugins/consistency.py) and with `affine`
(whose default x1 is AAVAE's augmented view `aavae.aug`: the section declares it as its "augmented_view").
"""

from __future__ import annotations

from typing import ClassVar

import torch

from framework import PluginConfig, Recipe, StepContext, View, hookimpl
from plugins.blocks import VAE_HEAD, Likelihood, Strength, infer_strength, reconstruction_term, simclr_split_view


class AAVAEConfig(PluginConfig):
    """Capabilities `StandsForELBO` (its reconstruction of x stands for L_vae(x)) and `AugmentedViews`."""

    augmented_view: ClassVar[str] = "aug"  # the affine head's default x1
    needs: ClassVar[frozenset[str]] = frozenset({VAE_HEAD})  # it decodes z

    strength: Strength | None = None  # None: from data.channels / data.image_size
    likelihood: Likelihood = "gaussian"

    def elbo_likelihood(self) -> Likelihood:
        """The likelihood of the reconstruction of `x` (capability `StandsForELBO`)."""
        return self.likelihood


@hookimpl
def config_schema() -> type[PluginConfig]:
    return AAVAEConfig


@hookimpl
def augment(config: Recipe, cfg: AAVAEConfig) -> dict[str, View]:
    d = config.data
    strength = infer_strength(config, cfg.strength)
    return {"aug": simclr_split_view(d.image_size, d.mean, d.std, d.channels, strength)}


@hookimpl
def regularize(ctx: StepContext, cfg: AAVAEConfig) -> dict[str, torch.Tensor]:
    enc = ctx.encode("aug")
    if enc.z is None:
        raise ValueError("the encoder has no VAE head: set plugins.backbones.latent_dim")
    recon = reconstruction_term(ctx, enc, ctx.views["x"], cfg.likelihood, "recon")
    if enc.logvar is not None:
        ctx.metrics["logvar_mean"] = enc.logvar.detach().mean()
    return {"recon": recon}
