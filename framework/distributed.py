"""Everything that knows about processes: ranks, the Accelerator, cross-rank gathers.

Plugins may use `rank()`, `world_size()`, `gather_with_grad()`, `all_reduce()` and `full_parameters()`
from here, and nothing else distributed. Only this module and the engine touch Accelerate.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState

    from framework.recipe.schema import DataConfig, DistributedConfig, OptimConfig, TrainConfig


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward gives each rank the sum over ranks of the gradient of its rows."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # never the caller's tensor: it is reduced in place
        dist.all_reduce(grad)  # every rank's gradient of every row, summed
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (the same shape on every rank) from every rank along dim 0, gradients flowing back
    to each rank.

    The backward sums the gradients of every rank's copy of a rank's rows (lightly issue 1528 was a gather
    that did not), as lightly's and solo-learn's `GatherLayer`; it is written here because torch's
    `torch.distributed.nn.functional.all_gather` warns that it is deprecated on every call.
    """
    if world_size() == 1 or not dist.is_initialized():
        return tensor
    return _GatherWithGrad.apply(tensor.contiguous())


@torch.no_grad()
def all_reduce(tensor: torch.Tensor, op: Literal["sum", "mean", "max", "min"] = "mean") -> torch.Tensor:
    """`tensor` reduced element-wise over every rank, as a new tensor without gradient (`tensor` is left alone):
    a statistic every rank must agree on, such as DINO's centre (the mean of the teacher's outputs over the
    global batch) or a metric. In one process, a copy of `tensor`."""
    if op not in ("sum", "mean", "max", "min"):
        raise ValueError(f"all_reduce: op must be sum, mean, max or min, got {op!r}")
    if op == "mean" and not tensor.is_floating_point():
        raise ValueError(f"all_reduce: the mean of a {tensor.dtype} tensor; reduce a float tensor (or 'sum' a count)")
    out = tensor.detach().clone()
    if world_size() > 1 and dist.is_initialized():
        reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        dist.all_reduce(out, op=reduce_op.get(op, dist.ReduceOp.MIN))
        if op == "mean":
            out /= world_size()
    return out


def full_parameters(*modules: torch.nn.Module, modify: bool = False) -> AbstractContextManager:
    """A block in which `modules` hold their full parameters, on every rank.

    Under DeepSpeed ZeRO-3 each rank holds only a partition of every parameter: outside the
    module's own forward, `param` is an empty placeholder, so reading or updating it (an EMA,
    copying weights) silently does nothing. This gathers them; it is a collective (every rank
    must enter), and with `modify=True` the values rank 0 holds on exit are partitioned back.
    Elsewhere (DDP, ZeRO-1/2, one process) it does nothing.
    """
    params = [p for module in modules for p in module.parameters()]
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return GatheredParameters(params, modifier_rank=0 if modify else None)


