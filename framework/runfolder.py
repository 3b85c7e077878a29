"""One run per output folder: the lock, `train.resume` never/fresh/auto/path, and what a resume may change.

`open_run` (first thing `engine.train` does, before anything is written) and `resume_point`
(after the model is built, before anything is loaded or overwritten) are called by every rank:
rank 0 decides, every rank learns the decision by one broadcast, so a refusal stops all ranks
with the same one-line `CheckpointError` and none is left waiting at a collective.

- **The lock** `<output_dir>/.lock` (JSON: host, pid, start time) is taken by rank 0 with
  `fcntl.flock`: a second run aimed at a busy folder stops at once, naming the holder. The OS
  drops the lock when its process dies, so a lock left by a killed run is taken over (one
  line). It is released (and the file removed) when `train()` returns, and when the process
  ends; a later `train()` in the same process takes over its own earlier lock.
- **`train.resume`**: `auto` resumes from the newest checkpoint that verifies
  (`checkpoint.verify`); a damaged one is renamed `step_N.damaged` (never deleted) with one
  line, and the one before it is tried. A path must be a complete, intact checkpoint.
  `never` refuses a folder that already holds checkpoints; `fresh` moves everything in the
  folder into `<output_dir>/previous/<YYYYmmdd-HHMMSS>/` (itself a run folder `augssl eval`
  reads) and starts at step 0.
- **What a resume may change**: the checkpoint's `recipe.yaml` and this recipe must agree
  on every key but those whose field declares it may change (`MAY_CHANGE_ON_RESUME` in
  `framework.recipe.schema`); otherwise one line names the first difference, before the
  folder's `recipe.yaml` is written.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from framework import checkpoint
from framework.checkpoint import CheckpointError
from framework.recipe.loading import as_written_now, write_resolved
from framework.recipe.schema import may_change_on_resume

if TYPE_CHECKING:
    from accelerate import Accelerator

    from framework.model import Model
    from framework.recipe.schema import Recipe

LOCK_FILE = ".lock"
PREVIOUS = "previous"  # train.resume=fresh moves the old run to <output_dir>/previous/<time>/
DAMAGED = ".damaged"


class RunBusyError(CheckpointError):
    """The output folder is held by another live run."""


# ---------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------

_HELD: weakref.WeakValueDictionary[str, RunLock] = weakref.WeakValueDictionary()  # this process's, by folder


def _holder(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"


def _read_lock(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class RunLock:
    """`<output_dir>/.lock`, held with `flock` (released by the OS if the process dies)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd  # None once released

    @classmethod
    def acquire(cls, out: Path) -> RunLock:
        """Take the folder's lock or raise RunBusyError naming its holder; a stale lock is taken over."""
        key = str(out.resolve())
        if (earlier := _HELD.get(key)) is not None:
            earlier.release()  # an earlier train() of this process that raised
        path = out / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_lock(fd)
                os.close(fd)
                raise RunBusyError(
                    f"{out} is in use by another run ({_holder(info)}; {path}): wait for it to end, "
                    "or give this run another output_dir"
                ) from None
            except OSError:  # a filesystem without flock: fall back on the recorded pid
                info = _read_lock(fd)
                if (
                    info.get("host") == socket.gethostname()
                    and info.get("pid") != os.getpid()
                    and _pid_alive(info.get("pid"))
                ):
                    os.close(fd)
                    raise RunBusyError(f"{out} is in use by another run ({_holder(info)}; {path})") from None
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break  # else the holder removed the file between our open and flock: again
            os.close(fd)
        old = _read_lock(fd)
        if old and old.get("pid") != os.getpid():
            print(f"augssl: taking over the stale lock of a run that is gone ({_holder(old)}; {path})", flush=True)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        lock = cls(path, fd)
        _HELD[key] = lock
        return lock

    def release(self) -> None:
        """Remove the lock file and let go (idempotent)."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still held: a waiting opener sees another inode and retries
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __del__(self) -> None:  # train() returned (its local went away), or the interpreter is ending
        self.release()


@atexit.register
def _release_all() -> None:
    """A process ending (after an exception, too) leaves no lock file behind; SIGKILL does (stale, taken over)."""
    for lock in list(_HELD.values()):
        lock.release()


# ---------------------------------------------------------------------------
# Rank 0 decides, every rank learns
# ---------------------------------------------------------------------------


def _decided(accelerator: Accelerator, decide: Callable[[], tuple[Any, Any]]) -> Any:
    """Run `decide` on rank 0 (returns (kept on rank 0, shared with every rank)); every rank gets the
    shared value, or raises rank 0's CheckpointError. OSErrors become one line too."""
    kept = shared = error = None
    if accelerator.is_main_process:
        try:
            kept, shared = decide()
        except CheckpointError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"output_dir: {exc}"
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared, error = broadcast_object_list([shared, error], from_process=0)
    if error is not None:
        if isinstance(kept, RunLock):
            kept.release()
        raise CheckpointError(error)
    return kept if accelerator.is_main_process else None, shared


