"""The losses of the joint-embedding methods, each over the global batch where the method says so.

`nt_xent` / `multi_crop_nt_xent`: SimCLR's (docs/methods.md#simclr), gathered with gradient across ranks;
`barlow_twins_loss`: Barlow Twins' cross-correlation (docs/methods.md#barlow-twins), on the gathered batch;
`byol_loss` / `multi_crop_byol_loss`: BYOL's normalised regression (docs/methods.md#byol), per rank.
Every loss is computed in (at least) float32, whatever precision autocast ran the heads in, and is
checked against lightly's implementation in tests/test_loss_oracle.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from framework import at_least_float32, full_precision, gather_with_grad, rank


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


def batch_normalise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean and unit (biased) variance along the batch, per feature."""
    z = z - z.mean(dim=0)
    return z / torch.sqrt(z.pow(2).mean(dim=0) + eps)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins loss of this rank's embeddings `z1`, `z2` (B, D), computed over the global batch.

    Both are gathered from every rank first (a no-op in one process), so every rank
    returns the same value: the loss of the global batch.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"barlow_twins_loss: z1 and z2 must both be (B, D), got {tuple(z1.shape)}, {tuple(z2.shape)}")
    with full_precision(z1.device):  # C in (at least) float32, even under AMP
        z1, z2 = gather_with_grad(at_least_float32(z1)), gather_with_grad(at_least_float32(z2))
        n = z1.shape[0]
        c = batch_normalise(z1, eps).T @ batch_normalise(z2, eps) / n  # (D, D)
        eye = torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
        on_diag = (1 - torch.diagonal(c)).pow(2).sum()
        off_diag = c.masked_fill(eye, 0).pow(2).sum()
        return on_diag + lambd * off_diag


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """`2 - 2 cos(p, z)` averaged over the batch (one direction of the symmetric loss)."""
    p, z = at_least_float32(p), at_least_float32(z)
    return (2 - 2 * nn.functional.cosine_similarity(p, z, dim=1)).mean()


def multi_crop_byol_loss(p: Sequence[torch.Tensor], z: Sequence[torch.Tensor]) -> torch.Tensor:
    """BYOL over several crops (docs/methods.md#multi-crop): the online predictions `p` of every crop (the
    global ones first) against the target projections `z` of each global crop, every crop but the global
    crop itself, summed: `sum_g sum_{c != g} byol_loss(p[c], z[g])` (solo-learn's solo/methods/byol.py loop
    `for v1 in range(num_large_crops): for v2 in np.delete(range(num_crops), v1)`). With two global crops and
    no local one it is the two-direction sum `byol_loss(p[0], z[1]) + byol_loss(p[1], z[0])`."""
    if not 1 <= len(z) <= len(p) or len(p) < 2:
        raise ValueError(f"multi_crop_byol_loss: needs 1 <= len(z) <= len(p) and 2 crops, got {len(p)} and {len(z)}")
    terms = [byol_loss(p[c], z[g]) for g in range(len(z)) for c in range(len(p)) if c != g]
    return torch.stack(terms).sum()
