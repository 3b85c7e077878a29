"""Self-distillation building blocks: DINO's head and loss, the teacher's centering (DINO's moving centre,
DINOv2's Sinkhorn-Knopp), iBOT's masked-patch loss and DINOv2's KoLeo regulariser.

The maths follows the papers and their Apache-2.0 reference code, written anew here:
DINO (Caron et al. 2021, facebookresearch/dino: `DINOHead`, `DINOLoss`), iBOT (Zhou et al. 2022) as
DINOv2 (Oquab et al. 2023, facebookresearch/dinov2: `iBOTPatchLoss`, `sinkhorn_knopp_teacher`, `KoLeoLoss`)
computes it. Every function works in (at least) float32, keeps float64 inputs in float64, and never reads a
value back to the host. tests/test_distill_losses.py checks each against lightly's implementation.

A step of a DINO-style plugin: the teacher's logits of the G global crops become probabilities with
`Center.probabilities` (DINO) or `sinkhorn_knopp` (DINOv2), the student's logits of every crop go to
`dino_loss`, then `Center.update` with the teacher's logits (every rank, the same update).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from framework import Recipe, all_reduce, at_least_float32, full_name, full_precision
from plugins.blocks.capabilities import MasksGlobalCrops, PatchGrid, SharedCrops
from plugins.blocks.masks import PatchMasks


class WeightNormLinear(nn.Module):
    """A bias-free Linear whose rows are `weight_g * weight_v / |weight_v|` (weight normalisation, Salimans &
    Kingma 2016), written as two plain parameters, so that `copy.deepcopy`, state dicts and FSDP2 see ordinary
    tensors (torch's `weight_norm` hook and parametrizations do not survive them all).

    `weight_v` (out, in) is initialised as `nn.Linear`'s weight (DINO wraps a default `nn.Linear`), `weight_g`
    (out, 1) with ones. With `fixed_scale` the scale stays 1 and is not trained: DINO's `norm_last_layer`.
    """

    def __init__(self, in_dim: int, out_dim: int, fixed_scale: bool) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)  # nn.Linear.reset_parameters
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    """DINO's projection head: an MLP to a `bottleneck_dim` vector, L2-normalised, then a weight-normalised
    bias-free Linear to `out_dim` prototypes' logits (DINO: in 384 for ViT-S, out 65536, hidden 2048,
    bottleneck 256, 3 layers).

    The MLP is `layers - 1` x (Linear + GELU), the first from `in_dim`, each `hidden_dim` wide, then a Linear to
    `bottleneck_dim`; `layers=1` is one Linear(in_dim, bottleneck_dim). Its Linears start as DINO's:
    truncated normal weights (std 0.02), zero biases. `last_layer` (a `WeightNormLinear`) is exposed so that a
    plugin can freeze it (DINO cancels its gradients in the first epoch); `norm_last_layer` fixes its scale
    to 1, untrained.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"DINOHead: layers must be >= 1, got {layers}")
        body: list[nn.Module] = []
        for i in range(layers - 1):
            body += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim), nn.GELU()]
        body.append(nn.Linear(hidden_dim if layers > 1 else in_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*body)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_scale=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # DINOv2's eps: 1e-12 underflows in float16
        x = F.normalize(x, p=2, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


def _cross_entropy(probabilities: torch.Tensor, log_probabilities: torch.Tensor) -> torch.Tensor:
    """`sum_k -p * log q` over the last dimension."""
    return -(probabilities * log_probabilities).sum(dim=-1)


def dino_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], student_temp: float) -> torch.Tensor:
    """DINO's loss: the cross-entropy of the teacher's probabilities and the student's, for every pair of
    (teacher crop j, student crop i) with i != j, averaged over the batch and over the pairs.

    `teacher`: the teacher's probabilities (from `Center.probabilities` or `sinkhorn_knopp`) of the G global
    crops, (B, K) each; `student`: the student's logits of every crop, (B, K) each, its first G the same
    global crops in the same order. The student's probabilities are `softmax(s / student_temp)`.
    Per rank: the mean over ranks is the loss of the global batch, as DINO's.
    """
    n_pairs = len(teacher) * len(student) - min(len(teacher), len(student))
    if n_pairs == 0:
        raise ValueError(
            f"dino_loss: no pair of different crops in {len(teacher)} teacher and {len(student)} student crops"
        )
    log_p = [F.log_softmax(at_least_float32(s) / student_temp, dim=-1) for s in student]
    # sum over the student crops of log p once; each teacher crop takes out its own crop's term
    total_log_p = functools.reduce(torch.add, log_p)  # one (B, K) more, not a stack of every crop
    per_teacher_crop = [
        _cross_entropy(at_least_float32(t), total_log_p - log_p[j] if j < len(log_p) else total_log_p).mean()
        for j, t in enumerate(teacher)
    ]
    return torch.stack(per_teacher_crop).sum() / n_pairs


