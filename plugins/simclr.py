"""Plugin `simclr`: SimCLR's NT-Xent over two augmented views (docs/methods.md#simclr).

Two views `simclr.v1`, `simclr.v2` of every image (`plugins.blocks.simclr_view`; the
strength is the recipe's `strength` or inferred: "mnist" for grey images, "stl" for
>= 64 px, else "cifar"). Each is encoded by the backbone (`Encoding.h`) and projected
by Linear(h, hidden) + BatchNorm1d + ReLU + Linear(hidden, output_dim) (SimCLR paper: hidden = h,
128-d; solo-learn's CIFAR config: hidden 2048, 256-d). With `crops` set (docs/methods.md#multi-crop):
N global crops `simclr.v1`..`vN` and M local ones `simclr.l1`..`lM`, encoded with one call per crop size
(`StepContext.encode_grouped`), and with more than two the loss `multi_crop_nt_xent`, every crop of an image
a positive of every other (solo-learn's).

NT-Xent over the *global* batch: the projections of every rank are gathered with
gradient (`framework.distributed.gather_with_grad`, whose backward sums the gradient
of every rank's copy - lightly issue 1528 was a gather that did not). Each rank then
computes the loss of its own 2B anchors against all 2N candidates (N = world x B),
its positives at their global rows (rank r's samples are rows r*B..r*B+B-1 of each
gathered view). The mean of the per-rank values is exactly the single-process loss of
the whole 2N batch, and, since DDP averages gradients over ranks while the gather sums
them, so are the gradients (tests/test_contrastive_distributed.py checks both).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from framework import PluginConfig, Recipe, StepContext, View, hookimpl, num_features
from plugins.blocks import TwoViewsConfig, crop_names, crop_views, encode_crops, mlp, multi_crop_nt_xent, nt_xent


class SimCLRConfig(TwoViewsConfig):
    temperature: float = Field(0.5, gt=0)  # SimCLR paper (CIFAR-10 best); 0.1-0.5 common: docs/methods.md#simclr
    output_dim: int = Field(128, gt=0)  # SimCLR paper: 128-d projection
    proj_hidden_dim: int | None = Field(None, gt=0)  # None: h, the SimCLR paper's Linear(h, h); solo-learn: 2048


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------


@hookimpl
def config_schema() -> type[PluginConfig]:
    return SimCLRConfig


@hookimpl
def build_modules(cfg: SimCLRConfig, encoder: nn.Module) -> dict[str, nn.Module]:
    h = num_features(encoder)
    return {"projector": mlp(h, cfg.proj_hidden_dim or h, cfg.output_dim)}


@hookimpl
def augment(config: Recipe, cfg: SimCLRConfig) -> dict[str, View]:
    return crop_views(config, cfg)


@hookimpl
def regularize(ctx: StepContext, cfg: SimCLRConfig, own: nn.ModuleDict) -> dict[str, torch.Tensor]:
    projector = own["projector"]
    globals_, locals_ = crop_names(cfg)
    z = [projector(encoding.h) for encoding in encode_crops(ctx, cfg, globals_ + locals_)]
    loss = nt_xent(z[0], z[1], cfg.temperature) if len(z) == 2 else multi_crop_nt_xent(z, cfg.temperature)
    return {"nt_xent": loss}
