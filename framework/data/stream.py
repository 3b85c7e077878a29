"""Streaming shards into batches: which reader reads what, resumable cursors, and faults.

The stream never holds a dataset in memory and never hands two ranks (or two workers)
the same record in an epoch: each epoch the shard list is shuffled with a seed shared
by all ranks, then split over the readers (ranks x workers): whole shards when there
are at least as many shards as readers (`shards[rank::world][worker::workers]`), a
share of each shard's records otherwise (`ShardStream.shards_for`), so any shard count
runs on any number of processes and workers. `ShardStream` chains generator stages, as
webdataset's own pipelines do: this reader's shards -> their records -> a buffered
shuffle -> epochs (with the cursor) -> views -> batches, all in the data workers; the loader
is a `WebLoader(batch_size=None)` and is never passed to `accelerator.prepare()`.

Every batch carries its worker's cursor (epoch, samples emitted), so a checkpoint can
record exactly where each worker stood (`StreamPosition`) and a resumed run continues from
there. The random state of each sample's augmentation is derived from (seed, epoch, rank,
worker, position), so a run's data, views included, are reproducible and resumable.

Faults end as counts or as one line, never as a hang: an unreadable shard (empty, not a tar,
damaged, truncated; remote: no answer, HTTP 5xx, a failing `pipe:` command, no byte for
`timeout_seconds`, after `retries` retries with exponential backoff) is skipped and counted as a
bad record; a worker without a good record for `stall_seconds`, or with every shard bad two epochs
in a row, raises `DataError`; a data worker whose trainer has died exits (`_Guard`); a trainer whose
data worker has died (the out-of-memory killer's SIGKILL) learns it at its next batch
(`batches`: `DataWorkerDied`, one line naming the worker); a batch larger than the shards hold is
refused before anything starts (`check_batch`).
"""

from __future__ import annotations

import atexit
import http.client
import json
import multiprocessing.util  # before atexit.register(_stop_data_workers): see there
import os
import random
import signal
import threading
import time
import urllib.error
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import count, islice
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from framework.data.pipeline import BadRecord, SampleToViews, collate
from framework.data.shards import BadShard, is_local, shard_urls, tar_records
from framework.data.sources import ImageTooLarge
from framework.errors import one_line
from framework.preemption import workers_ignore_stop_signals
from framework.types import View

BACKOFF_SECONDS = 1.0  # a remote shard's k-th retry waits BACKOFF_SECONDS x 2**k


class DataError(ValueError):
    """The stream cannot go on (no good record for `data.stall_seconds`, every shard bad): one line.

    torch's DataLoader re-raises a worker's exception as `type(exc)(<its traceback>)`; this class
    keeps only the original line of such a message, so the user reads one line.
    """

    def __init__(self, message: str = "") -> None:
        if "\nOriginal Traceback" in message:
            message = message.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
        super().__init__(message)


class DataWorkerDied(RuntimeError):
    """A data worker of this rank's loader died (killed by a signal, or exited): one line naming it."""


class _Orphaned(BaseException):
    """The data worker's trainer is gone (raised through the stream's generators, which close their
    shards and pipe commands, then the worker exits)."""


def _seed(*parts: Any) -> int:
    """A 32-bit seed from `parts` (the same on every machine and Python, unlike `hash`)."""
    return zlib.crc32(repr(parts).encode())


def _transient(exc: BaseException) -> bool:
    """Worth a retry: a failed or cut transfer, not a shard that is damaged or absent (HTTP 4xx)."""
    if isinstance(exc, BadShard):
        return exc.transient
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    return True


class _Guard:
    """A stream's two watchdogs, called in every loop of the stream (per record, shard, retry, wait).

    - No good record for `stall_seconds` (every shard unreadable or stalled, every record bad):
      `DataError`, one line naming the shards spec and the last bad shards.
    - In a DataLoader worker, the trainer gone (`os.getppid()` changed: the worker was re-parented):
      `_Orphaned`, and the worker exits. A worker looping over unreadable shards never returns to
      the DataLoader's own watchdog, which runs between samples.
    """

    def __init__(self, stream: ShardStream, worker: int, stats: dict[str, Any]) -> None:
        self.stream, self.worker, self.stats = stream, worker, stats
        self.parent = os.getppid() if get_worker_info() is not None else None
        self.last = time.monotonic()
        self.shards: list[str] = []

    def progress(self) -> None:
        self.last = time.monotonic()

    def bad_shard(self, url: str, exc: BaseException) -> None:
        entry = f"{url} ({one_line(exc, 200)})"
        self.shards = [*(s for s in self.shards if not s.startswith(f"{url} (")), entry][-3:]

    def last_bad(self) -> str:
        return "; ".join(self.shards) or self.stats["last_bad"] or "none"

    def __call__(self) -> None:
        if self.parent is not None and os.getppid() != self.parent:
            raise _Orphaned
        idle = time.monotonic() - self.last
        if idle > self.stream.stall_seconds:
            s = self.stream
            raise DataError(
                f"{s.name}: rank {s.rank}, data worker {self.worker}: no good record for {idle:.0f} s "
                f"(data.stall_seconds={s.stall_seconds:g}; {self.stats['bad']} bad of "
                f"{self.stats['seen']} records read); last bad shards: {self.last_bad()}"
            )

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self()
            time.sleep(min(left, 0.2))