def _global_rows(local: torch.Tensor, rows: int | torch.Tensor) -> torch.Tensor:
    """`local` (any shape) with this rank's row count appended (flattened), for one all-reduce of both."""
    count = rows.to(local).reshape(1) if isinstance(rows, torch.Tensor) else local.new_full((1,), rows)
    return torch.cat([local.flatten(), count])


class Center(nn.Module):
    """DINO's centre of the teacher's logits: a moving average (momentum 0.9 in DINO and DINOv2) of their mean
    over the global batch, subtracted before the teacher's softmax.

    `center` is a (1, K) buffer (it is saved with the model; its dtype stays the buffer's). iBOT centres its
    patch logits with a second `Center` updated with the teacher's masked patch rows.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def probabilities(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """`softmax((teacher_logits - center) / temp)` over the last dimension."""
        return F.softmax((at_least_float32(teacher_logits) - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """`center <- momentum * center + (1 - momentum) * mean of teacher_logits' rows over every rank`.

        One all-reduce gives the rows' sum and their number over every rank, so the mean is the global
        batch's even when the ranks hold different numbers of rows (iBOT's masked patches); it is DINO's
        `sum / (rows * world size)` when they hold the same. Every rank makes the same update. `mask` (bool,
        `teacher_logits`' shape less the last dimension): only the rows it marks count (iBOT's masked patches
        of (B, N, K) logits, as DINOv2's `teacher_patch_tokens[masks]`, without reading their number back).
        """
        logits = at_least_float32(teacher_logits.detach()).flatten(0, -2)
        if mask is None:
            reduced = all_reduce(_global_rows(logits.sum(dim=0), logits.shape[0]), "sum")
        else:
            keep = mask.flatten().to(logits.dtype)
            reduced = all_reduce(_global_rows(keep @ logits, keep.sum()), "sum")
        batch_center = (reduced[:-1] / reduced[-1]).unsqueeze(0).to(self.center.dtype)
        self.center.mul_(self.momentum).add_(batch_center, alpha=1 - self.momentum)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor, temp: float, iterations: int = 3, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """DINOv2's centering of the teacher (`sinkhorn_knopp_teacher`, from SwAV): the (B, K) logits' per-row
    probabilities, balanced so that every prototype takes the same share of the global batch.

    `Q = exp(logits / temp).T` (K x B) divided by its global sum; then `iterations` times: each prototype's
    row divided by its sum over the global batch and by K, each sample's column divided by its sum and by
    the global number of rows; finally times that number, so each row of the returned (B, K) sums to 1.
    `rows`: the global number of rows (a 0-d tensor), DINOv2's for iBOT's masked patches; by default the
    ranks' rows counted in the same all-reduce as the global sum (B x world size when every rank has B).

    Each prototype's logits are shifted by their maximum over the global batch before the exponential:
    the first row normalisation cancels the shift exactly, and no prototype's row can overflow or vanish.
    """
    if iterations < 1:
        raise ValueError(f"sinkhorn_knopp: iterations must be >= 1, got {iterations}")
    logits = at_least_float32(teacher_logits.detach()) / temp
    local_max = logits.amax(dim=0) if logits.shape[0] else logits.new_full(logits.shape[1:], float("-inf"))
    shift = all_reduce(local_max, "max")  # (K,): each prototype's maximum over the global batch (a rank may have none)
    q = torch.exp(logits - shift).T  # (K, B)
    k = q.shape[0]
    reduced = all_reduce(_global_rows(q.sum(), q.shape[1]), "sum")
    q /= reduced[0]
    total_rows = reduced[1] if rows is None else rows.to(q)
    for _ in range(iterations):
        q /= all_reduce(q.sum(dim=1, keepdim=True), "sum")  # each prototype: 1 over the global batch ...
        q /= k  # ... then 1 / K
        q /= q.sum(dim=0, keepdim=True)  # each sample: 1 ...
        q /= total_rows  # ... then 1 / (global rows)
    return (q * total_rows).T


def ibot_patch_loss(
    student_patches: torch.Tensor, teacher_patches: torch.Tensor, masks: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """iBOT's masked-patch loss as DINOv2 computes it: each masked patch's cross-entropy of the teacher's
    probabilities and `softmax(student / student_temp)`, averaged over the image's masked patches, then
    summed over the images and divided by the number of images B (an image without a masked patch adds 0).

    `student_patches` (B, N, K) logits, `teacher_patches` (B, N, K) probabilities (a `Center`'s or
    `sinkhorn_knopp`'s, of the teacher's patch logits), `masks` (B, N) bool, True where the student's patch
    was masked. Every patch's cross-entropy is computed and the unmasked ones are zeroed (no boolean
    indexing, which would read the number of masked patches back to the host).
    """
    if student_patches.dim() != 3 or student_patches.shape != teacher_patches.shape:
        raise ValueError(
            "ibot_patch_loss: student and teacher patches must both be (B, N, K), got "
            f"{tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}"
        )
    if masks.shape != student_patches.shape[:2]:
        raise ValueError(f"ibot_patch_loss: masks must be (B, N) = {tuple(student_patches.shape[:2])}")
    log_p = F.log_softmax(at_least_float32(student_patches) / student_temp, dim=-1)
    per_patch = _cross_entropy(at_least_float32(teacher_patches), log_p)  # (B, N)
    per_patch = torch.where(masks, per_patch, torch.zeros_like(per_patch))
    per_image = per_patch.sum(dim=1) / masks.sum(dim=1).clamp(min=1).to(per_patch.dtype)
    return per_image.sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser (Sablayrolles et al. 2019) on the rows of `x` (B, D): each L2-normalised row's
    distance to its nearest other row, `-log(distance + eps)` averaged over the rows.

    The nearest neighbour is the other row of largest dot product (found without gradient); the distance is
    `torch.nn.PairwiseDistance(2, eps)`'s. This rank's rows only, as DINOv2 computes it per GPU.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss: x must be (B, D) with B >= 2, got {tuple(x.shape)}")
    with full_precision(x.device):  # the dot products too in (at least) float32, even under AMP
        x = F.normalize(at_least_float32(x), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.T
            dots.fill_diagonal_(float("-inf"))
            nearest = dots.argmax(dim=1)
        distance = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
        return -torch.log(distance + eps).mean()


class Crops(NamedTuple):
    """The shared crops of a recipe (`shared_crops`): full view names, whether the student's global crops are
    encoded masked, and the plugin that makes them (whose modules a term may share: iBOT's shared head)."""

    globals_: list[str]
    locals_: list[str]
    masked: bool
    owner: str


def shared_crops(config: Recipe) -> Crops:
    """The crops that the self-distillation terms of `config` share: those of its one `SharedCrops` plugin (DINO's),
    by full name, masked when a plugin's term needs masks (`MasksGlobalCrops`). A one-line ValueError naming the
    fix when the recipe has none or several (call it in `build_modules` too, to refuse the recipe at start-up)."""
    owners = config.providers(SharedCrops)
    if len(owners) != 1:
        found = f"found {', '.join(owners)}" if owners else "found none"
        raise ValueError(f"needs exactly one plugin making the shared crops (e.g. dino), {found}")
    ((owner, section),) = owners.items()
    globals_, locals_ = section.crop_names()
    return Crops(
        [full_name(owner, v) for v in globals_],
        [full_name(owner, v) for v in locals_],
        bool(config.providers(MasksGlobalCrops)),
        owner,
    )


def mask_spec(config: Recipe) -> PatchMasks | None:
    """How the recipe's global crops are masked: the one `MasksGlobalCrops` plugin's `PatchMasks`, None without
    one; a ValueError when several plugins ask (they would disagree)."""
    askers = config.providers(MasksGlobalCrops)
    if len(askers) > 1:
        raise ValueError(f"plugins {', '.join(askers)} each mask the global crops: keep one")
    return next(iter(askers.values())).patch_masks() if askers else None


def patch_grid(config: Recipe, size: int) -> int:
    """The side of the patch grid of a `size` px view by the recipe's encoder (capability `PatchGrid`); a one-line
    ValueError when the encoder has no patch tokens."""
    patch = next((p for s in config.providers(PatchGrid).values() if (p := s.patch_size()) is not None), None)
    if patch is None:
        raise ValueError("masked crops need an encoder with patch tokens (a timm ViT, timm/vit_...)")
    return size // patch
