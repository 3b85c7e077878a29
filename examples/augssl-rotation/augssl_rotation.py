"""Plugin `rotation`: predict which of 4 rotations (0/90/180/270 degrees) was applied to a view.

Every image of the view is rotated 4 times; a Linear head on the pooled features of
the rotated batch classifies the rotation (Gidaris et al. 2018). Loss term `rotation.ce`,
metric `rotation.acc` (the engine names both after the plugin: under a second name, `<name>.ce`).
Installed through the `augssl` entry-point group; a recipe names it as `rotation`.
"""

from __future__ import annotations

import torch
from torch import nn

from framework import PluginConfig, StepContext, hookimpl


class RotationConfig(PluginConfig):
    view: str = "x"  # the view whose images are rotated


@hookimpl
def config_schema() -> type[PluginConfig]:
    return RotationConfig


@hookimpl
def build_modules(encoder: nn.Module) -> dict[str, nn.Module]:
    return {"head": nn.Linear(encoder.num_features, 4)}  # any encoder declares its width


@hookimpl
def auxiliary_head(ctx: StepContext, cfg: RotationConfig, own: nn.ModuleDict) -> dict[str, torch.Tensor]:
    x = ctx.views[cfg.view]
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    target = torch.arange(4, device=x.device).repeat_interleave(len(x))
    logits = own["head"](ctx.encode_tensor(rotated).h)
    ctx.metrics["acc"] = (logits.argmax(1) == target).float().mean().detach()
    return {"ce": nn.functional.cross_entropy(logits, target)}
