"""Plugin `rotation`: predict which of 4 rotations (0/90/180/270 degrees) was applied to a view.

Every image of the view is rotated 4 times; a Linear head on the pooled features of
the rotated batch classifies the rotation (Gidaris et al. 2018). Loss term `rotation.ce`,
metric `rotation.acc`. Installed through the `augssl` entry-point group; a recipe names it
as `rotation`.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from framework import PluginConfig, hookimpl
from plugins.backbones import feature_dim

NAME = "rotation"


class RotationConfig(PluginConfig):
    view: str = "x"  # the view whose images are rotated
    feature_dim: int | None = Field(None, gt=0)  # None: the backbones encoder's pooled width


@hookimpl
def config_schema() -> type[PluginConfig]:
    return RotationConfig


@hookimpl
def build_modules(config) -> dict[str, nn.Module]:
    cfg: RotationConfig = config.plugins[NAME]
    return {"head": nn.Linear(feature_dim(config, cfg.feature_dim), 4)}


@hookimpl
def auxiliary_head(modules, ctx) -> dict[str, torch.Tensor]:
    x = ctx.views[ctx.config.plugins[NAME].view]
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    target = torch.arange(4, device=x.device).repeat_interleave(len(x))
    logits = modules[NAME]["head"](ctx.encode_tensor(rotated).h)
    ctx.metrics[f"{NAME}.acc"] = (logits.argmax(1) == target).float().mean().detach()
    return {"ce": nn.functional.cross_entropy(logits, target)}