@dataclass
class Cursor:
    """Where one worker stands: in `epoch`, after `emitted` samples left its shuffle buffer."""

    epoch: int = 0
    emitted: int = 0


@dataclass
class _Reader:
    """One reader's pass over the stream: the worker whose role it plays, where it started, where it
    is, its counts (`bad`, `seen`, `last_bad`) and its guard.

    `at` is the position of the record that last left the shuffle buffer. The stages after the
    buffer take one item at a time, so while a stage holds a record, `at` is that record's.
    """

    worker: int
    num_workers: int
    start: Cursor
    at: Cursor
    stats: dict[str, Any]
    guard: _Guard


class ShardStream(IterableDataset):
    """Batches of views from WebDataset shards, split over ranks and workers (`shards_for`), resumable.

    `epochs=None` streams forever (training: all ranks run the same number of steps,
    whatever the shard sizes); `epochs=n` stops after n epochs and yields the last
    partial batch (evaluation, tests). A resampled epoch is `epoch_samples` records over
    all ranks and workers (webdataset's `with_epoch`), or as many shards as the list holds.
    """

    def __init__(
        self,
        urls: list[str],
        transform: SampleToViews,
        batch_size: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        shardshuffle: bool,
        resampled: bool,
        shuffle_buffer: int,
        epochs: int | None,
        resume: dict[int, Cursor] | None = None,
        role_offset: int = 0,
        epoch_samples: int | None = None,
        stall_seconds: float = 600.0,
        timeout_seconds: float = 60.0,
        retries: int = 3,
        name: str = "data.train",
    ) -> None:
        self.urls, self.transform, self.batch_size = urls, transform, batch_size
        self.stall_seconds, self.timeout_seconds, self.retries, self.name = (
            stall_seconds,
            timeout_seconds,
            retries,
            name,
        )
        self.epoch_samples = epoch_samples
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shardshuffle, self.resampled, self.shuffle_buffer = shardshuffle, resampled, shuffle_buffer
        self.epochs, self.resume, self.role_offset = epochs, resume or {}, role_offset

    def worker_epoch_samples(self, num_workers: int) -> int | None:
        """A resampled epoch's records per worker (`epoch_samples` split evenly, rounded up)."""
        if not (self.resampled and self.epoch_samples):
            return None
        return -(-self.epoch_samples // (self.world_size * num_workers))

    def shards_for(self, epoch: int, worker: int, num_workers: int) -> Iterable[tuple[str, range | None]]:
        """This worker's shards in `epoch`, each with the records it keeps: `None` (all of them) or
        the residues `r` of `record index % readers` it keeps.

        Not resampled, the epoch's shard order (the same on every rank) is split over the
        `readers = world x workers` readers, reader `rank + world x worker` taking
        - with at least `readers` shards, whole shards: `order[reader::readers]`;
        - with `n < readers` shards, records: record `i` of the `j`-th shard goes to reader
          `(j x readers + i % readers) // n`, so each reader keeps `n / readers` of a shard's
          records, from one or two shards (the only ones it reads).
        Either way every record of the epoch goes to exactly one reader. Resampled, shards are
        drawn lazily and independently per rank and worker.
        """
        if self.resampled:
            rng = random.Random(_seed(self.seed, epoch, self.rank, worker))
            # with epoch_samples the epoch is cut by records; every shard gives at least one
            per_worker = self.worker_epoch_samples(num_workers) or len(self.urls) // (self.world_size * num_workers)
            return ((rng.choice(self.urls), None) for _ in range(max(1, per_worker)))
        order = list(self.urls)
        if self.shardshuffle:
            random.Random(_seed(self.seed, epoch)).shuffle(order)  # same order on every rank
        n, readers, reader = len(order), self.world_size * num_workers, self.rank + self.world_size * worker
        if n >= readers:
            return [(url, None) for url in order[reader::readers]]
        lo, hi = reader * n, (reader + 1) * n  # this reader's units; unit j x readers + r: residue r of shard j
        return [
            (order[j], range(max(lo - j * readers, 0), min(hi - j * readers, readers)))
            for j in range(lo // readers, (hi - 1) // readers + 1)
        ]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The stages, chained: epochs of (this reader's shards -> records -> shuffle) -> views -> batches."""
        try:
            reader = self._reader()
            yield from self._batches(self._views(self._epochs(reader), reader), reader)
        except _Orphaned:  # the generators below have closed their shards and pipe commands
            os._exit(0)

    def _reader(self) -> _Reader:
        """This process's reader: its worker role, resume cursor, counts and guard."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The loader takes batches from its workers in turn, starting at worker 0. After a resume
        # at batch n, worker i plays the role (shards, seeds, cursor) of worker (i + n) % workers,
        # so the interleaved sequence continues exactly where it stopped.
        worker = (worker + self.role_offset) % num_workers
        start = self.resume.get(worker, Cursor())
        stats = {"bad": 0, "seen": 0, "last_bad": ""}
        return _Reader(
            worker, num_workers, start, Cursor(start.epoch, start.emitted), stats, _Guard(self, worker, stats)
        )

    def _epochs(self, reader: _Reader) -> Iterator[dict[str, Any]]:
        """The records of every epoch from the reader's start, counted in `reader.at`; those a resumed
        reader had emitted are skipped. An endless stream whose epoch has no records raises `DataError`
        (it would never yield a batch)."""
        start = reader.start
        epochs = count(start.epoch) if self.epochs is None else range(start.epoch, self.epochs)
        empty_epochs = 0
        for epoch in epochs:
            reader.at.epoch, reader.at.emitted = epoch, 0
            bad_before = reader.stats["bad"]
            for raw in self._epoch_records(epoch, reader):
                reader.at.emitted += 1
                if epoch == start.epoch and reader.at.emitted <= start.emitted:
                    reader.guard.progress()
                    continue
                yield raw
            empty_epochs = empty_epochs + 1 if reader.at.emitted == 0 else 0
            if reader.at.emitted == 0 and self.epochs is None:
                self._no_records(reader, epoch, reader.stats["bad"] > bad_before, empty_epochs)

    def _no_records(self, reader: _Reader, epoch: int, had_bad: bool, empty_epochs: int) -> None:
        """`DataError` for an endless stream's epoch without records: this reader has none, or (a
        second epoch in a row, for shards that failed for a while) every shard it reads is bad."""
        where = f"{self.name}: rank {self.rank}, data worker {reader.worker}: no records in epoch"
        split = f"{len(self.urls)} shards over {self.world_size} ranks x {reader.num_workers} workers"
        if not had_bad:  # every shard read cleanly: this reader has no records
            raise DataError(f"{where} {epoch} ({split}: fewer records than readers, or unreadable shards)")
        if empty_epochs >= 2 and not self.resampled:
            raise DataError(
                f"{where}s {epoch - 1} and {epoch} ({split}: every shard this reader reads "
                f"is bad); last bad shards: {reader.guard.last_bad()}"
            )

    def _epoch_records(self, epoch: int, reader: _Reader) -> Iterator[dict[str, Any]]:
        """One epoch's records for this reader: its shards -> their records -> the shuffle buffer; a
        resampled epoch cut at `epoch_samples` / readers."""
        shards = self.shards_for(epoch, reader.worker, reader.num_workers)
        records = self._shuffled(self._records(shards, reader), epoch, reader)
        per_worker = self.worker_epoch_samples(reader.num_workers)
        return records if per_worker is None else islice(records, per_worker)

    def _records(self, shards: Iterable[tuple[str, range | None]], reader: _Reader) -> Iterator[dict[str, Any]]:
        """The records this reader keeps of each shard (`_shard`: remote ones retried); an unreadable
        shard ends there and counts as one bad record."""
        readers = self.world_size * reader.num_workers
        for url, keep in shards:
            reader.guard()
            records = self._shard(url, reader.guard)
            try:
                yield from records if keep is None else (r for i, r in enumerate(records) if i % readers in keep)
            except (BadShard, OSError, EOFError) as exc:  # unreadable: skip the rest, count
                reader.guard.bad_shard(url, exc)
                if keep is None or keep.start == 0:  # a shared shard counts once: for its first record's reader
                    self._bad(reader.stats, f"{url}: {one_line(exc, 200)}")

    def _shuffled(self, records: Iterator[dict[str, Any]], epoch: int, reader: _Reader) -> Iterator[dict[str, Any]]:
        """`records` through webdataset's buffered shuffle (`shuffle_buffer` records, its RNG seeded
        by (seed, epoch, rank, worker)), or as they come with a buffer of 0 or 1."""
        if self.shuffle_buffer <= 1:
            return records
        rng = random.Random(_seed(self.seed, epoch, self.rank, reader.worker, "buffer"))
        return wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(records)

    def _views(self, records: Iterator[dict[str, Any]], reader: _Reader) -> Iterator[dict[str, Any]]:
        """Each record's sample (`transform`), its augmentations seeded by (seed, epoch, rank, worker,
        position); a `BadRecord` is counted and dropped."""
        for raw in records:
            reader.stats["seen"] += 1
            seed = _seed(self.seed, reader.at.epoch, self.rank, reader.worker, reader.at.emitted)
            torch.default_generator.manual_seed(seed)  # torch.manual_seed formats stack traces: 50x slower
            random.seed(seed)
            try:
                sample = self.transform(raw)
            except BadRecord as exc:
                self._bad(reader.stats, f"{raw.get('__url__', '?')}: {raw.get('__key__', '?')}: {exc}")
                reader.guard()
                continue
            except ImageTooLarge as exc:  # the recipe's limit, not a damaged record: one line, exit 2
                raise DataError(f"{raw.get('__url__', '?')}: {raw.get('__key__', '?')}: {exc}") from None
            reader.guard.progress()
            yield sample

    def _batches(self, samples: Iterator[dict[str, Any]], reader: _Reader) -> Iterator[dict[str, Any]]:
        """Batches of `batch_size` samples, each with the reader's cursor; after a finite stream's last
        epoch, the partial batch."""
        batch: list[dict[str, Any]] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._emit(batch, reader)
                reader.guard.progress()  # the time the loader took to ask for the next batch is not a stall
                batch = []
        if batch:
            yield self._emit(batch, reader)

    def _shard(self, url: str, guard: _Guard) -> Iterator[dict]:
        """`tar_records(url)`; a remote shard whose transfer fails (no answer, HTTP 5xx, a `pipe:`
        command's exit status, no byte for `timeout_seconds`, a cut or empty transfer) is opened again
        up to `retries` times, BACKOFF_SECONDS x 2**k apart, continuing after the records it gave."""
        done = 0
        for attempt in count():
            try:
                for i, record in enumerate(tar_records(url, timeout=self.timeout_seconds, guard=guard)):
                    if i >= done:
                        done += 1
                        yield record
                    guard()
                return
            except (BadShard, OSError, EOFError, http.client.HTTPException) as exc:
                if attempt < self.retries and not is_local(url) and _transient(exc):  # remote: retried
                    guard.bad_shard(url, exc)  # named if the stream stalls while this shard is retried
                    guard.sleep(BACKOFF_SECONDS * 2**attempt)
                    continue
                if attempt or isinstance(exc, http.client.HTTPException):
                    raise BadShard(
                        one_line(exc, 200) + (f" (after {attempt + 1} attempts)" if attempt else "")
                    ) from None
                raise

    @staticmethod
    def _bad(stats: dict[str, Any], what: str) -> None:
        stats["bad"] += 1
        stats["last_bad"] = what

    def _emit(self, batch: list[dict[str, Any]], reader: _Reader) -> dict[str, Any]:
        """`batch` collated, with the reader's cursor and counts."""
        out = collate(batch, self.transform.normalize)
        at = reader.at
        out["cursor"] = {
            "worker": reader.worker,
            "num_workers": reader.num_workers,
            "epoch": at.epoch,
            "emitted": at.emitted,
            **reader.stats,
        }
        return out


@dataclass
class StreamPosition:
    """The main process's record of each worker's cursor, saved in checkpoints (per rank)."""

    workers: dict[int, Cursor] = field(default_factory=dict)
    batches: int = 0  # batches consumed by this rank
    num_workers: int | None = None
    bad: dict[int, int] = field(default_factory=dict)
    seen: dict[int, int] = field(default_factory=dict)
    last_bad: str = ""

    def update(self, cursor: dict[str, Any]) -> None:
        w = cursor["worker"]
        self.workers[w] = Cursor(cursor["epoch"], cursor["emitted"])
        self.batches += 1
        self.num_workers = cursor["num_workers"]
        self.bad[w], self.seen[w] = cursor["bad"], cursor["seen"]
        self.last_bad = cursor["last_bad"] or self.last_bad

    @property
    def epoch(self) -> int:
        """The pass over the shards this rank is in (0-based): the slowest worker's."""
        return min((c.epoch for c in self.workers.values()), default=0)

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    @property
    def seen_total(self) -> int:
        return sum(self.seen.values())

    def state_dict(self) -> dict[str, Any]:
        workers = {str(w): [c.epoch, c.emitted] for w, c in self.workers.items()}
        return {"workers": workers, "batches": self.batches, "num_workers": self.num_workers}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> StreamPosition:
        workers = {int(w): Cursor(*c) for w, c in state.get("workers", {}).items()}
        return cls(workers=workers, batches=state.get("batches", 0), num_workers=state.get("num_workers"))


def _stop_data_workers() -> None:
    """At exit, kill the data workers of loaders that were not shut down (a trainer leaving on an
    exception): they ignore SIGTERM while their trainer lives (`workers_ignore_stop_signals`), so
    multiprocessing's own exit (SIGTERM, then join) would wait for them forever."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise for each worker killed here
    for process in multiprocessing.active_children():
        try:
            worker = Path(f"/proc/{process.pid}/comm").read_text().strip() == "pt_data_worker"  # torch names them
        except OSError:
            continue
        if worker:
            process.kill()
            process.join(5)


atexit.register(_stop_data_workers)  # after multiprocessing.util's import registered its own: runs first


def _death(rank: int, worker: int, pid: int | None, exitcode: int) -> str:
    """One line: which data worker died, how, and what likely killed it."""
    if exitcode < 0 and -exitcode == signal.SIGKILL:
        how = (
            "was killed by SIGKILL, most likely by the out-of-memory killer (the kernel's log or the job's "
            "memory accounting says so): lower data.batch_size, data.shuffle_buffer or data.num_workers, "
            "or give the job more memory"
        )
    elif exitcode < 0:
        how = f"was killed by {signal.Signals(-exitcode).name}"
    else:
        how = f"exited with status {exitcode}"
    return f"rank {rank}, data worker {worker} (pid {pid}) {how}"


def batches(loader: Iterable[dict[str, Any]], rank: int = 0) -> Iterator[dict[str, Any]]:
    """The batches of a `make_loader` loader; a data worker that dies raises `DataWorkerDied` here.

    torch's DataLoader installs a SIGCHLD handler that raises its error wherever the main thread is
    when a worker dies: in a forward, in an optimizer step, in a checkpoint's write. It is set back
    to the default (for the rest of the process) once the workers run, so a death shows where the
    trainer can act on it: its wait for the next batch, which finds a dead worker within 5 s
    (torch's `MP_STATUS_CHECK_INTERVAL`) and is turned into one line naming the worker here.
    """
    pipeline = getattr(loader, "pipeline", [])  # a WebLoader(batch_size=None) is its DataLoader
    dataloader = pipeline[0] if len(pipeline) == 1 and isinstance(pipeline[0], DataLoader) else loader
    it = iter(dataloader)
    if getattr(dataloader, "num_workers", 0) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError:
            workers = getattr(it, "_workers", [])  # torch's worker processes, by worker id
            dead = [(i, w) for i, w in enumerate(workers) if not w.is_alive() and w.exitcode]
            if not dead:
                raise
            worker, process = dead[0]
            raise DataWorkerDied(_death(rank, worker, process.pid, process.exitcode)) from None
        yield batch


def _manifest_counts(folder: Path, names: list[str]) -> dict[str, int]:
    """Shard name -> records, from the manifests `augssl shards` writes beside shards (`<prefix>.json`,
    a prefix of the shards' names)."""
    counts: dict[str, int] = {}
    for manifest in folder.glob("*.json"):
        if not any(name.startswith(manifest.stem) for name in names):
            continue
        try:
            counts.update({s["url"]: int(s["samples"]) for s in json.loads(manifest.read_text())["shards"]})
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return counts


def manifest_records(urls: list[str]) -> int | None:
    """The records the shards `urls` hold by their manifests; None if one is remote or listed in none."""
    folders: dict[Path, list[str]] = {}
    for url in urls:
        if not is_local(url):
            return None
        path = Path(url.removeprefix("file://"))
        folders.setdefault(path.parent, []).append(path.name)
    total = 0
    for folder, names in folders.items():
        counts = _manifest_counts(folder, names)
        if any(name not in counts for name in names):
            return None
        total += sum(counts[name] for name in names)
    return total


class DataSection(Protocol):
    """What `make_loader` reads of a recipe's `data` section (`framework.recipe.schema.DataConfig`)."""

    train: str
    channels: Literal[1, 3]
    batch_size: int
    num_workers: int
    shuffle_buffer: int
    shardshuffle: bool
    resampled: bool
    epoch_samples: int | None
    num_classes: int | None
    stall_seconds: float
    timeout_seconds: float
    retries: int
    max_image_pixels: int | None


def check_batch(data: DataSection, world_size: int) -> None:
    """`DataError` (one line) if one micro-step of every rank asks for more records than the shards of
    `data.train` hold (by their manifests; shards without one are not counted): such a batch would
    repeat the whole dataset, held in memory, and wait for hours before the first step."""
    records = manifest_records(shard_urls(data.train))
    if records is not None and data.batch_size * world_size > records:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        raise DataError(
            f"data.batch_size={data.batch_size}{processes} is more than the {records} records data.train "
            f"holds ({data.train}): lower data.batch_size"
        )


def make_loader(
    data: DataSection,
    views: dict[str, View],
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epochs: int | None = None,
    resume: StreamPosition | None = None,
    pin_memory: bool = False,
    shards: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    augment_on_device: bool = False,
) -> wds.WebLoader:
    """A `WebLoader(batch_size=None)` over the shards of the `data` section (batches built in the workers).

    The section gives the shards (`data.train`), channels, batch size, workers, the shuffling
    (`shardshuffle`, `shuffle_buffer`, `resampled`, `epoch_samples`), the labels' range
    (`num_classes`) and the fault settings. `shards` reads other shards instead (evaluation's): in
    their listed order, without the section's shuffling, resampling and label range, which describe
    `data.train`. `batch_size` and `num_workers` replace the section's. `epochs=None` streams forever;
    `resume` continues the stream where a `StreamPosition` stood. `augment_on_device`: the views that
    split (`View.on_device`) run only their worker part here, their device steps are the trainer's
    (`DeviceViews`).

    Faults: a remote shard is retried `retries` times (`ShardStream._shard`), a transfer without a
    byte for `timeout_seconds` fails; an unreadable shard is skipped and counted as a bad record; a
    worker without a good record for `stall_seconds` raises `DataError` (one line, naming
    `data.train=<spec>` or the `shards`, and the last bad shards); labels outside -1..`num_classes` - 1
    are bad records; an image over PIL's decompression-bomb limit (`max_image_pixels`) raises `DataError`.
    """
    order: dict[str, Any]  # ShardStream's shuffling keywords
    if shards is None:
        spec, name, num_classes = data.train, f"data.train={data.train}", data.num_classes
        order = {
            "shardshuffle": data.shardshuffle,
            "resampled": data.resampled,
            "shuffle_buffer": data.shuffle_buffer,
            "epoch_samples": data.epoch_samples,
        }
    else:
        spec, name, num_classes = shards, shards, None
        order = {"shardshuffle": False, "resampled": False, "shuffle_buffer": 0, "epoch_samples": None}
    batch_size = data.batch_size if batch_size is None else batch_size
    num_workers = data.num_workers if num_workers is None else num_workers
    urls = shard_urls(spec)
    if not urls:
        raise ValueError(f"no shard URLs in {spec!r}")
    if resume is not None and resume.workers and resume.num_workers != max(num_workers, 1):
        capped = min(num_workers, len(urls) // world_size)  # loaders before the record-level split capped workers
        if order["resampled"] or resume.num_workers != max(capped, 1):  # at shards / ranks: continues exactly
            raise ValueError(f"cannot continue a stream read by {resume.num_workers} workers with {num_workers}")
        num_workers = capped
    stream = ShardStream(
        urls,
        SampleToViews(views, data.channels, num_classes, data.max_image_pixels, augment_on_device),
        batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epochs=epochs,
        **order,
        resume=resume.workers if resume else None,
        role_offset=resume.batches % max(num_workers, 1) if resume else 0,
        stall_seconds=data.stall_seconds,
        timeout_seconds=data.timeout_seconds,
        retries=data.retries,
        name=name,
    )
    return wds.WebLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
        worker_init_fn=workers_ignore_stop_signals,  # the trainer stops them after its checkpoint
    )
