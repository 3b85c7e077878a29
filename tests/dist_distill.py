"""DINO's centre and DINOv2's Sinkhorn-Knopp over W processes, each with its rows of one batch, vs one process
with the whole batch.

Run by tests/test_distill_losses.py, either imported (one process, every row) or under
`torchrun --standalone --nproc_per_node 2` (gloo on CPU; each rank takes its rows of the same seeded float64
batch: `even` splits it in halves, `uneven` gives rank 0 five rows and rank 1 the rest, as iBOT's masked
patches are spread, `empty` gives rank 0 none). Each rank writes `<out>/rank<r>.pt`: for each split, the
centre after two `Center.update`s and the Sinkhorn-Knopp probabilities of its rows (`sinkhorn_rows` with
`rows` given).

    torchrun --standalone --nproc_per_node 2 tests/dist_distill.py OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from framework.distributed import rank, world_size
from plugins.blocks import Center, sinkhorn_knopp

ROWS, K = 16, 12
FIRST = {"uneven": 5, "empty": 0}  # rank 0's rows in the uneven splits (of 2 ranks)
SPLITS = ("even", *FIRST)
TEMP = 0.07


def fixed_batches() -> tuple[torch.Tensor, torch.Tensor]:
    """Two (ROWS, K) float64 batches of teacher logits, the same on every rank."""
    g = torch.Generator().manual_seed(0)
    first = 3 * torch.randn(ROWS, K, generator=g, dtype=torch.float64)
    return first, 3 * torch.randn(ROWS, K, generator=g, dtype=torch.float64)


def my_rows(split: str) -> slice:
    """This rank's rows of the batch under `split` (every row in one process)."""
    if world_size() == 1:
        return slice(0, ROWS)
    if split == "even":
        b = ROWS // world_size()
        return slice(rank() * b, (rank() + 1) * b)
    return slice(0, FIRST[split]) if rank() == 0 else slice(FIRST[split], ROWS)


def run(split: str) -> dict[str, torch.Tensor]:
    rows = my_rows(split)
    center = Center(K).double()
    for batch in fixed_batches():
        center.update(batch[rows])
    logits = fixed_batches()[0][rows]
    return {
        "center": center.center.clone(),
        "sinkhorn": sinkhorn_knopp(logits, TEMP),
        "sinkhorn_rows": sinkhorn_knopp(logits, TEMP, rows=torch.tensor(ROWS)),
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    try:
        torch.save({split: run(split) for split in SPLITS}, Path(out) / f"rank{rank()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if "WORLD_SIZE" not in os.environ:
        sys.exit("run under torchrun: torchrun --standalone --nproc_per_node 2 tests/dist_distill.py OUT")
    main(sys.argv[1])
