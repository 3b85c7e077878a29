"""FSDP2 (`torch.distributed.fsdp.fully_shard`): the model sharded over the ranks, block by block.

Launched with `accelerate launch --config_file launch/accelerate/fsdp2.yaml` (or `--use_fsdp
--fsdp_version 2`). Accelerate 1.15 drives FSDP2 only on accelerator devices (its FSDP path starts
from MULTI_GPU) and picks its units by class name or parameter count; augssl shards the model
itself, the same way on GPUs (NCCL) and CPUs (gloo), so the tests run the code path the GPUs run.
Accelerate then starts the processes and reduces the vote, and nothing wraps the model in DDP.

The units, innermost first (`shard`):

1. every block a plugin lists (`shard_blocks`: a ViT's transformer blocks, a ResNet's stages), and
   the same blocks of every copy of the module holding them (an EMA target made with
   `copy.deepcopy(encoder)`): one all-gather before the block's forward, freed after it
   (`distributed.fsdp.reshard_after_forward`). Under bf16 their parameters are cast to bf16 for
   compute (FSDP2's `MixedPrecisionPolicy`): half the all-gather traffic;
2. the encoder and each copy of it, so that the encoder runs outside the root's forward (the
   online k-NN) and an EMA reads and writes matching shards;
3. the root `Model`: every head, projector and decoder, in float32 parameters under autocast like
   DDP, so the float32 islands of `framework.precision` stay float32.

The master weights, the gradients' reduction (a reduce-scatter, averaged like DDP's all-reduce)
and the optimizer state are float32, each rank holding 1/N of them. Buffers (BatchNorm's
statistics) are not sharded: rank 0's are broadcast before every forward, as DDP does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from framework.distributed import FSDPOptions


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this rank holds: its shard if it is a DTensor (an FSDP2 parameter), else itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` is an FSDP2 unit: its forward all-gathers its shards, a collective every rank must join."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _signature(module: nn.Module) -> tuple[Any, ...]:
    """What makes a module a copy of another: its class and its tensors' names and shapes."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return (type(module), tuple((name, tuple(t.shape)) for name, t in tensors))


def copies(model: nn.Module, original: nn.Module) -> list[nn.Module]:
    """The modules of `model` other than `original` that are copies of it (`_signature`), outermost only."""
    want, found = _signature(original), cast(list[nn.Module], [])
    for module in model.modules():
        if module is original or type(module) is not type(original):
            continue
        if any(module in list(outer.modules()) for outer in found):
            continue
        if _signature(module) == want:
            found.append(module)
    return found


@dataclass
class Units:
    """The modules sharded (or checkpointed) on their own, innermost first."""

    blocks: list[nn.Module]  # every listed block and its copies
    holders: list[nn.Module]  # the encoder, the plugins' modules holding blocks, and their copies


def find_units(
    model: nn.Module,
    own: Mapping[str, Mapping[str, nn.Module]],
    listed: Mapping[str, list[nn.Module]],
    encoder: nn.Module,
) -> Units:
    """The blocks each plugin listed (`shard_blocks`, in `listed`) found in its `own` modules, with the same
    blocks of every copy of the module holding them; the holders, with the encoder always among them."""
    blocks: list[nn.Module] = []
    holders: list[nn.Module] = []
    for plugin, plugin_blocks in listed.items():
        for holder in own[plugin].values():
            paths = [name for name, m in holder.named_modules() if any(m is b for b in plugin_blocks) and name]
            if not paths:
                continue
            for copy in [holder, *copies(model, holder)]:
                blocks.extend(copy.get_submodule(path) for path in paths)
                holders.append(copy)
    for copy in [encoder, *copies(model, encoder)]:
        if not any(copy is h for h in holders):
            holders.append(copy)
    return Units(blocks, holders)


