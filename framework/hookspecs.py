"""Every hook of augssl, documented: the contract between the engine and its plugins.

A plugin is a module (or object) with functions marked `@hookimpl` whose names are
hook names below. An implementation may accept any subset of a hook's arguments, by
name. Pluggy is the registry (and loads the `augssl` entry points), but the engine never
calls `pm.hook.<name>()`: `framework.manager.PluginHooks` calls each plugin's implementation
itself, with that plugin's own arguments (`cfg`, `own` below), and keeps every result keyed
by the plugin that returned it; never rely on the order in which plugins are called. That
own call is why pluggy's call-chain options mean nothing here: no spec is `firstresult`
(a single-provider hook, `encode` or `decode`, is checked at start-up to have exactly or at
most one implementation, instead of taking the first non-None of several), and an
implementation marked `hookwrapper`/`wrapper` (which would wrap a chain that is never
called) or `tryfirst`/`trylast` (an order) is refused in one line.

Scoped arguments: besides what a hook says, every hook but `config_schema` may ask for
`cfg`, the plugin's *own* validated recipe section (`plugins.<name>:`, an instance of the
class its `config_schema` returned), and the hooks that see modules for `own`, the
plugin's *own* modules (`{name: module}` from its `build_modules`, an `nn.ModuleDict`).
A plugin needs nothing else to find its settings and weights, and never looks another
plugin up by name: it asks the recipe for a capability (`Recipe.providers(Protocol)`) or the
encoder (`encoder`, `ctx.encoder`: `num_features` is the width of `Encoding.h`).

Scoped names: a plugin never spells the name the recipe gives it (one module may be listed
under two names). Its views, their params, its metrics and its preview images have short
names (`v1`, `acc`), which the engine prefixes with `<plugin>.`; every hook's `ctx` is the
plugin's own (`StepContext.scoped`), in which `ctx.views["v1"]` is its view `<plugin>.v1`,
`ctx.views["x"]` the clean view and `ctx.views["simclr.v1"]` another plugin's, by full name.

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

    from framework.recipe.schema import PluginConfig, Recipe
    from framework.types import Encoding, StepContext, View

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
def build_modules(config: Recipe, cfg: PluginConfig, encoder: nn.Module | None) -> dict[str, nn.Module]:
    """Create the plugin's trainable (or EMA) modules.

    Called once, before `accelerator.prepare()`. The modules are attached to the one
    root module under `modules[<plugin name>][<module name>]`, so they are trained,
    wrapped by DDP/DeepSpeed and checkpointed with everything else.

    The plugin that implements `encode` is built first and must return its encoder as
    `"encoder"`, a module whose `num_features` (an int, as in timm) is the width of the
    pooled features `Encoding.h` it returns. It may also give the encoder an
    `export_metadata` attribute (`{str: str}`), written into `augssl export`'s file.

    :param config: The validated recipe.
    :param cfg: This plugin's own section of it.
    :param encoder: The run's encoder (already built), for every plugin but the encoder's
        own: heads size themselves with `encoder.num_features`; an EMA target may
        `copy.deepcopy` it. None while the encoder's own plugin is built.
    :returns: `{module name: nn.Module}` (may be empty).

    Result mode: collect, keyed by plugin name.
    """


@hookspec
def shard_blocks(config: Recipe, cfg: PluginConfig, own: nn.ModuleDict) -> list[nn.Module]:
    """List the repeated blocks of this plugin's own modules, in forward order: a ViT's transformer blocks,
    a ResNet's stages. The framework names no model; the plugin that builds one says what its blocks are.

    Called once at start-up, after `build_modules`, when the run shards with FSDP2 (`accelerate launch
    --config_file launch/accelerate/fsdp2.yaml`) or checkpoints activations
    (`distributed.activation_checkpointing`). Under FSDP2 each block is a unit of its own: its parameters
    are all-gathered just before its forward and freed after it, so a rank holds one whole block at a
    time, and under bf16 they are cast to bf16 for compute. With activation checkpointing each block's
    activations are recomputed in backward. A module anywhere in the model that is a copy of the module
    holding the blocks (same class, same tensor names and shapes: an EMA target made with
    `copy.deepcopy(encoder)`) has its blocks at the same paths and is sharded alike. The encoder is
    always a unit of its own, blocks or not.

    :param config: The validated recipe.
    :param cfg: This plugin's own section.
    :param own: This plugin's own modules.
    :returns: Submodules of `own`'s modules (may be empty: they are then sharded whole).

    Result mode: collect, keyed by plugin name.
    """


@hookspec
def teacher_modules(config: Recipe, cfg: PluginConfig, own: nn.ModuleDict) -> list[str]:
    """Ask for the run's EMA teacher and name the plugin's own modules it mirrors (BYOL: its projector; DINO: its
    head), `[]` for the encoder alone.

    Called once at start-up, after `build_modules`. A run has one teacher, shared by every plugin that implements
    this hook (DINO's, iBOT's and KoLeo's terms read one teacher, as in DINOv2); none when no plugin does. It is a
    frozen copy of the run's encoder and of the modules named here (`framework.teacher.Teacher`), checkpointed with
    the model, sharded like it under FSDP2, gathered under ZeRO-3. The engine copies the online weights in before
    the first step of a fresh run (a resumed run keeps its checkpoint's) and, after every optimizer step k
    (1-based, before `on_train_step_end`), moves it towards them: `xi <- m * xi + (1 - m) * theta`,
    `m = teacher.momentum.at(k - 1, train.steps)` (the recipe's `teacher:` section, logged as
    `teacher.momentum`).

    In a step, `ctx.encode_teacher(view)` / `ctx.encode_teacher_grouped(views)` are the teacher's encodings (no
    gradient, cached per step and shared by the plugins, the views never masked) and `ctx.teacher` this plugin's
    mirrored modules by name (`ctx.teacher["head"]`). Which views the teacher sees is the plugin's choice (DINO:
    the global crops only).

    :param config: The validated recipe.
    :param cfg: This plugin's own section.
    :param own: This plugin's own modules.
    :returns: Names of modules of `own` to mirror (may be empty).

    Result mode: collect, keyed by plugin name.
    """


@hookspec
def augment(config: Recipe, cfg: PluginConfig) -> dict[str, View]:
    """Declare the views this plugin needs, as named per-sample transforms.

    Called once, when the data pipeline is built (in the main process; the returned
    transforms are pickled into the data workers and applied per sample). The engine
    always provides the clean view `x` (minimal preprocessing); a view named `v` by
    plugin `p` is `ctx.views["v"]` in p's hooks and `ctx.views["p.v"]` in any other's.

    :param config: The validated recipe (`config.data`: image size, channels, statistics).
    :param cfg: This plugin's own section.
    :returns: `{view name: framework.View}`, each name short (letters, digits, `_`; not `x`);
        a view may take another view as its `source` (its own by short name, `"x"`, or another
        plugin's by full name, e.g. `"simclr.v1"`) and may return its random parameters.

    Result mode: collect, keyed by plugin name.
    """


# -------------------------------------------------------------------------
# Every step: inside the root module's forward
# -------------------------------------------------------------------------


@hookspec
def encode(
    modules: nn.ModuleDict,
    view: torch.Tensor,
    ctx: StepContext | None,
    cfg: PluginConfig,
    own: nn.ModuleDict,
    mask: torch.Tensor | None,
) -> Encoding:
    """Encode one batch of one view.

    Called every step through `ctx.encode(view_name)` (cached per view name), and by
    the evaluation to extract features. Exactly one plugin must implement it (the
    backbone); this is checked at start-up. The teacher's encodings (`ctx.encode_teacher`) come from the same
    call with the teacher's copies as `modules` and `own` (its `own` holds the copy of `encoder` only).

    Token-level encodings: an encoder that has patch tokens (timm's ViTs in `backbones`) returns them as
    `Encoding.patches` when a plugin of the recipe needs them (`needs = {PATCH_TOKENS}`), and then takes a
    patch mask: `mask` (B, N) bool, True where the patch embedding is replaced by a learned mask token before
    the position embedding (iBOT, DINOv2). `mask` is None unless a plugin encodes a view `masked`
    (`ctx.encode(view, masked=True)`); an implementation without a `mask` argument is refused then, in one line.

    :param modules: Every plugin's modules, `modules[<plugin>][<module>]`.
    :param view: A batch of images, (B, C, H, W), on the training device.
    :param ctx: The step context, or None outside training (feature extraction).
    :param cfg: This plugin's own section.
    :param own: This plugin's own modules (`own["encoder"]`, a VAE head, ...).
    :param mask: A patch mask (B, N) bool, or None (see above).
    :returns: A `framework.Encoding` with pooled features `h` and, when the backbone
        has a VAE head, the posterior `mu`, `logvar` and a sample `z`; `patches` when asked for.

    Result mode: single, exactly one provider (checked at start-up).
    """


@hookspec
def decode(
    modules: nn.ModuleDict, encoding: Encoding, ctx: StepContext | None, cfg: PluginConfig, own: nn.ModuleDict
) -> torch.Tensor:
    """Reconstruct images from an encoding's latent sample.

    Called every step through `ctx.decode(encoding)` by autoencoding plugins. At most
    one plugin may implement it; checked at start-up.

    :param modules: Every plugin's modules.
    :param encoding: The encoding whose `z` is decoded.
    :param ctx: The step context, or None outside training.
    :param cfg: This plugin's own section.
    :param own: This plugin's own modules.
    :returns: The reconstruction, (B, C, H, W), in the normalised pixel space of the
        views (or logits, for a Bernoulli likelihood).

    Result mode: single, at most one provider (checked at start-up).
    """


@hookspec
def regularize(
    modules: nn.ModuleDict, ctx: StepContext, cfg: PluginConfig, own: nn.ModuleDict
) -> dict[str, torch.Tensor]:
    """Return this plugin's terms of the training objective.

    Called every step inside the root module's forward, for every plugin, before any
    `auxiliary_head`; in no set order, so a plugin's terms must not depend on another's
    calls. What plugins share is `ctx`'s encodings, the same whoever asks first:
    `ctx.encode(v)` is `v` encoded alone, `ctx.encode_grouped(vs)` is `vs` encoded in groups
    of one image size (multi-crop), each computed once per step. This is where a method's
    loss lives: a VAE's reconstruction and KL, AAVAE's reconstruction of `x` from
    an augmented view, CR-VAE's consistency KL, SimCLR's NT-Xent. Obtain encodings
    with `ctx.encode(view name)` and reconstructions with `ctx.decode(encoding)`.

    :param modules: Every plugin's modules (a plugin needs only `own`).
    :param ctx: This plugin's step context: `ctx.views`, `ctx.params`, `ctx.labels`,
        `ctx.step`, `ctx.config`, `ctx.encoder`, `ctx.encode`, `ctx.decode`, `ctx.metrics`,
        its own names short (see "Scoped names" above).
    :param cfg: This plugin's own section.
    :param own: This plugin's own modules.
    :returns: `{term: scalar tensor}`, named `<plugin>.<term>` by the engine and
        weighted by the plugin's `weight`. Put metrics (not optimised) in
        `ctx.metrics["<name>"]` instead (logged as `<plugin>.<name>`).

    Result mode: collect, keyed by plugin name.
    """


@hookspec
def auxiliary_head(
    modules: nn.ModuleDict, ctx: StepContext, cfg: PluginConfig, own: nn.ModuleDict
) -> dict[str, torch.Tensor]:
    """Return the loss terms of an auxiliary head attached to any base method.

    Called every step inside the root module's forward, after every plugin's `regularize`;
    it does not see their terms, and its results must not depend on them (see `regularize`).
    Examples: the affine-transform prediction head, an online linear probe on
    detached features.

    :param modules: Every plugin's modules (a plugin needs only `own`).
    :param ctx: The step context (see `regularize`); its encodings are shared, and are the
        same whichever plugin asked first.
    :param cfg: This plugin's own section.
    :param own: This plugin's own modules.
    :returns: `{term: scalar tensor}`, named and weighted as for `regularize`.

    Result mode: collect, keyed by plugin name.
    """


# -------------------------------------------------------------------------
# The training loop: before the first step, between backward and the optimizer step, after it
# -------------------------------------------------------------------------


@hookspec
def on_train_start(
    modules: nn.ModuleDict, step: int, config: Recipe, cfg: PluginConfig, own: nn.ModuleDict, encoder: nn.Module
) -> None:
    """Prepare for training, once the weights are final (e.g. copy the online network into a target).

    Called once per process start, after a resume has loaded its checkpoint and before the
    first step, on every rank, outside autograd (`torch.no_grad()`), with the unwrapped
    modules. Not called when the run is already trained to `train.steps`.

    :param modules: Every plugin's modules (a plugin needs only `own`).
    :param step: The number of optimizer steps already completed: 0 on a fresh run, the
        checkpoint's step after a resume.
    :param config: The validated recipe.
    :param cfg: This plugin's own section.
    :param own: This plugin's own modules.
    :param encoder: The run's encoder.
    :returns: Nothing.

    Result mode: collect; results are ignored.
    """


@hookspec
def on_after_backward(
    modules: nn.ModuleDict, step: int, config: Recipe, cfg: PluginConfig, own: nn.ModuleDict, encoder: nn.Module
) -> None:
    """Edit the gradients of an optimizer step before they are clipped and applied.

    Called once per optimizer step (under gradient accumulation, after the last micro-step's
    backward), on every rank, once the gradients are reduced across ranks (each rank sees the
    same `.grad`) and unscaled (fp16's loss scale is removed), before `distributed.grad_clip`
    and the optimizer step; outside autograd (`torch.no_grad()`), with the unwrapped modules.
    Examples: DINO's frozen last layer (`p.grad = None` for the first epochs: the optimizer
    then leaves `p` alone, weight decay included), a per-module gradient clip. A step whose
    loss was non-finite is dropped before backward and does not call it.

    Under FSDP2 each `.grad` is a DTensor holding this rank's shard of the reduced gradient (element-wise
    edits and `p.grad = None` work as they are; a norm of it is the whole gradient's).

    Not supported under DeepSpeed: its backward steps the optimizer too (the gradients of
    ZeRO live in its own partitioned buffers, not in `.grad`), so a launch with DeepSpeed
    refuses a plugin implementing this hook at start-up, in one line.

    :param modules: Every plugin's modules (a plugin needs only `own`).
    :param step: The number of optimizer steps completed before this one (0 on a fresh run's
        first step, as `ctx.step`).
    :param config: The validated recipe.
    :param cfg: This plugin's own section.
    :param own: This plugin's own modules (their parameters' `.grad`).
    :param encoder: The run's encoder.
    :returns: Nothing.

    Result mode: collect; results are ignored.
    """


@hookspec
def on_train_step_end(
    modules: nn.ModuleDict, step: int, config: Recipe, cfg: PluginConfig, own: nn.ModuleDict, encoder: nn.Module
) -> None:
    """React to a completed optimizer step (e.g. BYOL's EMA target update).

    Called after each optimizer step (not after accumulation micro-steps), on every
    rank, outside autograd (`torch.no_grad()`), with the unwrapped modules.

    :param modules: Every plugin's modules (a plugin needs only `own`).
    :param step: The number of optimizer steps completed, 1 after the first.
    :param config: The validated recipe.
    :param cfg: This plugin's own section.
    :param own: This plugin's own modules.
    :param encoder: The run's encoder (the online network, for an EMA).
    :returns: Nothing.

    Result mode: collect; results are ignored.
    """
