"""Plugin `dino`: self-distillation with no labels (DINO, Caron et al. 2021; docs/methods.md#dino).

Views: a multi-crop set (`crops`: N global crops `dino.v1`..`vN` and M local ones `dino.l1`..`lM`,
`plugins.blocks.crop_views`; without `crops`, two global crops), the shared crops of the recipe's
self-distillation terms (capability `SharedCrops`: iBOT's and KoLeo's terms read the same encodings). When a
term of the recipe masks the global crops (capability `MasksGlobalCrops`: iBOT), each global crop carries a
block mask drawn with it in the data workers and the student encodes the global crops masked (iBOT, DINOv2).

Student: the encoder (every crop, one call per crop size), then `head` (`DINOHead`: a 3-layer MLP, 2048 hidden,
GELU, a 256-d L2-normalised bottleneck and a weight-normalised last layer of `out_dim` prototypes). Teacher: the
run's EMA teacher (hook `teacher_modules`: the encoder and this head), on the global crops only, its logits
centred (`centering: center`, DINO: a moving centre of momentum 0.9 over the global batch, all-reduced; or
`sinkhorn`, DINOv2's Sinkhorn-Knopp, 3 iterations, distributed) and sharpened by the teacher temperature (a
`Scheduled`, DINO: 0.04 -> 0.07 over the first 30 epochs, then held).

Loss (term `loss`): the cross-entropy of the teacher's probabilities of each global crop against the student's
softmax (temperature `student_temp`, 0.1) of every other crop, averaged over the pairs (`dino_loss`). The last
layer's gradient is dropped for the first `freeze_last_layer_steps` optimizer steps (DINO: one epoch), so the
optimizer leaves it alone (a plugin implementing `on_after_backward`: not under DeepSpeed). The features
evaluated and exported are the teacher's by default (DINO reports the teacher's: `evaluate_teacher`).
"""

from __future__ import annotations

from typing import ClassVar, Literal, cast

import torch
from pydantic import Field
from torch import nn

from framework import PluginConfig, Recipe, Scheduled, StepContext, View, hookimpl, num_features
from plugins.blocks import (
    Center,
    DINOHead,
    TwoViewsConfig,
    crop_names,
    crop_views,
    dino_loss,
    mask_spec,
    masked_view,
    patch_grid,
    sinkhorn_knopp,
)


class DINOConfig(TwoViewsConfig):
    evaluate_teacher: ClassVar[bool] = True  # DINO evaluates the teacher's features

    out_dim: int = Field(65536, gt=0)  # DINO's ViT-S/16 prototypes
    hidden_dim: int = Field(2048, gt=0)  # DINO head
    bottleneck_dim: int = Field(256, gt=0)  # DINO head
    head_layers: int = Field(3, ge=1)  # DINO head
    norm_last_layer: bool = True  # DINO: the last layer's scale fixed to 1 (false for ViT-S/16's best run)
    student_temp: float = Field(0.1, gt=0)  # DINO
    # DINO: warmup_teacher_temp 0.04 -> teacher_temp 0.04-0.07 over warmup_teacher_temp_epochs (30), then held
    teacher_temp: Scheduled = Scheduled(start=0.04, end=0.07, shape="linear")
    centering: Literal["center", "sinkhorn"] = "center"  # DINO's moving centre; DINOv2's Sinkhorn-Knopp
    center_momentum: float = Field(0.9, ge=0, le=1)  # DINO
    sinkhorn_iterations: int = Field(3, ge=1)  # DINOv2
    freeze_last_layer_steps: int = Field(0, ge=0)  # DINO: the first epoch

    def crop_names(self) -> tuple[list[str], list[str]]:
        """The short names of the global and of the local crops (capability `SharedCrops`)."""
        return crop_names(self)


def teacher_probabilities(cfg: DINOConfig, center: Center, logits: torch.Tensor, temp: float) -> torch.Tensor:
    """The teacher's probabilities of its `logits` at temperature `temp`: centred (DINO) or balanced by
    Sinkhorn-Knopp over the global batch (DINOv2)."""
    if cfg.centering == "sinkhorn":
        return sinkhorn_knopp(logits, temp, cfg.sinkhorn_iterations)
    return center.probabilities(logits, temp)


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------


@hookimpl
def config_schema() -> type[PluginConfig]:
    return DINOConfig


@hookimpl
def build_modules(cfg: DINOConfig, encoder: nn.Module) -> dict[str, nn.Module]:
    h = num_features(encoder)
    head = DINOHead(h, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, cfg.norm_last_layer)
    return {"head": head, "center": Center(cfg.out_dim, cfg.center_momentum)}


@hookimpl
def teacher_modules() -> list[str]:
    return ["head"]


@hookimpl
def augment(config: Recipe, cfg: DINOConfig) -> dict[str, View]:
    views = crop_views(config, cfg)
    spec = mask_spec(config)
    if spec is None:
        return views
    size = (cfg.crops.global_.size if cfg.crops else None) or config.data.image_size
    grid = patch_grid(config, size)
    globals_, _ = crop_names(cfg)
    return {name: masked_view(view, grid, spec) if name in globals_ else view for name, view in views.items()}


@hookimpl
def regularize(ctx: StepContext, cfg: DINOConfig, own: nn.ModuleDict) -> dict[str, torch.Tensor]:
    globals_, locals_ = crop_names(cfg)
    masked = mask_spec(ctx.config) is not None  # the student's global crops are masked when a term masks them
    student = ctx.encode_grouped(globals_, masked=masked) + (ctx.encode_grouped(locals_) if locals_ else [])
    logits = own["head"](torch.cat([encoding.h for encoding in student]))  # one head call on every crop
    with torch.no_grad():
        teacher = ctx.teacher["head"](torch.cat([e.h for e in ctx.encode_teacher_grouped(globals_)]))
    temp = cfg.teacher_temp.at(ctx.step, ctx.config.train.steps)
    center = cast(Center, own["center"])
    probabilities = teacher_probabilities(cfg, center, teacher, temp)
    loss = dino_loss(logits.split([len(e.h) for e in student]), probabilities.chunk(len(globals_)), cfg.student_temp)
    if cfg.centering == "center":
        center.update(teacher)  # after its use, as DINO: the same update on every rank
    return {"loss": loss}


@hookimpl
def on_after_backward(own: nn.ModuleDict, step: int, cfg: DINOConfig) -> None:
    """DINO's frozen last layer: no gradient for the first `freeze_last_layer_steps` steps (the optimizer, weight
    decay included, leaves a parameter without one alone)."""
    if step < cfg.freeze_last_layer_steps:
        for parameter in cast(DINOHead, own["head"]).last_layer.parameters():
            parameter.grad = None
