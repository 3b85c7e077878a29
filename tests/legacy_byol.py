"""BYOL as it was before it moved onto the shared EMA teacher (plugins/byol.py at commit 51f1938), kept as the
oracle of tests/test_byol.py: BYOL on the teacher must train bit for bit as this did.

Plugin `byol`: Bootstrap Your Own Latent (docs/methods.md#byol).

Online network: the backbone encoder (through `ctx.encode`), `projector`, `predictor`
(each Linear + BatchNorm1d + ReLU + Linear; BYOL paper: hidden 4096, output 256).
Target network (`own["target"]`): a copy of the run's encoder (`copy.deepcopy` of the
`encoder` that `build_modules` receives, whatever plugin provides it) and of the
projector, `requires_grad=False`, so the engine's optimizer never sees it; it is built
before `accelerator.prepare()` and therefore checkpointed with the root module. It is
filled with the online weights on the first forward (step 0), after any change the
engine made to the online modules (SyncBatchNorm, compilation); its buffer `initialised`
records that, so a resumed run keeps the target it loaded.

Loss (term `loss`): `2 - 2 cos(q(v1), z'(v2)) + 2 - 2 cos(q(v2), z'(v1))`, each
direction averaged over the batch and the two directions **summed**, as in the BYOL
paper (so its range is [0, 8]). `q` = predictor(projector(h)), `z'` = target, run
under `no_grad` on the other view.

With `crops` set (docs/methods.md#multi-crop): N global crops `byol.v1`..`vN` and M local ones
`byol.l1`..`lM`; the online network predicts every crop (encoded with one call per crop size), the target
projects only the global ones (one call), and the loss is `multi_crop_byol_loss`, solo-learn's sum over each
global crop's target against the prediction of every other crop.

EMA, in `on_train_step_end` after optimizer step k (1-based): for every target
parameter `xi <- tau * xi + (1 - tau) * theta` with
`tau = 1 - (1 - base) * (cos(pi * (k - 1) / steps) + 1) / 2` (BYOL paper's schedule:
`base` at the start, 1 at the end): the section's `momentum`, a `framework.Scheduled`
(default `{start: 0.996, end: 1, shape: cosine}`), read at step k - 1. The value used after the current step is logged
as `byol.tau` (and the engine logs `byol.momentum`, the value of the step about to be
taken). Only parameters are averaged; the target's BatchNorm running statistics follow its
own forward passes (it runs in train mode, on batch statistics, as in the BYOL paper); they
are copied from the online network only at initialisation.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from pydantic import Field, field_validator
from torch import nn

from framework import PluginConfig, Recipe, Scheduled, StepContext, View, hookimpl, num_features
from plugins.blocks import (
    Target,
    TwoViewsConfig,
    byol_loss,
    crop_names,
    crop_views,
    encode_crops,
    initialise_targets,
    mlp,
    multi_crop_byol_loss,
    update_targets,
)


class BYOLConfig(TwoViewsConfig):
    proj_hidden_dim: int = Field(4096, gt=0)  # BYOL paper
    proj_output_dim: int = Field(256, gt=0)  # BYOL paper
    pred_hidden_dim: int = Field(4096, gt=0)  # BYOL paper
    # BYOL paper: tau_base 0.996 cosine-increased to 1 (framework.Scheduled: a number, or {start, end, shape, ...})
    momentum: Scheduled = Scheduled(start=0.996, end=1.0, shape="cosine")

    @field_validator("momentum")
    @classmethod
    def _in_unit_interval(cls, value: Scheduled) -> Scheduled:
        ends = [value.start] + ([value.end] if value.end is not None else [])
        if not all(0 <= v <= 1 for v in ends):
            raise ValueError(f"the momentum must stay in [0, 1], got start {value.start}, end {value.end}")
        return value


def online_pairs(own: nn.ModuleDict, encoder: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(target part, online part) pairs: the run's encoder and this plugin's projector."""
    target = own["target"]  # a blocks.Target(encoder=..., projector=...), built by build_modules below
    return [(target.get_submodule("encoder"), encoder), (target.get_submodule("projector"), own["projector"])]


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------


@hookimpl
def config_schema() -> type[PluginConfig]:
    return BYOLConfig


@hookimpl
def build_modules(cfg: BYOLConfig, encoder: nn.Module) -> dict[str, nn.Module]:
    h = num_features(encoder)
    projector = mlp(h, cfg.proj_hidden_dim, cfg.proj_output_dim)
    predictor = mlp(cfg.proj_output_dim, cfg.pred_hidden_dim, cfg.proj_output_dim)
    # the one change from the plugin as it was (commit 51f1938): the target's projector, overwritten by the online
    # one at the start, is drawn after the predictor, so the two plugins start from the same random weights
    target_projector = mlp(h, cfg.proj_hidden_dim, cfg.proj_output_dim)
    return {
        "projector": projector,
        "predictor": predictor,
        "target": Target(encoder=copy.deepcopy(encoder), projector=target_projector),
    }


@hookimpl
def augment(config: Recipe, cfg: BYOLConfig) -> dict[str, View]:
    return crop_views(config, cfg)


def target_projections(own: nn.ModuleDict, ctx: StepContext, cfg: BYOLConfig, views: list[str]) -> list[torch.Tensor]:
    """The target's projections of the global crops `views`, under no_grad: one call per view without `crops`
    (as before multi-crop), else one call on all of them concatenated (they share one size), as the online
    network's grouped encoding."""
    target = own["target"]
    with torch.no_grad():
        if cfg.crops is None:
            return [target(ctx.views[name]) for name in views]
        return list(target(torch.cat([ctx.views[name] for name in views])).chunk(len(views)))


@hookimpl
def regularize(ctx: StepContext, cfg: BYOLConfig, own: nn.ModuleDict) -> dict[str, torch.Tensor]:
    globals_, locals_ = crop_names(cfg)
    names = globals_ + locals_
    p = [own["predictor"](own["projector"](encoding.h)) for encoding in encode_crops(ctx, cfg, names)]
    z = target_projections(own, ctx, cfg, names[: len(globals_)])
    tau = cfg.momentum.at(ctx.step, ctx.config.train.steps)
    ctx.metrics["tau"] = torch.full((), tau, device=p[0].device)  # no host-to-device copy
    loss = byol_loss(p[0], z[1]) + byol_loss(p[1], z[0]) if cfg.crops is None else multi_crop_byol_loss(p, z)
    return {"loss": loss}


@hookimpl
def on_train_start(own: nn.ModuleDict, encoder: nn.Module) -> None:
    """A fresh run's target starts as the online network; a resumed one keeps its own (the flag is checkpointed).
    Outside forward: under FSDP2 a parameter written during forward may be a gathered copy, dropped after it."""
    initialise_targets(online_pairs(own, encoder), cast(Target, own["target"]).initialised)


@hookimpl
def on_train_step_end(own: nn.ModuleDict, encoder: nn.Module, step: int, config: Recipe, cfg: BYOLConfig) -> None:
    update_targets(online_pairs(own, encoder), cfg.momentum.at(step - 1, config.train.steps))