def checkpoint_activations(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations in its backward instead of keeping them (names unchanged)."""
    from torch.distributed._composable import checkpoint

    for block in blocks:
        checkpoint(block)


def _autocast_forward(module: nn.Module, device_type: str) -> None:
    """Run `module`'s forward under bf16 autocast with float32 outputs, as Accelerate does to the model it
    prepares (here nothing is prepared: FSDP2 replaces DDP)."""
    from accelerate.utils import convert_outputs_to_fp32

    forward = module.forward
    module.forward = convert_outputs_to_fp32(torch.autocast(device_type, dtype=torch.bfloat16)(forward))


def _own_output(module: nn.Module, args: Any, output: Any) -> Any:
    """An encoder's output that is a view (a ViT's class token `x[:, 0]`, a flattened pool, its patch tokens) as a
    tensor of its own: FSDP2's backward hook on a unit's output is lost if a plugin edits a view of it in place."""
    if isinstance(output, tuple):
        return tuple(_own_output(module, args, part) for part in output)
    if isinstance(output, torch.Tensor) and output._base is not None:
        return output.clone()
    return output


def _broadcast_before_forward(module: nn.Module, *_: Any) -> None:
    """DDP's buffer broadcast before every training forward."""
    if module.training:
        broadcast_buffers(module)


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers to every rank, one broadcast per dtype: DDP does this before every forward, and a
    checkpoint then holds what every rank's next forward would use. A collective."""
    if dist.get_world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for tensors in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(flat, src=0)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(part.view_as(t))


def shard(model: nn.Module, units: Units, device: torch.device, precision: str, options: FSDPOptions) -> None:
    """Apply FSDP2 to `units` and then to `model` (the root), in place.

    Every rank must call it (it is a collective: each rank keeps its 1/N of every parameter). Call
    before building the optimizer, which must hold the sharded parameters (DTensors).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = precision == "bf16"
    common: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": options.reshard_after_forward,
        "offload_policy": CPUOffloadPolicy() if options.cpu_offload else OffloadPolicy(),
    }
    # under bf16 the blocks compute in bf16 and every gradient is reduced in float32; else in the parameters' dtype
    reduce = torch.float32 if bf16 else None
    float32 = MixedPrecisionPolicy(reduce_dtype=reduce)
    blocks = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=reduce)
    for block in units.blocks:
        fully_shard(block, mp_policy=blocks, **common)
    for holder in units.holders:
        holder.register_forward_hook(_own_output)  # before FSDP2's own hook, which checks the output
        fully_shard(holder, mp_policy=float32, **common)
        if bf16:
            _autocast_forward(holder, device.type)
    fully_shard(model, mp_policy=float32, **common)  # FSDP2 keeps the root gathered after forward: backward needs it
    if bf16:
        _autocast_forward(model, device.type)
    if dist.get_world_size() > 1 and any(True for _ in model.buffers()):
        model.register_forward_pre_hook(_broadcast_before_forward)


@contextmanager
def root_gathered(model: nn.Module) -> Iterator[None]:
    """A block in which the root unit's parameters (the heads, which FSDP2 gathers only for the root's own
    forward) are whole, so the model's hooks may run outside its forward (the online k-NN's `encode`); the
    encoder and its blocks gather themselves. A collective; elsewhere (not sharded) an ordinary block."""
    if not is_sharded(model):
        yield
        return
    model.unshard()  # type: ignore[operator]  # FSDPModule's
    try:
        yield
    finally:
        model.reshard()  # type: ignore[operator]


def describe(units: Units, options: FSDPOptions, checkpointing: bool) -> str:
    """The start-up line's words for the sharding."""
    ranks = dist.get_world_size()
    words = [
        f"FSDP2 over {ranks} rank{'s' if ranks != 1 else ''}: {len(units.blocks)} blocks, "
        f"{len(units.holders)} holders and the root",
        "resharded after forward" if options.reshard_after_forward else "kept gathered after forward",
    ]
    if options.cpu_offload:
        words.append("parameters offloaded to the CPU")
    if checkpointing:
        words.append("activation checkpointing per block")
    return ", ".join(words)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the sharded `model`, whole, in float32 on the CPU, on rank 0 (empty elsewhere).
    A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's and the optimizer's state as this rank holds them (DTensors keyed by parameter name), for
    `torch.distributed.checkpoint`, which writes each rank's shards and reshards them on load."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put `state` (as `sharded_state` gave it, filled by `torch.distributed.checkpoint.load`) back."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


@contextmanager
def one_rank_group(fsdp: bool) -> Iterator[None]:
    """A block with a one-rank process group for a one-process FSDP2 launch (FSDP2 shards over a device mesh,
    and Accelerate starts no group for one process), left at its end; elsewhere an ordinary block."""
    if not fsdp or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():  # Accelerate's end_training leaves it too
            dist.destroy_process_group()
