"""The EMA teacher that a recipe's plugins share (DINO's, iBOT's, BYOL's target network; MoCo v3's and I-JEPA's
later): a frozen copy of the run's encoder and of the modules the plugins name (hook `teacher_modules`),
initialised from them once and then updated as `xi <- m * xi + (1 - m) * theta` after each optimizer step, `m` the
recipe's `teacher.momentum` (`framework.Scheduled`, default 0.996 cosine-increased to 1).

Its layout mirrors `Model.plugins`: `teacher.plugins[<plugin>][<module>]` is the copy of
`plugins[<plugin>][<module>]`; the encoder's copy is under the encoder plugin's name. It is a submodule of the
root `Model`, so it is checkpointed, moved and converted (SyncBatchNorm) with everything else, and never seen by
the optimizer (`requires_grad=False`). It runs in the root's mode: in training, BatchNorm layers use batch
statistics and keep their own running statistics, as BYOL's target does; only parameters are averaged. It has no
dropout and no stochastic depth (`deterministic`), as DINO's, iBOT's and DINOv2's teachers.

The EMA functions take `(target, online)` module pairs and work under every launch. ZeRO-3: each pair is
gathered (`full_parameters`) while it is read or written. FSDP2: a copy of online modules is sharded like them
(`framework.sharding`: the same blocks, then the encoder's copy, then the root), so the update runs shard by
shard (`local_shard`), with no gather.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import nn

from framework.distributed import full_parameters
from framework.sharding import local_shard

if TYPE_CHECKING:
    from framework.recipe.schema import Recipe

Pairs = Sequence[tuple[nn.Module, nn.Module]]  # (target module, online module)
EncoderChoice = Literal["student", "teacher"]  # which encoder `augssl eval` and `augssl export` read


class Teacher(nn.Module):
    """Frozen copies of online modules, `plugins[<plugin>][<module>]`, and a buffer `initialised` that says
    whether the online weights were copied in (`initialise`): the flag is checkpointed, so a resumed run keeps the
    teacher it loaded."""

    initialised: torch.Tensor

    def __init__(self, online: Mapping[str, Mapping[str, nn.Module]]) -> None:
        super().__init__()
        mirrored = {
            plugin: {name: copy.deepcopy(module) for name, module in mods.items()} for plugin, mods in online.items()
        }
        self.plugins = nn.ModuleDict({plugin: nn.ModuleDict(mods) for plugin, mods in mirrored.items()})
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.requires_grad_(False)
        deterministic(self)

    def pairs(self, online: nn.ModuleDict) -> list[tuple[nn.Module, nn.Module]]:
        """`(teacher copy, online module)` for every mirrored module; `online` is `Model.plugins`."""
        return [
            (module, cast(nn.ModuleDict, online[plugin])[name])
            for plugin, mods in self.plugins.items()
            for name, module in cast(nn.ModuleDict, mods).items()
        ]

    @torch.no_grad()
    def initialise(self, online: nn.ModuleDict) -> None:
        """The online weights, copied in unless a resumed checkpoint's teacher already holds its own."""
        initialise_targets(self.pairs(online), self.initialised)

    @torch.no_grad()
    def update(self, online: nn.ModuleDict, momentum: float) -> None:
        """One EMA step towards the online weights (after an optimizer step)."""
        update_targets(self.pairs(online), momentum)


def evaluated_encoder(recipe: Recipe, has_teacher: bool, choice: EncoderChoice | None = None) -> EncoderChoice:
    """Which encoder `augssl eval` and `augssl export` read: `choice` (their `--encoder`), else the recipe's
    `teacher.evaluate`, else the plugins' choice (`teacher` when a plugin section's class says
    `evaluate_teacher = True`); `teacher` only when the run has one (`has_teacher`: `Model.teacher` is built),
    else `student`. ValueError for `choice="teacher"` on a run without a teacher."""
    if choice == "teacher" and not has_teacher:
        raise ValueError(
            "--encoder teacher: this run has no EMA teacher (no plugin of its recipe asks for one, hook "
            "teacher_modules); give --encoder student or leave --encoder out"
        )
    if choice is not None:
        return choice
    default = recipe.teacher.evaluate
    if default is None:
        wanted = any(getattr(type(section), "evaluate_teacher", False) for section in recipe.plugins.values())
        default = "teacher" if wanted else "student"
    return default if has_teacher else "student"


def deterministic(module: nn.Module) -> None:
    """Switch off `module`'s stochastic regularisers, whatever its mode: dropout (`nn.Dropout*`: p = 0) and
    stochastic depth (timm's `DropPath` and any module with a float `drop_prob`: 0). A teacher is built without
    them (DINO, iBOT, DINOv2 create theirs with no drop path) and yet runs in train mode (BYOL's BatchNorm
    uses batch statistics)."""
    for sub in module.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd):
            sub.p = 0.0
        elif isinstance(getattr(sub, "drop_prob", None), float):
            setattr(sub, "drop_prob", 0.0)  # noqa: B010  (a plain attribute: typed as a tensor or module)


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
    `Teacher.initialised`) is set, then set it.

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