# ---------------------------------------------------------------------------
# train.resume
# ---------------------------------------------------------------------------


def _previous(out: Path) -> Path:
    """A new, empty `out/previous/<time>/`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = out / PREVIOUS / stamp, 1
    while dest.exists():
        dest, n = out / PREVIOUS / f"{stamp}-{n}", n + 1
    dest.mkdir(parents=True)
    return dest


def move_aside(out: Path) -> Path | None:
    """Move everything in `out` (but the lock and earlier moved runs) to `out/previous/<time>/`."""
    entries = [p for p in out.iterdir() if p.name not in (LOCK_FILE, PREVIOUS)]
    if not entries:
        return None
    dest = _previous(out)
    for p in entries:
        p.rename(dest / p.name)
    return dest


def move_later_checkpoints(out: Path, start: Path) -> Path | None:
    """Move the complete checkpoints of `out` at a later step than `start` (those of the branch a run
    resumed from `start` abandons) to `out/previous/<time>/checkpoints/`, where `train.resume: auto`,
    eval and export no longer take them for the newest (and `--checkpoint` still reads them)."""
    step = checkpoint.saved_step(start)
    later = [p for p in checkpoint.complete_checkpoints(out) if int(p.name.removeprefix("step_")) > step]
    if not later:
        return None
    dest = checkpoint.checkpoint_root(_previous(out))
    dest.mkdir()
    for p in later:
        p.rename(dest / p.name)
    return dest


def _verified(path: Path) -> Path:
    if (problem := checkpoint.verify(path)) is not None:
        raise CheckpointError(
            f"train.resume: checkpoint {path} is damaged ({problem}); give another checkpoint, or train.resume=auto"
        )
    return path


def open_run(accelerator: Accelerator, out: Path, resume: str) -> RunLock | None:
    """Claim the output folder `out` for this run before anything is written (every rank calls it).

    Rank 0: an explicit `train.resume` path is checked (complete and intact) before the folder
    is created; then the lock; then `never` refuses a folder holding checkpoints and `fresh`
    moves the previous run aside (`resume`: `train.resume`). Returns the lock on rank 0 (hold it for the
    run), else None.
    """

    def decide() -> tuple[RunLock, None]:
        if resume not in ("auto", "never", "fresh"):
            path = checkpoint.find_resume(out, resume)
            assert path is not None  # an explicit path: find_resume returns it or raises
            _verified(path)
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(out)
        try:
            done = checkpoint.complete_checkpoints(out)
            if resume == "never" and done:
                raise CheckpointError(
                    f"train.resume=never: {out} holds another run's checkpoints (newest {done[-1].name}); "
                    f"train.resume=fresh moves that run to {out / PREVIOUS}/<time>/ and starts over, "
                    "train.resume=auto continues it, or give this run another output_dir"
                )
            if resume == "fresh" and (moved := move_aside(out)) is not None:
                print(f"augssl: train.resume=fresh: moved the previous run in {out} to {moved}", flush=True)
        except BaseException:
            lock.release()
            raise
        return lock, None

    return _decided(accelerator, decide)[0]


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists and empty sections are values)."""
    if not isinstance(data, dict) or not data:
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def recipe_changes(saved: dict[str, Any], recipe: Recipe, stateful: set[str]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, this value) for every key in both recipes that differs and may not change
    (its field, or a section above it, declares `MAY_CHANGE_ON_RESUME`; the sections of plugins
    without modules are free)."""
    a, b = _flat(saved), _flat(yaml.safe_load(yaml.safe_dump(recipe.resolved())))  # b as recipe.yaml holds it
    free = tuple(may_change_on_resume(recipe))
    changes = []
    for key in (k for k in a if k in b and a[k] != b[k]):
        if key.startswith("plugins.") and key.split(".")[1] not in stateful:
            continue
        if not any(key == k or key.startswith(f"{k}.") for k in free):
            changes.append((key, a[key], b[key]))
    return changes


def _module_plugins(names: list[str]) -> set[str]:
    """Plugins with tensors among `names` of a state dict (`plugins.<plugin>.<module>...`)."""
    return {n.split(".")[1] for n in names if n.startswith("plugins.") and n.count(".") >= 2}


def check_compatible(path: Path, recipe: Recipe, model: Model) -> None:
    """Raise CheckpointError (one line) if `recipe` cannot continue checkpoint `path`."""
    stateful = _module_plugins([n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()])
    weights = path / checkpoint.WEIGHTS_FILE
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            saved_plugins = _module_plugins(list(f.keys()))
        if saved_plugins != stateful:
            raise CheckpointError(
                f"train.resume: checkpoint {path.name} holds the modules of plugins {sorted(saved_plugins)}, this "
                f"recipe builds {sorted(stateful)}: resume with the checkpoint's plugins ({path / 'recipe.yaml'}), "
                "or start over with train.resume=fresh or another output_dir"
            )
    saved_file = path / "recipe.yaml"
    if not saved_file.is_file():
        return
    changes = recipe_changes(as_written_now(yaml.safe_load(saved_file.read_text()) or {}), recipe, stateful)
    if changes:
        (key, old, new), more = changes[0], [k for k, _, _ in changes[1:]]
        also = f" (and {len(more)} more: {', '.join(more)})" if more else ""
        raise CheckpointError(
            f"train.resume: checkpoint {path.name} was trained with {key}={json.dumps(old)}, this recipe has "
            f"{json.dumps(new)}{also}: resume with the checkpoint's values ({saved_file}), or start over with "
            "train.resume=fresh or another output_dir"
        )


def _newest_intact(out: Path) -> Path | None:
    """The newest complete checkpoint that verifies; damaged newer ones are renamed `step_N.damaged`
    with one line each. If none verifies, nothing is renamed and CheckpointError says so."""
    done = checkpoint.complete_checkpoints(out)
    damaged: list[tuple[Path, str]] = []
    for path in reversed(done):
        if (problem := checkpoint.verify(path)) is None:
            for bad, why in damaged:
                dest, n = bad.with_name(bad.name + DAMAGED), 1
                while dest.exists():
                    dest, n = bad.with_name(f"{bad.name}{DAMAGED}-{n}"), n + 1
                bad.rename(dest)
                print(
                    f"augssl: checkpoint {bad} is damaged ({why}): kept as {dest.name}; resuming from {path.name}",
                    flush=True,
                )
            return path
        damaged.append((path, problem))
    if damaged:
        bad, why = damaged[0]
        raise CheckpointError(
            f"train.resume=auto: every checkpoint in {checkpoint.checkpoint_root(out)} is damaged "
            f"(newest {bad.name}: {why}); train.resume=fresh moves them aside and starts over"
        )
    return None


def resume_point(accelerator: Accelerator, recipe: Recipe, model: Model, lock: RunLock | None) -> Path | None:
    """The checkpoint this run continues (None: from step 0), the same on every rank.

    Rank 0 picks it (`auto`: the newest intact one), checks this recipe may continue it, moves
    the folder's later checkpoints aside when an explicit path goes back to an older one (a branch:
    the abandoned later steps must not pass for the newest), and only then writes the folder's
    `recipe.yaml`. `lock` is `open_run`'s (held by the caller).
    """
    out, resume = Path(recipe.output_dir), recipe.train.resume

    def decide() -> tuple[None, str | None]:
        assert lock is not None and lock.fd is not None, "open_run's lock is held on rank 0"
        path = _newest_intact(out) if resume == "auto" else checkpoint.find_resume(out, resume)
        if path is not None:
            check_compatible(path, recipe, model)
        if path is not None and resume != "auto" and (moved := move_later_checkpoints(out, path)) is not None:
            names = ", ".join(p.name for p in sorted(moved.iterdir()))
            print(f"augssl: train.resume={resume}: moved the later checkpoints ({names}) to {moved}", flush=True)
        write_resolved(recipe, out / "recipe.yaml")
        return None, None if path is None else str(path)

    shared = _decided(accelerator, decide)[1]
    return None if shared is None else Path(shared)
