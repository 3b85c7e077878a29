"""Plugin `koleo`: the KoLeo regulariser of DINOv2 (Sablayrolles et al. 2019; docs/methods.md#koleo).

On the student's features `h` (a ViT's class token, before any head) of each of the recipe's shared global crops
(capability `SharedCrops`, DINO's; masked as the student sees them when a term masks them): `-log` of each
L2-normalised row's distance to its nearest other row in this rank's batch, averaged, summed over the global
crops (term `loss`, `koleo_loss`, DINOv2's per-GPU form). Its default `weight` is DINOv2's 0.1. It spreads the
features over the sphere, which DINOv2 found helps retrieval.
"""

from __future__ import annotations

import torch

from framework import PluginConfig, Recipe, StepContext, hookimpl
from plugins.blocks import koleo_loss, shared_crops


class KoLeoConfig(PluginConfig):
    weight: float = 0.1  # DINOv2's koleo_loss_weight (a plugin without modules: it may change on resume)


@hookimpl
def config_schema() -> type[PluginConfig]:
    return KoLeoConfig


@hookimpl
def build_modules(config: Recipe) -> dict:
    shared_crops(config)  # a recipe without the shared crops is refused before the run starts
    return {}


@hookimpl
def regularize(ctx: StepContext) -> dict[str, torch.Tensor]:
    crops = shared_crops(ctx.config)
    student = ctx.encode_grouped(crops.globals_, masked=crops.masked)
    return {"loss": torch.stack([koleo_loss(encoding.h) for encoding in student]).sum()}
