"""Every hook of augssl, documented: the contract between the engine and its plugins.

A plugin is a module (or object) with functions marked `@hookimpl` whose names are
hook names below. An implementation may accept any subset of a hook's arguments, by
name. The engine calls hooks only through `framework.manager.PluginHooks`, which
keeps every result keyed by the plugin that returned it; never rely on the order in
which plugins are called.

Loss terms: `regularize` and `auxiliary_head` return `{term: tensor}`; the engine
names each `<plugin>.<term>` (e.g. `kl.kl`, `aavae.recon`), multiplies it by the
plugin's `weight` from the recipe, sums all terms and logs each one.

Plugins never call `backward`, `.item()`, `torch.distributed` or `accelerator.*`;
rank and world size come from `framework.distributed`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from framework.model import StepContext
    from framework.recipe import Recipe
    from framework.types import Encoding, PluginConfig, View

PROJECT = "augssl"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -------------------------------------------------------------------------
# Start-up: recipe and modules
# -------------------------------------------------------------------------


@hookspec
def config_schema() -> type[PluginConfig]:
    """Declare the pydantic model of this plugin's recipe section.

    Called once, when the recipe is loaded, before anything starts. The section
    `plugins.<plugin name>:` of the recipe is validated against the returned class;
    an unknown key, a wrong type or a missing value is a one-line recipe error.

    :returns: A subclass of `framework.PluginConfig` (which adds `weight`).

    Result mode: collect, one result per plugin, keyed by plugin name. A plugin that
    does not implement it gets `PluginConfig` (only `weight`).
    """


@hookspec
def build_modules(config: Recipe) -> dict[str, nn.Module]:
    """Create the plugin's trainable (or EMA) modules.

    Called once, before `accelerator.prepare()`. The modules are attached to the one
    root module under `modules[<plugin name>][<module name>]`, so they are trained,
    wrapped by DDP/DeepSpeed and checkpointed with everything else.

    :param config: The validated recipe; the plugin's own section is
        `config.plugins["<plugin name>"]`.
    :returns: `{module name: nn.Module}` (may be empty).

    Result mode: collect, keyed by plugin name.
    """


@hookspec
def augment(config: Recipe) -> dict[str, View]:
    """Declare the views this plugin needs, as named per-sample transforms.

    Called once, when the data pipeline is built (in the main process; the returned
    transforms are pickled into the data workers and applied per sample). The engine
    always provides the clean view `x` (minimal preprocessing); a view named `v` by
    plugin `p` is available in the step as `ctx.views["p.v"]`.

    :param config: The validated recipe.
    :returns: `{view name: framework.View}`; a view may take another view as its
        `source` (full name, e.g. `"simclr.v1"`) and may return its random parameters.

    Result mode: collect, keyed by plugin name.
    """


# -------------------------------------------------------------------------
# Every step: inside the root module's forward
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def encode(modules: nn.ModuleDict, view: torch.Tensor, ctx: StepContext | None) -> Encoding:
    """Encode one batch of one view.

    Called every step through `ctx.encode(view_name)` (cached per view name), and by
    the evaluation to extract features. Exactly one plugin must implement it (the
    backbone); this is checked at start-up.

    :param modules: Every plugin's modules, `modules[<plugin>][<module>]`.
    :param view: A batch of images, (B, C, H, W), on the training device.
    :param ctx: The step context, or None outside training (feature extraction).
    :returns: A `framework.Encoding` with pooled features `h` and, when the backbone
        has a VAE head, the posterior `mu`, `logvar` and a sample `z`.

    Result mode: firstresult, exactly one provider.
    """


@hookspec(firstresult=True)
def decode(modules: nn.ModuleDict, encoding: Encoding, ctx: StepContext | None) -> torch.Tensor:
    """Reconstruct images from an encoding's latent sample.

    Called every step through `ctx.decode(encoding)` by autoencoding plugins. At most
    one plugin may implement it; checked at start-up.

    :param modules: Every plugin's modules.
    :param encoding: The encoding whose `z` is decoded.
    :param ctx: The step context, or None outside training.
    :returns: The reconstruction, (B, C, H, W), in the normalised pixel space of the
        views (or logits, for a Bernoulli likelihood).

    Result mode: firstresult, at most one provider.
    """


@hookspec
def regularize(modules: nn.ModuleDict, ctx: StepContext) -> dict[str, torch.Tensor]:
    """Return this plugin's terms of the training objective.

    Called every step inside the root module's forward. This is where a method's
    loss lives: a VAE's reconstruction and KL, AAVAE's reconstruction of `x` from
    an augmented view, CR-VAE's consistency KL, SimCLR's NT-Xent. Obtain encodings
    with `ctx.encode(view name)` and reconstructions with `ctx.decode(encoding)`.

    :param modules: Every plugin's modules.
    :param ctx: The step context: `ctx.views`, `ctx.params`, `ctx.labels`,
        `ctx.step`, `ctx.config`, `ctx.encode`, `ctx.decode`, `ctx.metrics`.
    :returns: `{term: scalar tensor}`, named `<plugin>.<term>` by the engine and
        weighted by the plugin's `weight`. Put metrics (not optimised) in
        `ctx.metrics["<plugin>.<name>"]` instead.

    Result mode: collect, keyed by plugin name.
    """


@hookspec
def auxiliary_head(modules: nn.ModuleDict, ctx: StepContext) -> dict[str, torch.Tensor]:
    """Return the loss terms of an auxiliary head attached to any base method.

    Called every step inside the root module's forward, after every `regularize`.
    Examples: the affine-transform prediction head, an online linear probe on
    detached features.

    :param modules: Every plugin's modules.
    :param ctx: The step context (see `regularize`); encodings already computed for
        a view are reused.
    :returns: `{term: scalar tensor}`, named and weighted as for `regularize`.

    Result mode: collect, keyed by plugin name.
    """


# -------------------------------------------------------------------------
# After the optimizer step
# -------------------------------------------------------------------------


@hookspec
def on_train_step_end(modules: nn.ModuleDict, step: int, config: Recipe) -> None:
    """React to a completed optimizer step (e.g. BYOL's EMA target update).

    Called after each optimizer step (not after accumulation micro-steps), on every
    rank, outside autograd (`torch.no_grad()`), with the unwrapped modules.

    :param modules: Every plugin's modules.
    :param step: The number of optimizer steps completed, 1 after the first.
    :param config: The validated recipe.
    :returns: Nothing.

    Result mode: collect; results are ignored.
    """
