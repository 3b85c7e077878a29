"""Plugin `simclr`: SimCLR's NT-Xent over two augmented views (docs/methods.md#simclr).

Two views `simclr.v1`, `simclr.v2` of every image (`plugins.augmentations.simclr_view`; the
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

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from framework import (
    PluginConfig,
    Recipe,
    StepContext,
    View,
    at_least_float32,
    full_precision,
    gather_with_grad,
    hookimpl,
    num_features,
    rank,
)
from plugins.augmentations import TwoViewsConfig, crop_names, crop_views, encode_crops
from plugins.heads import mlp

NAME = "simclr"


class SimCLRConfig(TwoViewsConfig):
    temperature: float = Field(0.5, gt=0)  # SimCLR paper (CIFAR-10 best); 0.1-0.5 common: docs/methods.md#simclr
    output_dim: int = Field(128, gt=0)  # SimCLR paper: 128-d projection
    proj_hidden_dim: int | None = Field(None, gt=0)  # None: h, the SimCLR paper's Linear(h, h); solo-learn: 2048


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent of this rank's pairs `(z1[i], z2[i])`, (B, d) each, against the global batch.

    Similarities are cosines divided by `temperature`. Every one of the local 2B anchors
    has one positive (its other view) and 2N - 2 negatives (every other embedding of
    the 2N gathered ones); the loss is the mean cross-entropy over the local anchors.
    In one process this is the usual NT-Xent of the batch; over W ranks the mean of the
    W values is the NT-Xent of the global batch.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent: z1 and z2 must both be (B, d), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    with full_precision(z1.device):  # logits in (at least) float32, even under AMP
        z1, z2 = (F.normalize(at_least_float32(z), dim=1) for z in (z1, z2))
        all1, all2 = gather_with_grad(z1), gather_with_grad(z2)  # (N, d) each, rank order
        n = all1.shape[0]
        candidates = torch.cat([all1, all2])  # (2N, d): view 1 of every sample, then view 2
        anchors = torch.cat([z1, z2])  # (2B, d)
        logits = anchors @ candidates.T / temperature  # (2B, 2N)
        rows = rank() * b + torch.arange(b, device=z1.device)  # this rank's samples, global index
        self_idx = torch.cat([rows, rows + n])  # each anchor's own column
        positive = torch.cat([rows + n, rows])  # the other view of the same sample
        logits = logits.masked_fill(F.one_hot(self_idx, 2 * n).bool(), float("-inf"))
        return F.cross_entropy(logits, positive)


def multi_crop_nt_xent(crops: Sequence[torch.Tensor], temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent with several crops of each image (docs/methods.md#multi-crop): `crops` are K >= 2 tensors (B, d),
    crop k of this rank's sample i at row i of `crops[k]`.

    Every one of the local K*B anchors has as positives the K - 1 other crops of its image and as negatives
    the crops of every other image of the gathered K*N; its loss is
    `-log(sum over positives exp(cos / T) / sum over the K*N - 1 others exp(cos / T))`, averaged over the
    local anchors. This is solo-learn's `simclr_loss_func` (solo/losses/simclr.py) with the image indexes
    repeated per crop; with K = 2 it is `nt_xent`. Over W ranks the mean of the W values is the loss of the
    global batch, as for `nt_xent`.
    """
    if len(crops) < 2 or any(z.dim() != 2 or z.shape != crops[0].shape for z in crops):
        shapes = [tuple(z.shape) for z in crops]
        raise ValueError(f"multi_crop_nt_xent: needs at least 2 crops of the same shape (B, d), got {shapes}")
    k, b = len(crops), crops[0].shape[0]
    with full_precision(crops[0].device):  # logits in (at least) float32, even under AMP
        local = [F.normalize(at_least_float32(z), dim=1) for z in crops]
        gathered = [gather_with_grad(z) for z in local]  # K x (N, d), rank order
        n = gathered[0].shape[0]
        logits = torch.cat(local) @ torch.cat(gathered).T / temperature  # (K*B, K*N), crop-major both ways
        device = logits.device
        sample = (rank() * b + torch.arange(b, device=device)).repeat(k)  # each anchor's image, global index
        same = sample[:, None] == (torch.arange(k * n, device=device) % n)[None, :]
        self_idx = torch.arange(k, device=device).repeat_interleave(b) * n + sample  # each anchor's own column
        own = F.one_hot(self_idx, k * n).bool()
        logits = logits.masked_fill(own, float("-inf"))
        positives = logits.masked_fill(~same, float("-inf"))
        return (torch.logsumexp(logits, dim=1) - torch.logsumexp(positives, dim=1)).mean()


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
    names = [f"{NAME}.{view}" for view in globals_ + locals_]
    z = [projector(encoding.h) for encoding in encode_crops(ctx, cfg, names)]
    loss = nt_xent(z[0], z[1], cfg.temperature) if len(z) == 2 else multi_crop_nt_xent(z, cfg.temperature)
    return {"nt_xent": loss}
