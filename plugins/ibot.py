"""Plugin `ibot`: masked image modelling by self-distillation on patch tokens (iBOT, Zhou et al. 2022;
docs/methods.md#ibot), the patch term of DINOv2.

It adds its term to the recipe's shared crops (capability `SharedCrops`, DINO's: `plugins: {dino: ..., ibot:
...}` is iBOT, with `koleo` DINOv2): it asks for the global crops masked (capability `MasksGlobalCrops`,
`masks`: a block mask for `probability` of the images, `ratio` of their patches, drawn in the data workers),
and needs patch tokens of the encoder (`needs` PATCH_TOKENS: a timm ViT, whose masked patches are replaced by
a learned mask token).

Student: the patch tokens of the masked global crops, through `head` (its own `DINOHead`, as DINOv2's ViT-L/14
config, `out_dim` prototypes; or, `head: shared`, the head of the plugin making the crops, as iBOT's ViT-S/16 runs:
`out_dim` must then be its width). Teacher: the run's EMA teacher (the encoder and that head) on the same crops
unmasked, its patch logits centred (`centering: center`: a moving centre of the masked patches' logits, momentum
0.9, all-reduced, as DINOv2 and lightly; iBOT's code averages every patch; or `sinkhorn`, DINOv2's Sinkhorn-Knopp
over the masked patches of the global batch) and sharpened by `teacher_temp` (0.04 -> 0.07, then held, as DINO's).

Loss (term `loss`): on each masked patch, the cross-entropy of the teacher's probabilities against the student's
softmax (temperature 0.1); averaged over an image's masked patches, summed over images, divided by the number of
images (`ibot_patch_loss`, DINOv2's `forward_masked`). The heads run on each image's first `int(ratio_max x N)`
patches in masked-first order (`masked_first`: every masked patch, at most half of them at DINOv2's 0.5; fixed
shapes, so nothing is read back to the host; `sinkhorn` reads the number of masked patches once per step).
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
    # own: a head of its own (DINOv2's train/vitl14.yaml, separate_head); shared: the head of the plugin making the
    # shared crops (DINO's) on the patch tokens too (iBOT's ViT-S/16 runs, shared_head; DINOv2's default)
    head: Literal["own", "shared"] = "own"

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
    owner = shared_crops(config).owner  # a recipe without the shared crops is refused before the run starts
    center = Center(cfg.out_dim, cfg.center_momentum)
    if cfg.head == "shared":  # the crops' plugin's head, whose width out_dim must be
        width = getattr(config.plugins[owner], "out_dim", cfg.out_dim)
        if width != cfg.out_dim:
            raise ValueError(f"head: shared, and out_dim {cfg.out_dim} is not the shared head's ({owner}'s {width})")
        return {"center": center}
    h = num_features(encoder)
    head = DINOHead(h, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, cfg.norm_last_layer)
    return {"head": head, "center": center}


@hookimpl
def teacher_modules(cfg: IBOTConfig) -> list[str]:
    return ["head"] if cfg.head == "own" else []  # shared: the crops' plugin mirrors its head


def heads(ctx: StepContext, cfg: IBOTConfig, modules: nn.ModuleDict, own: nn.ModuleDict) -> tuple[nn.Module, nn.Module]:
    """The student's and the teacher's patch heads: this plugin's own, or (`head: shared`) those of the plugin
    making the shared crops."""
    if cfg.head == "own":
        return own["head"], ctx.teacher["head"]
    owner = shared_crops(ctx.config).owner
    return cast(nn.ModuleDict, modules[owner])["head"], ctx.teacher_of(owner)["head"]


def patch_tokens(encodings: list[Encoding]) -> torch.Tensor:
    """The patch tokens of `encodings`, concatenated along the batch (the encoder gives them: `needs`)."""
    tokens = [encoding.patches for encoding in encodings]
    if any(t is None for t in tokens):
        raise ValueError("the encoder gave no patch tokens (plugins.backbones.patch_tokens)")
    return torch.cat(cast(list[torch.Tensor], tokens))


def masked_first(masks: torch.Tensor, rows: int) -> torch.Tensor:
    """Each image's patch indices, masked ones first, in patch order: (B, rows) of `masks` (B, N). `rows` bounds
    every image's masked count (the mask generator's ratio cap), so no masked patch is left out; the shape is
    fixed, so nothing is read back to the host (DINOv2 gathers exactly the masked ones, with a count from its
    collate)."""
    return torch.argsort(masks.to(torch.int8), dim=1, descending=True, stable=True)[:, :rows]


def gather_rows(tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`tokens` (B, N, ...) at the patches `order` (B, rows) names: (B, rows, ...)."""
    index = order.view(*order.shape, *([1] * (tokens.dim() - 2))).expand(*order.shape, *tokens.shape[2:])
    return torch.gather(tokens, 1, index)


@hookimpl
def regularize(
    modules: nn.ModuleDict, ctx: StepContext, cfg: IBOTConfig, own: nn.ModuleDict
) -> dict[str, torch.Tensor]:
    crops = shared_crops(ctx.config)
    student_head, teacher_head = heads(ctx, cfg, modules, own)
    masks = torch.cat([ctx.mask_of(view) for view in crops.globals_])
    rows = max(1, int(cfg.masks.ratio[1] * masks.shape[1]))  # MaskedView masks int(ratio x N) <= this per image
    order = masked_first(masks, rows)  # one order for the student's and the teacher's tokens
    masks_ = torch.gather(masks, 1, order)
    # the heads run on the rows that can be masked, not on every patch
    logits = student_head(gather_rows(patch_tokens(ctx.encode_grouped(crops.globals_, masked=True)), order))
    with torch.no_grad():
        teacher = teacher_head(gather_rows(patch_tokens(ctx.encode_teacher_grouped(crops.globals_)), order))
    temp = cfg.teacher_temp.at(ctx.step, ctx.config.train.steps)
    center = cast(Center, own["center"])
    loss = ibot_patch_loss(logits, patch_probabilities(cfg, center, teacher, masks_, temp), masks_, cfg.student_temp)
    if cfg.centering == "center":
        center.update(teacher, masks_)  # the masked patches' logits, as DINOv2 (iBOT's code averages every patch)
    ctx.metrics["masked"] = masks.float().mean()  # the share of the global crops' patches masked
    return {"loss": loss}
