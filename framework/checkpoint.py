"""Checkpoints: `accelerator.save_state` + step + data position + resolved recipe.

A checkpoint is written to `checkpoints/step_<N>.tmp/` and renamed to `step_<N>/`
only once every rank has finished writing, so a kill during a save leaves the
previous checkpoint intact; an unfinished `.tmp` folder is never loaded.

Every checkpoint has the full model (parameters and buffers) in `model.safetensors`, with
the model's state_dict names: Accelerate writes it under DDP; under DeepSpeed (whose own
partitioned files are in `pytorch_model/`) rank 0 consolidates the fp32 weights from those
files into it, for any ZeRO stage; under FSDP2 (every rank's shards of the model and the
optimizer in `sharded/`, written by `torch.distributed.checkpoint`) rank 0 gathers it from the
shards; so `augssl eval` and `augssl export` read every run alike;
`load_run` rebuilds a run's model from a checkpoint's resolved recipe and those weights, both
checked against `checksums.json` as they are read (the newest intact checkpoint by default); a
checkpoint pruned by the run training in the folder while it is read is no fault: the newest is read.

Resuming on another number of processes works under DDP and FSDP2 (whose shards are resharded on
load): model, optimizer and schedule are restored, the data stream and every rank's RNG are
reseeded with `train.seed + step`, and with `optim.lr_scaling: linear` the new global batch's lr
replaces the saved one. DeepSpeed cannot re-split its partitioned optimizer state, so there (and
between DDP, FSDP2 and DeepSpeed) a resume stops with a one-line `CheckpointError` before anything
is loaded.

Integrity: rank 0 writes `checksums.json` (size and BLAKE2b of every file of the folder) after
every rank has written its files and before `trainer_state.json`, the file that marks the
folder complete. `verify` checks one folder (sizes first, then hashes in 8 MiB chunks, files
in parallel); `framework.runfolder` verifies only the checkpoint it resumes from. Folders in
`checkpoints/` other than `step_<digits>` (`step_N.tmp`, `step_N.damaged`, `step_N.bak`, ...)
are never considered. A save that fails on any rank (a full disk) removes its `.tmp` folder,
keeps the earlier checkpoints and stops every rank with a one-line `CheckpointError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
import yaml
from safetensors.torch import load as safetensors_load

from framework.data.pipeline import augments_on_device
from framework.data.stream import StreamPosition
from framework.distributed import global_batch
from framework.model import Model
from framework.recipe.loading import RecipeError, as_written_now
from framework.startup import validate
from framework.teacher import EncoderChoice, evaluated_encoder

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.optim.lr_scheduler import LambdaLR

    from framework.recipe.schema import OptimConfig, Recipe, TrainConfig

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
DEEPSPEED_TAG = "pytorch_model"  # the folder (DeepSpeed "tag") Accelerate's save_state gives the engine
SHARDED_FOLDER = "sharded"  # FSDP2: the model's and optimizer's shards, written by torch.distributed.checkpoint
CHECKSUMS_FILE = "checksums.json"
_STEP_FOLDER = re.compile(r"step_(\d+)")  # a checkpoint's name; anything else in checkpoints/ is ignored
_CHUNK = 8 << 20  # bytes hashed per read


@dataclass
class Sharded:
    """An FSDP2 run's sharded model and its optimizer: saved and loaded with `torch.distributed.checkpoint`
    (every rank writes its shards; a load reshards them to this launch's ranks), beside what Accelerate saves."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer


@contextlib.contextmanager
def scheduler_and_rng_only(accelerator: Accelerator, sharded: Sharded | None) -> Iterator[None]:
    """Under FSDP2, a block in which Accelerate's save_state/load_state handle only the schedule and every
    rank's RNG: its optimizer save would write rank 0's shards alone (the model is not Accelerate's)."""
    if sharded is None:
        yield
        return
    optimizers, accelerator._optimizers = accelerator._optimizers, []
    try:
        yield
    finally:
        accelerator._optimizers = optimizers


def save_sharded(sharded: Sharded, folder: Path) -> None:
    """Every rank's shards of the model and the optimizer into `folder/sharded/`, and on rank 0 the whole
    model, float32, into `folder/model.safetensors` (what eval and export read). Two collectives."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from framework.sharding import broadcast_buffers, full_state_dict, sharded_state

    broadcast_buffers(sharded.model)  # rank 0's BatchNorm statistics, as every rank's next forward would take
    dcp.save(sharded_state(sharded.model, sharded.optimizer), checkpoint_id=str(folder / SHARDED_FOLDER))
    whole = full_state_dict(sharded.model)
    if whole:  # rank 0
        save_file({k: v.contiguous() for k, v in whole.items()}, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def load_sharded(sharded: Sharded, folder: Path) -> None:
    """The model's and the optimizer's shards for this rank, read from `folder/sharded/` (resharded when the
    checkpoint was written by another number of ranks). A collective."""
    import torch.distributed.checkpoint as dcp

    from framework.sharding import load_sharded_state, sharded_state

    state = sharded_state(sharded.model, sharded.optimizer)
    dcp.load(state, checkpoint_id=str(folder / SHARDED_FOLDER))
    load_sharded_state(sharded.model, sharded.optimizer, state)


class CheckpointError(RuntimeError):
    """A checkpoint this launch cannot continue; the message (one line) says what to do instead."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first: folders named `step_<digits>` holding their state file
    (`step_N.tmp`, `step_N.damaged`, `step_N.bak`, `step_x` and plain files are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    done = [
        (int(m[1]), p) for p in root.iterdir() if (m := _STEP_FOLDER.fullmatch(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(done)]


def find_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint `train.resume` points at: `auto` = newest complete, `never`/`fresh` = none, else a
    path (CheckpointError if it is not a complete checkpoint). Nothing is verified here (`verify`)."""
    if resume in ("never", "fresh"):
        return None
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        why = "no such folder" if not path.exists() else f"no {STATE_FILE}: an unfinished or foreign folder"
        raise CheckpointError(
            f"train.resume: {path} is not a complete checkpoint ({why}); "
            "give a checkpoints/step_<N> folder, or train.resume=auto"
        )
    return path


def saved_step(path: Path) -> int:
    """The step checkpoint `path` holds (its state file's)."""
    return int(json.loads((path / STATE_FILE).read_text())["step"])


def finite_weights(path: Path) -> bool:
    """Whether every floating-point tensor of checkpoint `path`'s weights is finite (read back)."""
    from safetensors import safe_open

    with safe_open(str(model_weights_file(path)), "pt") as f:
        tensors = (f.get_tensor(name) for name in f.keys())  # one at a time
        return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def last_good(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint that is intact (`verify`) and whose weights are all finite: the
    one to go back to after a run went non-finite."""
    for path in reversed(complete_checkpoints(output_dir)):
        with contextlib.suppress(Exception):  # unreadable weights are not good ones
            if verify(path) is None and finite_weights(path):
                return path
    return None


def _relative_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder (recursively) except the two written after the checksums."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (CHECKSUMS_FILE, STATE_FILE)
    )


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)  # hashlib releases the GIL: files hash in parallel threads
    return h.hexdigest()


def _digests(folder: Path, names: list[str]) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda name: _digest(folder / name), names))


def write_checksums(folder: Path) -> Path:
    """`folder/checksums.json`: the size and BLAKE2b-256 of every file in the folder."""
    names = _relative_files(folder)
    files = {
        n: {"bytes": (folder / n).stat().st_size, "blake2b": d}
        for n, d in zip(names, _digests(folder, names), strict=True)
    }
    out = folder / CHECKSUMS_FILE
    out.write_text(json.dumps({"algorithm": "blake2b-256", "files": files}, indent=1))
    return out


def verify(folder: Path) -> str | None:
    """None if checkpoint `folder` is intact, else what is wrong with it (a phrase naming the file).

    Checks the state file parses, every file in `checksums.json` is there with its size (cheap),
    then every file's hash.
    """
    try:
        json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} is unreadable ({exc.__class__.__name__})"
    listed = folder / CHECKSUMS_FILE
    if not listed.is_file():
        return f"{CHECKSUMS_FILE} is missing"
    try:
        files = json.loads(listed.read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"{CHECKSUMS_FILE} is unreadable ({exc.__class__.__name__})"
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if (size := path.stat().st_size) != info["bytes"]:
            return f"{name} has {size} bytes, {info['bytes']} were written"
    names = list(files)
    for name, digest in zip(names, _digests(folder, names), strict=True):
        if digest != files[name]["blake2b"]:
            return f"{name} does not match its checksum"
    return None


def _os_error(exc: BaseException) -> str:
    """One line for a failed write: `ENOSPC (No space left on device): <file>`."""
    if isinstance(exc, OSError) and exc.errno is not None:
        code = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{code} ({exc.strerror})" + (f": {exc.filename}" if exc.filename else "")
    return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _agree(accelerator: Accelerator, error: str | None, tmp: Path, output_dir: str | Path) -> None:
    """A barrier at which every rank learns whether any rank failed to write `tmp`; if one did, rank 0
    removes `tmp` and every rank raises the same CheckpointError (no rank is left waiting)."""
    errors = [error]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        errors = gather_object([error])
    failed = next((e for e in errors if e), None)
    if failed is None:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    kept = complete_checkpoints(output_dir)
    raise CheckpointError(
        f"checkpoint {tmp.name.removesuffix('.tmp')} could not be written ({failed}): removed {tmp}; "
        + (
            f"the previous checkpoints are kept (newest {kept[-1].name}, where train.resume=auto continues)"
            if kept
            else "there is no earlier checkpoint"
        )
        + "; free space (or fix the folder) and rerun"
    )


def launch_state(
    accelerator: Accelerator, global_batch: int, views_on_device: bool, fsdp: bool = False
) -> dict[str, Any]:
    """What a checkpoint records about the launch that wrote it: processes, DeepSpeed, its ZeRO stage, FSDP2,
    global batch, and where the views' photometric steps ran (`data.augment_on` as resolved on its device)."""
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    return {
        "world_size": accelerator.num_processes,
        "deepspeed": deepspeed,
        "zero_stage": accelerator.deepspeed_config["zero_optimization"]["stage"] if deepspeed else None,
        "fsdp": fsdp,
        "global_batch": global_batch,
        "views_on_device": views_on_device,
    }


def consolidate_deepspeed_weights(path: Path) -> Path:
    """Write `path/model.safetensors`: every parameter in fp32, gathered from the ZeRO partitions of all
    ranks that DeepSpeed wrote in `path/pytorch_model/` (stage 1-3), and every buffer (rank 0's)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    if not list((path / DEEPSPEED_TAG).glob("zero_pp_rank_*optim_states.pt")):  # stage 0: the whole module
        state = torch.load(path / DEEPSPEED_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = {name: t.float() if t.is_floating_point() else t for name, t in state["module"].items()}
    else:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DEEPSPEED_TAG)
    # the parameters are views of one flat vector per group; safetensors wants each its own storage
    tensors = {name: t.detach().clone().contiguous() for name, t in state.items()}
    out = path / WEIGHTS_FILE
    partial = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    save_file(tensors, str(partial), metadata={"format": "pt"})
    partial.replace(out)  # atomic: a reader never sees half a file
    return out


def save(
    accelerator: Accelerator,
    recipe: Recipe,
    step: int,
    position: StreamPosition,
    extra: dict[str, Any] | None = None,
    keep: Path | None = None,
    sharded: Sharded | None = None,
) -> Path:
    """Write checkpoint `step` from every rank; returns its final path. Then all but the newest
    `checkpoint.keep` are removed, except `keep` (the checkpoint an explicit `train.resume` named).
    `sharded`: an FSDP2 run's model and optimizer, written with `torch.distributed.checkpoint`."""
    root = checkpoint_root(recipe.output_dir)
    final = root / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    error = None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            error = _os_error(exc)
    _agree(accelerator, error, tmp, recipe.output_dir)
    try:
        with scheduler_and_rng_only(accelerator, sharded):
            accelerator.save_state(str(tmp))
        if sharded is not None:
            save_sharded(sharded, tmp)
        rank = accelerator.process_index
        (tmp / f"data_rank{rank}.json").write_text(json.dumps(position.state_dict()))
    except Exception as exc:  # noqa: BLE001  any rank's failure (safetensors wraps ENOSPC in its own error) stops all
        error = _os_error(exc)
    _agree(accelerator, error, tmp, recipe.output_dir)  # every rank has written its files
    if accelerator.is_main_process:
        try:
            processes = accelerator.num_processes
            on_device = augments_on_device(recipe.data.augment_on, accelerator.device)
            batch = global_batch(recipe.data, recipe.distributed, processes)
            launch = launch_state(accelerator, batch, on_device, fsdp=sharded is not None)
            if launch["deepspeed"]:
                consolidate_deepspeed_weights(tmp)  # every rank's partition is on disk now
            (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
            write_checksums(tmp)
            state = {"step": step, **launch, **(extra or {})}
            (tmp / STATE_FILE).write_text(json.dumps(state))  # last file: marks the folder complete
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except Exception as exc:  # noqa: BLE001
            error = _os_error(exc)
        else:
            for old in complete_checkpoints(recipe.output_dir)[: -recipe.checkpoint.keep]:
                if keep is None or old.resolve() != keep.resolve():
                    shutil.rmtree(old, ignore_errors=True)
    _agree(accelerator, error, tmp, recipe.output_dir)
    return final


def _describe(launch: dict[str, Any]) -> str:
    n = launch["world_size"]
    processes = f"{n} process{'es' if n != 1 else ''}"
    if launch.get("fsdp"):
        return f"{processes} of FSDP2"
    if not launch["deepspeed"]:
        return f"{processes} without DeepSpeed or FSDP2"
    return f"{processes} of DeepSpeed ZeRO-{launch['zero_stage']}"


def check_resumable(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise CheckpointError if a launch like `now` cannot continue the checkpoint whose trainer state is `saved`.

    DDP and FSDP2 continue at any world size (FSDP2's shards are resharded on load). DeepSpeed's optimizer
    state is partitioned per rank and stage, so a DeepSpeed checkpoint needs the same processes and stage, and no format
    loads into the other.
    """
    was, now_on = saved.get("views_on_device"), now.get("views_on_device")  # None: written before it was recorded
    if was is not None and now_on is not None and was != now_on:

        def where(on: bool) -> str:
            return "on the device" if on else "in the data workers"

        raise CheckpointError(
            f"checkpoint {path} augmented its views {where(was)}, this launch would augment them {where(now_on)} "
            f"(data.augment_on=auto follows the device), which changes the random stream: set "
            f"data.augment_on={'device' if was else 'workers'} to continue it, or start over (train.resume=fresh)"
        )
    same_stage = saved["zero_stage"] == now["zero_stage"]
    was_fsdp, is_fsdp = bool(saved.get("fsdp")), bool(now.get("fsdp"))  # absent: written before FSDP2 was
    if (
        was_fsdp == is_fsdp
        and saved["deepspeed"] == now["deepspeed"]
        and (not now["deepspeed"] or (saved["world_size"] == now["world_size"] and same_stage))
    ):
        return
    if was_fsdp:
        flags = "--use_fsdp --fsdp_version 2 (launch/accelerate/fsdp2.yaml), any --num_processes"
        why = "its model and optimizer are sharded with torch.distributed.checkpoint"
    elif saved["deepspeed"]:
        flags = f"--use_deepspeed --num_processes {saved['world_size']} --zero_stage {saved['zero_stage']}"
        why = "DeepSpeed cannot re-split its partitioned optimizer state"
    elif is_fsdp:
        flags, why = f"--num_processes {now['world_size']} without --use_fsdp", "FSDP2 reads sharded checkpoints only"
    else:
        flags, why = f"--num_processes {now['world_size']} without --use_deepspeed", "DeepSpeed cannot load it"
    raise CheckpointError(
        f"checkpoint {path} was written by {_describe(saved)}, this launch has {_describe(now)} ({why}): "
        f"relaunch with {flags}, or start over (train.resume=fresh, or another output_dir); "
        "augssl eval and augssl export read it as it is"
    )


def rebase_lr(scheduler: LambdaLR, base_lrs: list[float]) -> list[float] | None:
    """Give a restored LambdaLR `base_lrs` (one per param group) and its optimizer's groups the lr
    base x lr_lambda(step) they imply now; returns the replaced base lrs, or None if they were the same."""
    old = cast(list[float], list(scheduler.base_lrs))  # the groups' float lrs (torch allows tensors too)
    if len(old) == len(base_lrs) and all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(old, base_lrs, strict=True)):
        return None
    scheduler.base_lrs = list(base_lrs)
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
    return old


def load(
    accelerator: Accelerator,
    path: Path,
    train: TrainConfig,
    optim: OptimConfig,
    global_batch_size: int,
    views_on_device: bool,
    scheduler: Any = None,
    sharded: Sharded | None = None,
) -> tuple[dict[str, Any], StreamPosition | None]:
    """Restore model/optimizer/scheduler/RNG states; returns the trainer state and this rank's data position.

    Raises CheckpointError (before loading anything) if this launch cannot continue the
    checkpoint (`check_resumable`). The data position is None when the checkpoint was written by
    a different number of processes: the stream is then reseeded instead of continued, and so is
    every rank's RNG (`train.seed + step`; Accelerate has no saved state for a new rank). The
    schedule (`scheduler`, the engine's LambdaLR, maybe wrapped by Accelerate) keeps its step
    but takes this launch's base lrs, which differ after a world-size change under
    `optim.lr_scaling: linear` or a changed `optim.lr`; one line says so.
    """
    from accelerate.utils import set_seed

    state = json.loads((path / STATE_FILE).read_text())
    now = launch_state(accelerator, global_batch_size, views_on_device, fsdp=sharded is not None)
    check_resumable(path, state, now)
    lambda_lr = getattr(scheduler, "scheduler", scheduler)  # Accelerate's AcceleratedScheduler wraps it
    base_lrs = list(lambda_lr.base_lrs) if lambda_lr is not None else None  # this launch's, before the load
    with scheduler_and_rng_only(accelerator, sharded):
        accelerator.load_state(str(path))
    if sharded is not None:
        load_sharded(sharded, path)
    same_world = state.get("world_size") == accelerator.num_processes
    if not same_world:
        set_seed(train.seed + state["step"])
    if base_lrs is not None and (old := rebase_lr(lambda_lr, base_lrs)) is not None:
        accelerator.print(
            f"augssl: lr {old[0]:g} -> {base_lrs[0]:g} on resume (global batch "
            f"{state.get('global_batch', '?')} -> {now['global_batch']}, "
            f"optim.lr_scaling={optim.lr_scaling})"
        )
    rank_file = path / f"data_rank{accelerator.process_index}.json"
    if not same_world or not rank_file.is_file():
        return state, None
    return state, StreamPosition.from_state_dict(json.loads(rank_file.read_text()))


def model_weights_file(path: Path) -> Path:
    """The model's weights inside a checkpoint folder (`model.safetensors`, consolidated under DeepSpeed)."""
    if (path / WEIGHTS_FILE).is_file():
        return path / WEIGHTS_FILE
    raise FileNotFoundError(f"{path}: no model weights ({WEIGHTS_FILE}) in checkpoint")


# ---------------------------------------------------------------------------
# Reading a run's model (augssl eval, augssl export): verified, and safe beside a training run
# ---------------------------------------------------------------------------

PRUNE_GRACE_SECONDS = 10.0  # how long a folder missing a file is watched for a prune that removes it
_RELISTS = 20  # fresh looks at checkpoints/ after a checkpoint went away while it was read


class _Read(NamedTuple):
    """What `augssl eval` and `augssl export` read of a checkpoint, checked against its `checksums.json`."""

    path: Path
    recipe: str  # recipe.yaml
    weights: dict[str, torch.Tensor]


def _read_checked(path: Path) -> _Read | str:
    """Read `recipe.yaml` and the model weights of checkpoint `path`, each file whole and once, and check
    them against `checksums.json`; or what is wrong (a phrase naming the file, as `verify` says it).

    Only the files read are checked (the optimizer's state does not change the model). A file once
    opened is read to its end even if a prune unlinks it meanwhile; a file missing raises
    FileNotFoundError (the caller tells a prune from damage).
    """
    try:
        json.loads((path / STATE_FILE).read_bytes())
    except ValueError as exc:
        return f"{STATE_FILE} is unreadable ({exc.__class__.__name__})"
    try:
        listed = json.loads((path / CHECKSUMS_FILE).read_bytes())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{CHECKSUMS_FILE} is unreadable ({exc.__class__.__name__})"
    data = {n: (path / n).read_bytes() for n in ("recipe.yaml", WEIGHTS_FILE)}
    for n, blob in data.items():
        if n not in listed:
            return f"{n} is not in {CHECKSUMS_FILE}"
        if len(blob) != listed[n]["bytes"]:
            return f"{n} has {len(blob)} bytes, {listed[n]['bytes']} were written"
        if hashlib.blake2b(blob, digest_size=32).hexdigest() != listed[n]["blake2b"]:
            return f"{n} does not match its checksum"
    return _Read(path, data["recipe.yaml"].decode(), safetensors_load(data[WEIGHTS_FILE]))


def _read_or_gone(path: Path) -> _Read | str | None:
    """`_read_checked(path)`, or None if the folder went away (or was replaced by a new save of its
    step) while it was read: a prune of the run that trains in the folder, not damage.

    A prune removes the files one by one, then the folder: a file missing from a folder still there
    is damage only once the folder has stood for `PRUNE_GRACE_SECONDS` more.
    """

    def same_folder() -> bool:
        try:
            return path.stat().st_ino == inode
        except FileNotFoundError:
            return False

    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        return None
    try:
        got = _read_checked(path)
    except FileNotFoundError as exc:
        got = f"{Path(exc.filename or '?').name} is missing"
        deadline = time.monotonic() + PRUNE_GRACE_SECONDS
        while same_folder() and time.monotonic() < deadline:
            time.sleep(0.1)
    return got if isinstance(got, _Read) or same_folder() else None


def _pick_and_read(output_dir: Path, ckpt: str | Path | None) -> _Read:
    """The checkpoint `ckpt`, or the newest intact one of `output_dir`, read and verified.

    `ckpt` damaged or gone: CheckpointError. Newest: a damaged one is named in one line on stderr and
    the one before it is read (nothing is renamed: a reader leaves the run folder to its run); one
    that went away while read (pruned by the run training there) is no fault, the newest is read again.
    """
    if ckpt:
        path = Path(ckpt)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"--checkpoint {path}: not a complete checkpoint (no {STATE_FILE})")
        got = _read_or_gone(path)
        if got is None:
            raise CheckpointError(
                f"--checkpoint {path} went away while it was read (the run training in its folder pruned it); "
                "give a newer one, or leave --checkpoint out for the newest intact one"
            )
        if isinstance(got, str):
            raise CheckpointError(
                f"--checkpoint {path} is damaged ({got}); give another checkpoint, or leave --checkpoint out "
                "for the newest intact one"
            )
        return got
    for attempt in range(_RELISTS):
        done = complete_checkpoints(output_dir)
        if not done and attempt < 3:  # a listing that ran into a save's rename may miss every checkpoint
            time.sleep(0.1)
            continue
        damaged: list[tuple[Path, str]] = []
        for path in reversed(done):
            got = _read_or_gone(path)
            if got is None:
                break  # pruned: look again
            if isinstance(got, str):
                damaged.append((path, got))
                continue
            for bad, why in damaged:
                print(f"augssl: checkpoint {bad} is damaged ({why}): reading {path.name} instead", file=sys.stderr)
            return got
        else:
            if damaged:
                bad, why = damaged[0]
                raise CheckpointError(
                    f"every checkpoint in {checkpoint_root(output_dir)} is damaged (newest {bad.name}: {why}); "
                    "there is no intact one to read"
                )
            raise FileNotFoundError(f"{output_dir}: no complete checkpoint to read")
    raise CheckpointError(
        f"the checkpoints of {output_dir} went away {_RELISTS} times while they were read (a run there prunes "
        "them faster than they can be read: checkpoint.keep); give --checkpoint of one that stays"
    )


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """BLAKE2b-256 of a state dict (names, dtypes, shapes, values): `augssl eval` records its encoder's
    in eval.json, and `augssl export` shows only the accuracies of the encoder it writes."""
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name} {t.dtype} {list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_finite(module: torch.nn.Module, path: Path, what: str = "the encoder") -> None:
    """CheckpointError naming the first tensor of `module` (`what`: the encoder) holding NaN or infinity."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan, inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
            raise CheckpointError(
                f"checkpoint {path}: {what}'s {name} holds non-finite values ({nan} NaN, {inf} infinite of "
                f"{tensor.numel()}); evaluate or export an earlier checkpoint (--checkpoint)"
            )


def load_run(output_dir: str | Path, ckpt: str | Path | None = None) -> tuple[Model, Recipe, Path]:
    """Rebuild a run's model from its resolved recipe and load a checkpoint's weights (newest intact by
    default, see `_pick_and_read`); CheckpointError if its encoder holds a non-finite value.

    Under `accelerate launch` the main process reads the checkpoint and every rank receives it, so all
    build the same model (a run training in the folder may save and prune between two ranks' reads).
    """
    from framework.distributed import process_state

    state = process_state()
    got, error = None, None
    if state.is_main_process:
        try:
            got = _pick_and_read(Path(output_dir), ckpt)
        except (CheckpointError, FileNotFoundError) as exc:
            error = exc
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        got, error = broadcast_object_list([got, error], from_process=0)
    if error is not None:
        raise error
    assert got is not None
    try:
        recipe, hooks = validate(as_written_now(yaml.safe_load(got.recipe) or {}), check_data=False)
    except RecipeError as exc:  # e.g. a plugin it names is not installed here
        raise RecipeError(f"{got.path / 'recipe.yaml'}: {exc}") from None
    model = Model(hooks, recipe)
    model.load_state_dict(got.weights)
    _check_finite(model.encoder, got.path)
    return model.eval(), recipe, got.path


def load_encoder(
    output_dir: str | Path, ckpt: str | Path | None = None, choice: EncoderChoice | None = None
) -> tuple[Model, Recipe, Path, EncoderChoice]:
    """`load_run`, and which of its encoders `augssl eval` and `augssl export` read (`evaluated_encoder`:
    `choice`, their `--encoder`, else the recipe's or the plugins' default; ValueError for `teacher` on a run
    without one); the teacher's is checked finite like the student's."""
    model, recipe, path = load_run(output_dir, ckpt)
    which = evaluated_encoder(recipe, model.teacher is not None, choice)
    if which == "teacher":
        _check_finite(model.encoder_of(which), path, "the EMA teacher's encoder")
    return model, recipe, path, which