class CollectiveTimeout(RuntimeError):
    """A collective whose other ranks did not answer within `distributed.timeout_seconds`, or died."""


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Name the collective inside: a gloo timeout, or a peer that closed its connection (a dead rank),
    becomes one line saying which rank waited for what. (NCCL's own watchdog aborts the process
    with its message instead, which names the rank and the operation.)"""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc).lower()
        if "timed out" in text or "timeout" in text:
            why = "the other ranks did not answer within distributed.timeout_seconds"
        elif "connection closed" in text or "connection reset" in text:
            why = "another rank died (see its log)"
        else:
            raise
        raise CollectiveTimeout(f"rank {rank()} of {world_size()}: {what}: {why}") from None


def leave_process_group() -> None:
    """Leave the launch's process group, if any, before the interpreter ends: a gloo process that exits
    with it still up may abort at finalization ("terminate called without an active exception",
    exit -6) and fail a launch that succeeded (pytorch/pytorch#190489)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def ends_without_finalizing(env: Mapping[str, str] = os.environ) -> Iterator[None]:
    """The main block of a process of a multi-process launch (`WORLD_SIZE` > 1): the process then ends
    with the block's status (0; a SystemExit's code; 1 after an exception's traceback), once its
    process group is left, the atexit handlers have run and the streams are flushed, without the
    interpreter's finalization. One process: an ordinary block.

    Finalization can abort a process whose work succeeded: objects holding gloo's or DeepSpeed's
    collective work and threads are then destroyed while the interpreter is torn down ("terminate
    called without an active exception", SIGABRT), and the launcher fails the whole launch (about
    once per slow test tier, after ZeRO-3 runs that had checkpointed their last step; see
    pytorch/pytorch#190489 and pytorch/pytorch#179291)."""
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    status = 1
    try:
        yield
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    leave_process_group()
    atexit._run_exitfuncs()  # what a normal exit runs first (logging's flush, multiprocessing's children)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _deepspeed_without_transformers() -> None:
    """Accelerate 1.15 builds `transformers`' HfDeepSpeedConfig whenever DeepSpeed is set up.

    That object only serves transformers' own `zero.Init` model construction; without
    transformers installed the import raises PackageNotFoundError. augssl builds no
    transformers models, so the hook is skipped when transformers is absent.
    """
    if importlib.util.find_spec("transformers") is None:
        from accelerate.utils import DeepSpeedPlugin

        DeepSpeedPlugin.set_deepspeed_weakref = lambda self: None


def global_batch(data: DataConfig, cfg: DistributedConfig, processes: int) -> int:
    """Images per optimizer step over every process: `data.batch_size` x processes x accumulation steps."""
    return data.batch_size * processes * cfg.accumulation_steps


def deepspeed_config(
    cfg: DistributedConfig, data: DataConfig, optim: OptimConfig, env: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    """The recipe's `distributed.deepspeed` section as a full DeepSpeed config (with the per-process batch
    of `data`; `optim`'s optimizer is checked against ZeRO).

    Batch sizes are always explicit (there is no prepared dataloader to infer them). A
    recipe without `zero_optimization` takes the stage and offload devices that `accelerate
    launch` was given (`--zero_stage`, `--offload_*_device` or a config file's
    `deepspeed_config`), so the same recipe runs under ZeRO-2 or ZeRO-3 by launch config alone.
    """
    ds = dict(cfg.deepspeed or {})
    ds["train_micro_batch_size_per_gpu"] = data.batch_size
    ds["gradient_accumulation_steps"] = cfg.accumulation_steps
    if "zero_optimization" not in ds:
        zero: dict[str, Any] = {"stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))}
        for what in ("optimizer", "param"):
            device = env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what.upper()}_DEVICE", "none").lower()
            if device != "none":
                zero[f"offload_{what}"] = {"device": device}
        ds["zero_optimization"] = zero
    # DeepSpeed 0.19 clips at norm 1.0 unless told otherwise; DDP clips only when the recipe says
    ds["gradient_clipping"] = cfg.grad_clip or 0.0
    if ds["zero_optimization"].get("stage", 2) == 0:
        # stage 0 steps a plain torch optimizer with no overflow check: a skipped step's NaN would reach
        # the weights (augssl drops a DeepSpeed window through that check); stage 0 is DDP anyway
        raise ValueError("DeepSpeed ZeRO stage 0: launch without DeepSpeed (DDP) instead, or use stage 1-3")
    if optim.optimizer == "lars":
        # ZeRO hands the optimizer one flat shard per param group and rank: LARS' norms would be the shard's
        raise ValueError(
            "distributed: DeepSpeed ZeRO would step LARS on flat shards: optim.optimizer=lars runs under DDP"
        )
    offload = ds["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
    if offload != "none" and optim.optimizer not in ("adam", "adamw"):
        # Accelerate replaces any optimizer by DeepSpeedCPUAdam under optimizer offload.
        raise ValueError(
            f"distributed: optimizer offload ({offload}) runs DeepSpeed's CPU Adam, not "
            f"optim.optimizer={optim.optimizer}: use adam/adamw or drop offload_optimizer"
        )
    precision = mixed_precision(cfg, env)
    recipe_sets_precision = any(k in ds for k in ("bf16", "fp16", "torch_autocast"))
    if precision == "fp16" and not recipe_sets_precision:
        # DeepSpeed's fp16 mode casts parameters, not inputs; under torch_autocast fp16 its ZeRO
        # optimizers return on an overflow before the grad scaler's update, so the scale never drops.
        raise ValueError("DeepSpeed with fp16: use bf16 (GPUs since A100), or fp16 without DeepSpeed (DDP)")
    if precision == "bf16" and not recipe_sets_precision:
        # DeepSpeed's own bf16 mode casts the parameters but neither the inputs nor the buffers (a conv
        # fails on float inputs, BatchNorm's statistics clash); torch_autocast keeps float32 weights and
        # runs each op in the precision autocast chooses, like DDP.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    ds.setdefault("bf16", {"enabled": False})
    ds.setdefault("fp16", {"enabled": False})
    return ds


def mixed_precision(cfg: DistributedConfig, env: Mapping[str, str] = os.environ) -> str:
    """The precision in force: the recipe's `distributed.mixed_precision` when it sets one, else the
    launch's (`accelerate launch --mixed_precision`, its config file: ACCELERATE_MIXED_PRECISION), else "no"."""
    if cfg.mixed_precision is not None:
        return cfg.mixed_precision
    launched = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched not in ("no", "bf16", "fp16"):
        raise ValueError(f"accelerate launch --mixed_precision {launched}: augssl trains in no, bf16 or fp16")
    return launched


def _launch_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """An `accelerate launch` flag (`true`/`false`, any case) in `env`, else `default`."""
    return env.get(name, str(default)).lower() == "true"


def using_deepspeed(env: Mapping[str, str] = os.environ) -> bool:
    """True under `accelerate launch --use_deepspeed` (or a DeepSpeed config file)."""
    return _launch_flag(env, "ACCELERATE_USE_DEEPSPEED", False)


FSDP_LAUNCHED = "AUGSSL_FSDP"  # set once `build_accelerator` has consumed Accelerate's FSDP flag


def using_fsdp(env: Mapping[str, str] = os.environ) -> bool:
    """True under `accelerate launch --use_fsdp` (or an FSDP config file); `check_fsdp` refuses FSDP1."""
    return any(_launch_flag(env, flag, False) for flag in ("ACCELERATE_USE_FSDP", FSDP_LAUNCHED))


@dataclass(frozen=True)
class FSDPOptions:
    """How the units are sharded: the recipe's `distributed.fsdp`, else the launch's FSDP fields."""

    reshard_after_forward: bool
    cpu_offload: bool


def fsdp_options(cfg: DistributedConfig, env: Mapping[str, str] = os.environ) -> FSDPOptions:
    """The sharding options in force: the recipe's where it sets them, else the launch's, else FSDP2's defaults."""
    reshard, offload = cfg.fsdp.reshard_after_forward, cfg.fsdp.cpu_offload
    return FSDPOptions(
        _launch_flag(env, "FSDP_RESHARD_AFTER_FORWARD", True) if reshard is None else reshard,
        _launch_flag(env, "FSDP_OFFLOAD_PARAMS", False) if offload is None else offload,
    )


def activation_checkpointing(cfg: DistributedConfig, env: Mapping[str, str] = os.environ) -> bool:
    """Whether the blocks recompute their activations in backward: the recipe's, else the launch's."""
    setting = cfg.activation_checkpointing
    return _launch_flag(env, "FSDP_ACTIVATION_CHECKPOINTING", False) if setting is None else setting


def check_fsdp(cfg: DistributedConfig, precision: str, env: Mapping[str, str] = os.environ) -> None:
    """Raise ValueError (one line) if the recipe cannot run under this FSDP launch."""
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(
            f"accelerate launch with FSDP version {version}: augssl shards with FSDP2 "
            "(fsdp_version: 2 in the config file, or --fsdp_version 2)"
        )
    if precision == "fp16":
        # FSDP2 has no sharded grad scaler that Accelerate drives; fp16 needs one
        raise ValueError("FSDP2 with fp16: use bf16 (GPUs since A100), or fp16 without FSDP (DDP)")
    if fsdp_options(cfg, env).cpu_offload and not torch.cuda.is_available():  # it pins the offloaded shards
        raise ValueError(
            "distributed.fsdp.cpu_offload without a GPU: offloading parameters to the CPU needs one "
            "(set distributed.fsdp.cpu_offload=false, or fsdp_offload_params: false in the launch config)"
        )


def check_launch(
    cfg: DistributedConfig, data: DataConfig, optim: OptimConfig, env: Mapping[str, str] = os.environ
) -> None:
    """Raise ValueError (one line) if the recipe's sections cannot run under this launch; starts nothing."""
    precision = mixed_precision(cfg, env)
    if using_deepspeed(env):
        deepspeed_config(cfg, data, optim, env)
    if using_fsdp(env):
        check_fsdp(cfg, precision, env)


def speed_settings(cfg: DistributedConfig, train: TrainConfig, device_type: str) -> dict[str, bool]:
    """The speed settings in force on a `device_type` ("cuda", "cpu"): the recipe's, GPU-only ones off elsewhere."""
    cuda = device_type == "cuda"
    return {
        "channels_last": cuda if cfg.channels_last is None else cfg.channels_last,
        "tf32": cuda and cfg.tf32,
        "cudnn_benchmark": cuda and cfg.cudnn_benchmark,
        "compile": train.compile,
    }


def apply_speed_settings(
    model: torch.nn.Module, settings: dict[str, bool], units: Iterable[torch.nn.Module] = ()
) -> dict[str, bool]:
    """Apply `speed_settings` to the process and to `model` (before `accelerator.prepare`), compiling
    each of `units` (in place, so state_dict keys and checkpoints stay the same); returns them."""
    if torch.cuda.is_available():
        precision = "tf32" if settings["tf32"] else "ieee"
        # torch's annotations of the replaced cudnn module leave out `conv` (a CudnnModule attribute)
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = precision  # type: ignore[attr-defined]
        torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]
    if settings["channels_last"]:
        model.to(memory_format=torch.channels_last)
    if settings["compile"]:
        for unit in units:
            unit.compile()
    return settings


class Threads(NamedTuple):
    """torch's intra-op threads for this process, and why (the start-up line's words)."""

    number: int
    why: str

    def line(self) -> str:
        return f"augssl: {_plural(self.number, 'intra-op thread')} ({self.why})"


def _plural(n: int, word: str, plural: str = "") -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def choose_threads(
    setting: int | None, workers: int, cores: int, env: Mapping[str, str] = os.environ, current: int | None = None
) -> Threads:
    """torch's intra-op threads for one process: the recipe's `setting`, else `OMP_NUM_THREADS` (which torch
    has already applied), else the `cores` this process may use shared by the processes on this machine
    (`LOCAL_WORLD_SIZE`), less its `workers` data workers (each a process busy decoding), at least 1.

    torch's default, one thread per core whatever else runs, oversubscribes a small machine: its OpenMP
    threads spin while the data workers wait for a core (a 1-process Fashion-MNIST run on 2 loaded cores with
    2 workers trained at 64-78 images/s with 2 threads, 207-209 with 1). `current` is torch's thread count, which
    OMP_NUM_THREADS set when torch was imported.
    """
    if setting is not None:
        return Threads(setting, f"distributed.intra_op_threads={setting}")
    if env.get("OMP_NUM_THREADS"):
        return Threads(current or 1, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
    processes = max(1, int(env.get("LOCAL_WORLD_SIZE") or 1))
    count = max(1, cores // processes - workers)
    shared = f", {_plural(processes, 'process', 'processes')} on this machine" if processes > 1 else ""
    return Threads(count, f"{_plural(cores, 'core')}{shared}, {_plural(workers, 'data worker')}; OMP_NUM_THREADS unset")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a Slurm or taskset allocation), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(cfg: DistributedConfig, data: DataConfig) -> Threads:
    """Choose this process's intra-op threads (`choose_threads`) and set them; the start-up line prints it."""
    threads = choose_threads(cfg.intra_op_threads, data.num_workers, usable_cores(), current=torch.get_num_threads())
    torch.set_num_threads(threads.number)
    return threads


def cpu_only_multiprocess() -> bool:
    """True for a multi-process launch on a machine without CUDA.

    Accelerate 1.15 only selects MULTI_CPU (gloo) when told `cpu=True`; otherwise a
    CPU-only `accelerate launch --multi_gpu` silently runs N independent processes.
    """
    return int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available()


def process_state() -> PartialState:
    """This process's place in the launch outside training (evaluation): its rank, the number of
    processes, its device. Inside a run it is the Accelerator's own state."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_only_multiprocess())


def init_restarted_group(timeout: timedelta, env: Mapping[str, str] = os.environ) -> bool:
    """Initialise the process group of a restarted elastic attempt in a key space of its own.

    torchrun's agent serves one TCPStore for every attempt, and the default group's keys (each rank's
    gloo/NCCL address) from the failed attempt are still in it: a new rank that reads a dead peer's
    address before the peer rewrites it fails to connect ("Connection refused"). Accelerate (and
    DeepSpeed) then find the group initialised and use it. Returns whether it initialised one.
    """
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or dist.is_initialized() or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return False
    world = int(env["WORLD_SIZE"])
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(env.get("LOCAL_RANK", 0)))
    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        timeout=timeout,
        rank=int(env["RANK"]),
        world_size=world,
        store=dist.PrefixStore(f"augssl/attempt_{attempt}", store),
    )
    return True


def build_accelerator(
    cfg: DistributedConfig, data: DataConfig, optim: OptimConfig, output_dir: str, log_with: list[str] | None = None
) -> Accelerator:
    """The Accelerator for a recipe's sections, logging to `output_dir`; DDP, DeepSpeed or FSDP2 is chosen by
    `accelerate launch`. Under FSDP2 the processes run as for DDP and the engine shards the model itself
    (`framework.sharding`): Accelerate's own FSDP path would take over on GPUs, so its flag is consumed."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
    from accelerate.utils import DeepSpeedPlugin, ProjectConfiguration

    deepspeed_plugin = None
    group: dict[str, Any] = {"timeout": timedelta(seconds=cfg.timeout_seconds)}
    init_restarted_group(group["timeout"])
    if using_fsdp():
        check_fsdp(cfg, mixed_precision(cfg))
        os.environ["ACCELERATE_USE_FSDP"] = "false"  # consumed: framework.sharding shards the model
        os.environ[FSDP_LAUNCHED] = "true"
    if using_deepspeed():
        _deepspeed_without_transformers()
        ds_config = deepspeed_config(cfg, data, optim)
        # A launch config file's deepspeed fields are now in `ds_config`; Accelerate would refuse
        # them beside an explicit DeepSpeed config ("will be ignored"), so they are marked consumed.
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
        if not torch.cuda.is_available():
            # `cpu=True` would drop DeepSpeed (Accelerate then picks MULTI_CPU); without it and
            # without a device Accelerate finds no backend and runs every rank as rank 0 of 1.
            # Naming gloo makes DeepSpeed's CPU accelerator initialise the process group.
            group["backend"] = "gloo"
    return Accelerator(
        cpu=cpu_only_multiprocess() and deepspeed_plugin is None,
        # under DeepSpeed the precision is in `ds_config` (torch_autocast)
        mixed_precision="no" if deepspeed_plugin is not None else mixed_precision(cfg),
        gradient_accumulation_steps=cfg.accumulation_steps,
        step_scheduler_with_optimizer=False,  # the engine steps the schedule once per optimizer step
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=output_dir),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters),
            InitProcessGroupKwargs(**group),
        ],
        deepspeed_plugin=deepspeed_plugin,
    )
