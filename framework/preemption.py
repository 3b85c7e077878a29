"""Stopping on request: SIGTERM, SIGINT and SIGUSR1 end a run after the current optimizer step,
with a checkpoint of exactly that step.

Clusters stop jobs with a signal: Slurm sends SIGTERM at preemption and a signal chosen with
`--signal` before the time limit (launch/slurm/pretrain.sbatch asks for SIGUSR1), Kubernetes
SIGTERM, a terminal SIGINT (Ctrl-C). `accelerate launch` (torchrun's agent) forwards SIGTERM and
SIGINT to every rank and kills them 30 s later. The handler only records the signal; the engine
folds "stop requested" into its per-step vote, so every rank stops after the same step even
when the signal reaches them at different moments. A second signal (2 s or more after the first:
one request often arrives twice, from Slurm and from torchrun's agent) stops at once, and so does
a request before the first vote (there is no step to finish: a recipe whose first batch never
comes would otherwise never stop): `StopNow` is raised where the process is, and the engine
turns it into `Preempted`.

`train()` then raises `Preempted`; the CLI prints one line and exits with `EXIT_PREEMPTED`
(75, EX_TEMPFAIL: "try again"), on which a scheduler may requeue the job. `accelerate launch`
itself exits 128 + the signal's number whatever its ranks return; launch/train.py writes its
status to `$AUGSSL_EXIT_STATUS_FILE` (`exit_status_file`) for the batch script to exit with.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import FrameType

EXIT_PREEMPTED = 75
SAME_REQUEST_SECONDS = 2.0  # signals this soon after the first are the same request, not "stop now"
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def workers_ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: SIGTERM/SIGINT/SIGUSR1 sent to every process of the job (Slurm,
    Ctrl-C) leave the data workers running until the trainer has checkpointed and shuts them down.
    (torch installs a SIGTERM handler in each worker that kills it, replaced here.) A worker whose
    trainer is gone exits on them instead."""
    parent = os.getppid()

    def handle(signum: int, frame: FrameType | None) -> None:
        if os.getppid() != parent:
            os._exit(1)

    for signum in SIGNALS:
        signal.signal(signum, handle)


class Preempted(BaseException):
    """The run stopped on a signal; `checkpoint` (None: none yet) is where `train.resume: auto` continues.

    `when` says where it stopped: "after step 7" (the step in progress, checkpointed), "before the
    first step", "at once on a second request (at step 8)". A BaseException, like
    KeyboardInterrupt: no `except Exception` on its way (a checkpoint's write, a plugin's hook)
    may take it for a failure of its own.
    """

    def __init__(self, signum: int, when: str, checkpoint: str | None) -> None:
        self.signum, self.when, self.checkpoint = signum, when, checkpoint
        where = (
            f"checkpoint {checkpoint} (train.resume: auto continues from it)"
            if checkpoint
            else "no checkpoint yet (a rerun starts at step 0)"
        )
        super().__init__(f"stopped by {signal.Signals(signum).name} {when}; {where}")


class StopNow(BaseException):
    """Raised by `StopRequests`' handler where the main thread is: stop without finishing a step."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class StopRequests:
    """A context that records SIGTERM/SIGINT/SIGUSR1 in `signum` instead of dying (main thread only).

    Until `defer()` (the engine calls it after its first vote: every rank then holds a batch) a
    request raises `StopNow` at once; after it, the first request is recorded for the vote and one
    2 s or more later raises `StopNow` (`at_once`). Left after a request, SIGTERM and SIGUSR1 stay
    ignored: the process is on its way out with status 75, and a scheduler's repeated SIGTERM must
    not turn that into a death by signal (SIGINT, a terminal's, gets its handler back).

    (Data workers keep running through such signals by `workers_ignore_stop_signals`; one forked
    before its `worker_init_fn` runs inherits this handler, which ignores signals in other processes.)
    """

    _pid: int  # set by __enter__ (main thread only)
    _first: float  # when the first request came (set with `signum`)

    def __init__(self) -> None:
        self.signum = 0
        self.deferred = False  # requests wait for the vote (set once the run holds a batch)
        self.at_once = False  # a second request raised StopNow
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            stopping = self.signum and signum != signal.SIGINT
            signal.signal(signum, signal.SIG_IGN if stopping else handler)  # type: ignore[arg-type]

    def defer(self) -> None:
        """From now on a first request waits for the vote (the step in progress is finished)."""
        self.deferred = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid or self.at_once:
            return  # a data worker (the trainer decides), or already stopping at once
        if self.signum and time.monotonic() - self._first < SAME_REQUEST_SECONDS:
            return  # the same request again: Slurm signals every process, and torchrun's agent passes it on too
        if self.signum:  # a later request: stop now
            self.at_once = True
            raise StopNow(signum)
        self.signum, self._first = signum, time.monotonic()
        if not self.deferred:
            raise StopNow(signum)  # no batch yet: no step to finish
        print(f"augssl: {signal.Signals(signum).name}: stopping after this step (again to stop now)", flush=True)


@contextmanager
def exit_status_file(env: Mapping[str, str] = os.environ) -> Iterator[None]:
    """A block whose exit status rank 0 writes to `$AUGSSL_EXIT_STATUS_FILE`, if that is set.

    `accelerate launch` (torchrun's agent) exits 128 + the signal's number after a SIGTERM whatever
    its ranks return, so a batch script that must tell "stopped with a checkpoint, try again" (75)
    from a failure reads rank 0's status there (launch/slurm/pretrain.sbatch does)."""
    status = 1  # an exception's
    try:
        yield
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise
    finally:
        if (path := env.get("AUGSSL_EXIT_STATUS_FILE")) and env.get("RANK", "0") == "0":
            with open(path, "w") as f:
                f.write(f"{status}\n")
