"""Exponential-moving-average targets of a plugin's own: a frozen copy of online modules, initialised from them
once and then updated as `xi <- tau * xi + (1 - tau) * theta` after each optimizer step.

A plugin that needs an EMA copy of the encoder (BYOL, DINO, iBOT) asks for the run's shared teacher instead (hook
`teacher_modules`; `framework.teacher`), which the engine initialises and updates. `Target` and the functions
below (`framework`'s `ema_update`, `initialise_targets`, `update_targets`, re-exported) are for an EMA of a
plugin's own making: it calls `initialise_targets` in `on_train_start` and `update_targets` in
`on_train_step_end`. The functions take `(target, online)` module pairs and work under ZeRO-3 and FSDP2 too.
"""

from __future__ import annotations

import torch
from torch import nn

from framework import ema_update, initialise_targets, update_targets

__all__ = ["Target", "ema_update", "initialise_targets", "update_targets"]


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
