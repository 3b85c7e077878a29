"""Plugin `byol`: Bootstrap Your Own Latent (docs/methods.md#byol).

Online network: the backbone encoder (through `ctx.encode`), `projector`, `predictor`
(each Linear + BatchNorm1d + ReLU + Linear; BYOL paper: hidden 4096, output 256).
Target network: the run's EMA teacher (hook `teacher_modules`, `framework.teacher`): a frozen copy of the
encoder, whatever plugin provides it, and of this plugin's projector, shared with any other plugin of the recipe
that asks for a teacher (DINO's). The engine fills it with the online weights before the first step of a fresh
run (a resumed run keeps its own) and updates it after each optimizer step.

Loss (term `loss`): `2 - 2 cos(q(v1), z'(v2)) + 2 - 2 cos(q(v2), z'(v1))`, each
direction averaged over the batch and the two directions **summed**, as in the BYOL
paper (so its range is [0, 8]). `q` = predictor(projector(h)), `z'` = the teacher's projection of its encoding
of the other view (no gradient).

With `crops` set (docs/methods.md#multi-crop): N global crops `byol.v1`..`vN` and M local ones
`byol.l1`..`lM`; the online network predicts every crop (encoded with one call per crop size), the teacher
projects only the global ones (one call), and the loss is `multi_crop_byol_loss`, solo-learn's sum over each
global crop's target against the prediction of every other crop.

EMA, after optimizer step k (1-based): for every teacher parameter `xi <- tau * xi + (1 - tau) * theta` with
`tau = 1 - (1 - base) * (cos(pi * (k - 1) / steps) + 1) / 2` (BYOL paper's schedule: `base` at the start, 1 at
the end): the recipe's `teacher.momentum`, a `framework.Scheduled` (default `{start: 0.996, end: 1, shape:
cosine}`), read at step k - 1 and logged as `teacher.momentum` (the value of the step about to be taken). Only
parameters are averaged; the teacher's BatchNorm running statistics follow its own forward passes (it runs in
train mode, on batch statistics, as in the BYOL paper); they are copied from the online network only at
initialisation.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from framework import PluginConfig, Recipe, StepContext, View, hookimpl, num_features
from plugins.blocks import TwoViewsConfig, byol_loss, crop_names, crop_views, encode_crops, mlp, multi_crop_byol_loss


class BYOLConfig(TwoViewsConfig):
    proj_hidden_dim: int = Field(4096, gt=0)  # BYOL paper
    proj_output_dim: int = Field(256, gt=0)  # BYOL paper
    pred_hidden_dim: int = Field(4096, gt=0)  # BYOL paper

    @model_validator(mode="before")
    @classmethod
    def _momentum_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "momentum" in data:
            raise ValueError(
                "momentum is the shared EMA teacher's now: move it to the recipe's `teacher: {momentum: ...}`"
            )
        return data


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------


@hookimpl
def config_schema() -> type[PluginConfig]:
    return BYOLConfig


@hookimpl
def build_modules(cfg: BYOLConfig, encoder: nn.Module) -> dict[str, nn.Module]:
    h = num_features(encoder)
    return {
        "projector": mlp(h, cfg.proj_hidden_dim, cfg.proj_output_dim),
        "predictor": mlp(cfg.proj_output_dim, cfg.pred_hidden_dim, cfg.proj_output_dim),
    }


@hookimpl
def teacher_modules() -> list[str]:
    return ["projector"]  # the target network: the teacher's encoder, then its copy of the projector


@hookimpl
def augment(config: Recipe, cfg: BYOLConfig) -> dict[str, View]:
    return crop_views(config, cfg)


def target_projections(ctx: StepContext, cfg: BYOLConfig, views: list[str]) -> list[torch.Tensor]:
    """The teacher's projections of the global crops `views`, under no_grad: one call per view without `crops`
    (as before multi-crop), else one call on all of them concatenated (they share one size), as the online
    network's grouped encoding."""
    projector = ctx.teacher["projector"]
    with torch.no_grad():
        if cfg.crops is None:
            return [projector(ctx.encode_teacher(name).h) for name in views]
        h = torch.cat([encoding.h for encoding in ctx.encode_teacher_grouped(views)])
        return list(projector(h).chunk(len(views)))


@hookimpl
def regularize(ctx: StepContext, cfg: BYOLConfig, own: nn.ModuleDict) -> dict[str, torch.Tensor]:
    globals_, locals_ = crop_names(cfg)
    names = globals_ + locals_
    p = [own["predictor"](own["projector"](encoding.h)) for encoding in encode_crops(ctx, cfg, names)]
    z = target_projections(ctx, cfg, names[: len(globals_)])
    loss = byol_loss(p[0], z[1]) + byol_loss(p[1], z[0]) if cfg.crops is None else multi_crop_byol_loss(p, z)
    return {"loss": loss}
