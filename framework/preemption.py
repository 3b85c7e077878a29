"""Stopping on request: SIGTERM, SIGINT and SIGUSR1 end a run after the current optimizer step,
with a checkpoint of exactly that step.

Clusters stop jobs with a signal: Slurm sends SIGTERM at preemption and a signal chosen with
`--signal` before the time limit (launch/slurm/pretrain.sbatch asks for SIGUSR1), Kubernetes
SIGTERM, a terminal SIGINT (Ctrl-C). `accelerate launch` (torchrun's agent) forwards SIGTERM and
SIGINT to every rank and kills them 30 s later. The handler only records the signal; the engine
folds "stop requested" into its per-step vote, so every rank stops after the same step even
when the signal reaches them at different moments. A second signal (2 s or more after the first:
one request often arrives twice, from Slurm and from torchrun's agent) stops at once.

`train()` then raises `Preempted`; the CLI prints one line and exits with `EXIT_PREEMPTED`
(75, EX_TEMPFAIL: "try again"), on which the Slurm script requeues the job.
"""

from __future__ import annotations

import os
import signal
import threading
import time
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


class Preempted(Exception):
    """The run stopped on a signal after checkpointing step `step`; resume with `train.resume: auto`."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint} "
            f"(train.resume: auto continues from it)"
        )


class StopRequests:
    """A context that records SIGTERM/SIGINT/SIGUSR1 in `signum` instead of dying (main thread only).

    (Data workers keep running through such signals by `workers_ignore_stop_signals`; one forked
    before its `worker_init_fn` runs inherits this handler, which ignores signals in other processes.)
    """

    _pid: int  # set by __enter__ (main thread only)
    _first: float  # when the first request came (set with `signum`)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a data worker: the trainer decides
        if self.signum and time.monotonic() - self._first < SAME_REQUEST_SECONDS:
            return  # the same request again: Slurm signals every process, and torchrun's agent passes it on too
        if self.signum:  # a later request: stop now, the way the signal would have
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
            os.kill(os.getpid(), signum)
            return
        self.signum, self._first = signum, time.monotonic()
        print(f"augssl: {signal.Signals(signum).name}: stopping after this step (again to stop now)", flush=True)
