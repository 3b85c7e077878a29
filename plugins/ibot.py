"""Plugin `ibot`: masked image modelling by self-distillation on patch tokens (iBOT, Zhou et al. 2022;
docs/methods.md#ibot), the patch term of DINOv2.

It adds its term to the recipe's shared crops (capability `SharedCrops`, DINO's: `plugins: {dino: ..., ibot:
...}` is iBOT, with `koleo` DINOv2): it asks for the global crops masked (capability `MasksGlobalCrops`,
`masks`: a block mask for `probability` of the images, `ratio` of their patches, drawn in the data workers),
and needs patch tokens of the encoder (`needs` PATCH_TOKENS: a timm ViT, whose masked patches are replaced by
a learned mask token).

Student: the patch tokens of the masked global crops, through `head` (its own `DINOHead`, as DINOv2; `out_dim`
prototypes). Teacher: the run's EMA teacher (the encoder and this head) on the same crops unmasked, its patch
logits centred (`centering: center`: a moving centre of its masked patches' logits, momentum 0.9, all-reduced,
as DINOv2 and lightly; iBOT's code averages every patch;
or `sinkhorn`, DINOv2's Sinkhorn-Knopp over the masked patches of the global batch) and sharpened by
`teacher_temp` (0.04 -> 0.07, then held, as DINO's).

Loss (term `loss`): on each masked patch, the cross-entropy of the teacher's probabilities against the student's
softmax (temperature 0.1); averaged over an image's masked patches, summed over images, divided by the number of
images (`ibot_patch_loss`, DINOv2's `forward_masked`). The head runs on every patch (no boolean indexing, so no
read back to the host; `sinkhorn` reads the number of masked patches once per step).
"""

from __future__ import annotations

from typing import ClassVar, Literal, cast

import torch
from pydantic import Field
from torch import nn

from framework import Encoding, PluginConfig, Recipe, Scheduled, StepContext, hookimpl, num_features
from plugins.blocks import (
    PATCH_TOKENS,
    Center,
    DINOHead,
    PatchMasks,
    ibot_patch_loss,
    shared_crops,
    sinkhorn_knopp,
)


class IBOTConfig(PluginConfig):
    needs: ClassVar[frozenset[str]] = frozenset({PATCH_TOKENS})
    evaluate_teacher: ClassVar[bool] = True  # iBOT evaluates the teacher's features

    out_dim: int = Field(8192, gt=0)  # iBOT's patch_out_dim (DINOv2: 65536 for ViT-g, its head_n_prototypes)
    hidden_dim: int = Field(2048, gt=0)  # DINO head
    bottleneck_dim: int = Field(256, gt=0)  # DINO head
    head_layers: int = Field(3, ge=1)  # DINO head
    norm_last_layer: bool = True
    student_temp: float = Field(0.1, gt=0)  # iBOT, DINOv2
    teacher_temp: Scheduled = Scheduled(start=0.04, end=0.07, shape="linear")  # iBOT: teacher_patch_temp 0.07
    centering: Literal["center", "sinkhorn"] = "center"  # iBOT's moving centre; DINOv2's Sinkhorn-Knopp
    center_momentum: float = Field(0.9, ge=0, le=1)  # iBOT center_momentum2
    sinkhorn_iterations: int = Field(3, ge=1)  # DINOv2
    masks: PatchMasks = PatchMasks()  # DINOv2: mask_sample_probability 0.5, mask_ratio_min_max [0.1, 0.5]

    def patch_masks(self) -> PatchMasks:
        """How the global crops are masked (capability `MasksGlobalCrops`)."""
        return self.masks


def patch_probabilities(
    cfg: IBOTConfig, center: Center, logits: torch.Tensor, masks: torch.Tensor, temp: float
) -> torch.Tensor:
    """The teacher's probabilities of its patch `logits` (B, N, K): centred, or balanced by Sinkhorn-Knopp over the
    masked patches of the global batch (DINOv2; the unmasked ones are left at 0, the loss ignores them)."""
    if cfg.centering == "center":
        return center.probabilities(logits, temp)
    probabilities = torch.zeros_like(logits, dtype=torch.float32 if logits.dtype != torch.float64 else logits.dtype)
    probabilities[masks] = sinkhorn_knopp(logits[masks], temp, cfg.sinkhorn_iterations).to(probabilities.dtype)
    return probabilities


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------


@hookimpl
def config_schema() -> type[PluginConfig]:
    return IBOTConfig


@hookimpl
def build_modules(config: Recipe, cfg: IBOTConfig, encoder: nn.Module) -> dict[str, nn.Module]:
    shared_crops(config)  # a recipe without the shared crops is refused before the run starts
    h = num_features(encoder)
    head = DINOHead(h, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, cfg.norm_last_layer)
    return {"head": head, "center": Center(cfg.out_dim, cfg.center_momentum)}


@hookimpl
def teacher_modules() -> list[str]:
    return ["head"]


def patch_tokens(encodings: list[Encoding]) -> torch.Tensor:
    """The patch tokens of `encodings`, concatenated along the batch (the encoder gives them: `needs`)."""
    tokens = [encoding.patches for encoding in encodings]
    if any(t is None for t in tokens):
        raise ValueError("the encoder gave no patch tokens (plugins.backbones.patch_tokens)")
    return torch.cat(cast(list[torch.Tensor], tokens))


@hookimpl
def regularize(ctx: StepContext, cfg: IBOTConfig, own: nn.ModuleDict) -> dict[str, torch.Tensor]:
    crops = shared_crops(ctx.config)
    logits = own["head"](patch_tokens(ctx.encode_grouped(crops.globals_, masked=True)))
    masks = torch.cat([ctx.mask_of(view) for view in crops.globals_])
    with torch.no_grad():
        teacher = ctx.teacher["head"](patch_tokens(ctx.encode_teacher_grouped(crops.globals_)))
    temp = cfg.teacher_temp.at(ctx.step, ctx.config.train.steps)
    center = cast(Center, own["center"])
    loss = ibot_patch_loss(logits, patch_probabilities(cfg, center, teacher, masks, temp), masks, cfg.student_temp)
    if cfg.centering == "center":
        center.update(teacher, masks)  # the masked patches' logits, as DINOv2 (iBOT's code averages every patch)
    ctx.metrics["masked"] = masks.float().mean()  # the share of the global crops' patches masked
    return {"loss": loss}
