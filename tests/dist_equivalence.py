"""One process with batch 2B vs W processes with batch B: same loss, same gradients.

Run by tests/test_contrastive_distributed.py, either imported (one process, the whole
batch) or under `torchrun --standalone --nproc_per_node 2` (gloo on CPU; each rank
takes its B rows of the same seeded batch). A small seeded MLP (no BatchNorm, float64)
maps fixed "views" (two, or four crops for `simclr_multicrop`: several embeddings per
sample) to embeddings inside the forward of a DDP-wrapped module, as the engine does
(`simclr_vit`: a one-block timm ViT on two 16-px image views instead of the MLP),
and the plugin's pure loss function (which gathers with gradient through
`framework.distributed`) gives the loss. Each rank writes
`<out>/<method>_rank<r>.pt`: `{"loss": float, "grads": {name: tensor}, "world_size": W}`;
the gradients are DDP's, i.e. averaged over the ranks.

    torchrun --standalone --nproc_per_node 2 tests/dist_equivalence.py OUT simclr barlow simclr_multicrop simclr_vit
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from framework.distributed import rank, world_size
from plugins.blocks import barlow_twins_loss, multi_crop_nt_xent, nt_xent

GLOBAL_BATCH, IN_DIM, OUT_DIM = 16, 12, 8
# method: (views per sample, the loss of their embeddings)
LOSSES: dict[str, tuple[int, Callable[..., torch.Tensor]]] = {
    "simclr": (2, lambda z1, z2: nt_xent(z1, z2, temperature=0.5)),
    "barlow": (2, lambda z1, z2: barlow_twins_loss(z1, z2, lambd=5e-3)),
    "simclr_multicrop": (4, lambda *z: multi_crop_nt_xent(z, temperature=0.5)),
    "simclr_vit": (2, lambda z1, z2: nt_xent(z1, z2, temperature=0.5)),
}
# simclr_vit's encoder: timm's VisionTransformer (patch embedding, class token, position embedding, attention,
# MLP, LayerNorms), pooled class token, small enough for float64 on a CPU
VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 0}


def fixed_batch(views: int = 2, shape: tuple[int, ...] = (IN_DIM,)) -> list[torch.Tensor]:
    """`views` correlated "views" of GLOBAL_BATCH samples of `shape`, the same on every rank."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(GLOBAL_BATCH, *shape, generator=g, dtype=torch.float64)
    return [x1] + [
        x1 + 0.3 * torch.randn(GLOBAL_BATCH, *shape, generator=g, dtype=torch.float64) for _ in range(views - 1)
    ]


class PairLoss(nn.Module):
    """A seeded MLP encoder; `forward(*views)` returns the method's loss (one DDP forward per step)."""

    def __init__(self, method: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        if method.endswith("_vit"):
            from timm.models.vision_transformer import VisionTransformer

            self.net: nn.Module = VisionTransformer(**VIT).double()
        else:
            self.net = nn.Sequential(nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Linear(16, OUT_DIM)).double()
        self.loss = LOSSES[method][1]

    def forward(self, *views: torch.Tensor) -> torch.Tensor:
        return self.loss(*(self.net(x) for x in views))


def run(method: str, rows: slice | None = None) -> dict:
    """Loss and gradients for `method` on `rows` of the fixed batch (all rows by default).

    Under torch.distributed the module is wrapped in DDP, so the gradients are averaged over ranks.
    """
    views = fixed_batch(
        LOSSES[method][0], (3, VIT["img_size"], VIT["img_size"]) if method.endswith("_vit") else (IN_DIM,)
    )
    if rows is None:
        b = GLOBAL_BATCH // world_size()
        rows = slice(rank() * b, (rank() + 1) * b)
    model = PairLoss(method)
    wrapped = nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    loss = wrapped(*(x[rows] for x in views))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "world_size": world_size()}


def main(out: str, methods: list[str]) -> None:
    dist.init_process_group("gloo")
    try:
        for method in methods:
            torch.save(run(method), Path(out) / f"{method}_rank{rank()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if "WORLD_SIZE" not in os.environ:
        sys.exit("run under torchrun: torchrun --standalone --nproc_per_node 2 tests/dist_equivalence.py OUT simclr")
    main(sys.argv[1], sys.argv[2:])
