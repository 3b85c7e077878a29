"""Exponential-moving-average targets (BYOL's target network, DINO's teacher): a frozen copy of online modules,
initialised from them once and then updated as `xi <- tau * xi + (1 - tau) * theta` after each optimizer step.

Every function takes `(target, online)` module pairs and works under ZeRO-3 and FSDP2 too. ZeRO-3: each pair
is gathered (`framework.full_parameters`) while it is read or written. FSDP2: a target made by copying online
modules is sharded like them (`framework.sharding`), so the update runs shard by shard (`framework.local_shard`),
with no gather. Schedule `tau` with `framework.Scheduled`
(BYOL: 0.996 cosine-increased to 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from framework import full_parameters, local_shard

Pairs = Sequence[tuple[nn.Module, nn.Module]]  # (target module, online module)


class Target(nn.Module):
    """A frozen EMA network made of named `parts` (e.g. `encoder=`, `projector=`: submodules of those names,
    applied in that order), never trained by the optimizer, and a buffer `initialised` that says whether the
    online weights were copied in (`initialise_targets`)."""

    initialised: torch.Tensor

    def __init__(self, **parts: nn.Module) -> None:
        super().__init__()
        self.names = list(parts)
        for name, part in parts.items():
            self.add_module(name, part)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = self.get_submodule(name)(x)
        return x


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """`xi <- tau * xi + (1 - tau) * theta` for every parameter (matched by name); buffers are left alone."""
    online_params = dict(online.named_parameters())
    for name, xi in target.named_parameters():
        local_shard(xi).mul_(tau).add_(local_shard(online_params[name].detach()), alpha=1 - tau)


@torch.no_grad()
def update_targets(pairs: Pairs, tau: float) -> None:
    """`ema_update` of every `(target, online)` pair, each gathered under ZeRO-3 (partitioned outside forward)."""
    for target, online in pairs:
        with full_parameters(target, online, modify=True):
            ema_update(target, online, tau)


@torch.no_grad()
def initialise_targets(pairs: Pairs, done: torch.Tensor) -> None:
    """Copy the online weights (parameters and buffers) into each target unless `done` (a bool tensor, e.g.
    `Target.initialised`) is set, then set it.

    Uses `torch.where` on the flag, so no value is read back to the host; under ZeRO-3 on the gathered
    parameters (`full_parameters`), which are empty placeholders otherwise. The flag is checkpointed with the
    target, so a resumed run keeps its target.
    """
    for target, online in pairs:
        with full_parameters(target, online, modify=True):
            weights = _tensors(online)
            for name, value in _tensors(target).items():
                value.copy_(torch.where(done, value, weights[name].to(value.dtype)))
    done.fill_(True)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` by name, as this rank holds it (its shard under FSDP2). Not
    `state_dict()`, which under FSDP2 switches the parameters it reads to their sharded form mid-forward."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return {name: local_shard(tensor.detach()) for name, tensor in named}
