"""Mixed precision for plugins: the parts of a loss that stay float32 under autocast.

Under `accelerate launch --mixed_precision bf16` (DDP, and DeepSpeed through its
`torch_autocast` section) every hook runs inside `torch.autocast`: matmuls and convolutions
run in bf16, parameters stay float32. Posteriors, KLs, likelihoods and regression targets
lose too much in bf16 (8 bits of mantissa: a KL between two near-equal posteriors is a
difference of near-equal numbers), so plugins compute them as

    with full_precision(h.device):
        mu = self.mu(at_least_float32(h))
"""

from __future__ import annotations

import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if it is in half precision (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def full_precision(device: torch.device | str) -> torch.autocast:
    """A block where autocast is off on `device`'s type: its ops run in their inputs' dtype."""
    return torch.autocast(torch.device(device).type, enabled=False)
