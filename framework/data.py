"""WebDataset shards: writing them, and streaming them into batches of views.

The stream never holds a dataset in memory and never hands two ranks (or two workers)
the same record in an epoch: each epoch the shard list is shuffled with a seed shared
by all ranks, then split over the readers (ranks x workers): whole shards when there
are at least as many shards as readers (`shards[rank::world][worker::workers]`), a
share of each shard's records otherwise (`ShardStream.shards_for`), so any shard count
runs on any number of processes and workers. Samples are shuffled in a buffer, decoded
and turned into views in the data workers, and batched there; the loader is a
`WebLoader(batch_size=None)` and is never passed to `accelerator.prepare()`.

Every batch carries its worker's cursor (epoch, samples emitted), so a checkpoint can
record exactly where each worker stood and a resumed run continues from there. The
random state of each sample's augmentation is derived from (seed, epoch, rank,
worker, position), so a run's data, views included, are reproducible and resumable.

Faults end as counts or as one line, never as a hang: an unreadable shard (empty, not a tar,
damaged, truncated; remote: no answer, HTTP 5xx, a failing `pipe:` command, no byte for
`timeout_seconds`, after `retries` retries with exponential backoff) is skipped and counted as a
bad record; a worker without a good record for `stall_seconds`, or with every shard bad two epochs
in a row, raises `DataError`; a data worker whose trainer has died exits (`_Guard`).
"""

from __future__ import annotations

import atexit
import gzip
import http.client
import io
import json
import multiprocessing.util  # before atexit.register(_stop_data_workers): see there
import os
import random
import re
import select
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import count, islice
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms import v2

from framework.preemption import workers_ignore_stop_signals
from framework.recipe import is_local, shard_urls
from framework.sources import Sample
from framework.types import View
from framework.views import Normalize, clean_view

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")

# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def encode_image(image: Image.Image, fmt: str = "png", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    elif fmt in ("jpg", "jpeg"):
        image.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unsupported image format {fmt!r} (png, jpg)")
    return buf.getvalue()


def write_shards(
    samples: Iterable[Sample],
    pattern: str,
    maxcount: int = 5000,
    maxsize: float = 3e9,
    fmt: str = "png",
    quality: int = 95,
    manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `samples` to tar shards `pattern` (e.g. `out/train-%06d.tar`).

    Each record holds `<key>.<fmt>` (the image) and `<key>.cls` (the label). A manifest
    (`<dir>/<prefix>.json`: sample count, shard list with counts, format, plus
    `manifest`) is written beside the shards and returned.

    All or nothing: shards and manifest are written as `<name>.tmp` and renamed over their names
    only once every sample is written; if `samples` raises (a wrong source, a damaged file) or
    yields nothing (`ValueError`), the temporaries are removed and existing files are untouched.
    """
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    prefix = Path(pattern).name.split("%")[0].rstrip("-_.") or "shards"
    manifest_path = Path(pattern).with_name(f"{prefix}.json")
    tmp = pattern + ".tmp"
    counts: dict[str, int] = {}
    ext = "jpg" if fmt == "jpeg" else fmt
    try:
        # An integer mtime keeps tarfile from adding a PAX header per member (a float mtime needs
        # one): half the headers to parse when streaming, and byte-identical shards for equal input.
        with wds.ShardWriter(tmp, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=0) as sink:
            for sample in samples:
                sink.write({"__key__": sample.key, ext: encode_image(sample.image, fmt, quality), "cls": sample.label})
                counts[sink.fname] = counts.get(sink.fname, 0) + 1
        if not counts:
            raise ValueError(f"no samples to write to {pattern} (existing shards left as they are)")
        info = {
            "samples": sum(counts.values()),
            "shards": [{"url": Path(name).name.removesuffix(".tmp"), "samples": n} for name, n in counts.items()],
            "pattern": brace_pattern(pattern, len(counts)),
            "format": fmt,
            **(manifest or {}),
        }
        manifest_path.with_name(manifest_path.name + ".tmp").write_text(json.dumps(info, indent=1))
    except BaseException:
        _remove_temporaries(tmp, manifest_path)
        raise
    for name in counts:
        os.replace(name, name.removesuffix(".tmp"))
    os.replace(manifest_path.with_name(manifest_path.name + ".tmp"), manifest_path)
    return info


def _remove_temporaries(tmp_pattern: str, manifest_path: Path) -> None:
    manifest_path.with_name(manifest_path.name + ".tmp").unlink(missing_ok=True)
    for i in count():
        shard = Path(tmp_pattern % i)
        if not shard.exists():
            break
        shard.unlink()


def brace_pattern(pattern: str, n_shards: int) -> str:
    """`out/train-%06d.tar`, 12 -> `out/train-{000000..000011}.tar` (the URL spec recipes use)."""
    m = re.search(r"%0?(\d*)d", pattern)
    if m is None:
        raise ValueError(f"shard pattern {pattern!r} needs a %d field, e.g. train-%06d.tar")
    width = int(m.group(1) or 0)
    return f"{pattern[: m.start()]}{{{0:0{width}d}..{n_shards - 1:0{width}d}}}{pattern[m.end():]}"


# ---------------------------------------------------------------------------
# Views: per-sample transform run in the workers
# ---------------------------------------------------------------------------


def clean_x_view(data: Any) -> View:
    """The clean view `x` of a recipe's `data` section: minimal preprocessing (resize/crop, normalise)."""
    return View(clean_view(data.image_size, data.mean, data.std, data.channels, resize=data.resize))


class BadRecord(Exception):
    """A record that cannot become a training sample (missing/undecodable image, bad label)."""


def _ordered(views: dict[str, View]) -> list[tuple[str, View]]:
    """Views in dependency order (a derived view after its source)."""
    done: dict[str, View] = {}
    pending = dict(views)
    while pending:
        ready = {n: v for n, v in pending.items() if v.source is None or v.source in done}
        if not ready:
            name, view = next(iter(pending.items()))
            missing = view.source if view.source not in views else "a cycle"
            raise ValueError(f"view {name!r}: source {missing!r} is not a view")
        done.update(ready)
        for n in ready:
            del pending[n]
    return list(done.items())


def split_normalize(views: dict[str, View]) -> tuple[list[tuple[str, Any, str | None]], dict[str, Normalize]]:
    """Each view's worker-side transform (in dependency order) and the `Normalize` deferred to the device.

    A view whose transform is a `v2.Compose` ending in `Normalize` runs without it in the
    workers (uint8 out). A derived view of such a view gets the uint8 image and inherits the
    normalisation if its transform says `accepts_uint8 = True` (e.g. `AffineWithParams`);
    otherwise its source is normalised in the worker first, as it always was.
    """
    worker, deferred = [], {}
    for name, view in _ordered(views):
        transform = view.transform
        if isinstance(transform, v2.Compose) and transform.transforms and isinstance(transform.transforms[-1], Normalize):
            deferred[name] = transform.transforms[-1]
            transform = v2.Compose(transform.transforms[:-1])
        elif view.source in deferred:
            if getattr(transform, "accepts_uint8", False):
                deferred[name] = deferred[view.source]
            else:
                transform = v2.Compose([deferred[view.source], transform])
        worker.append((name, transform, view.source))
    return worker, deferred


def batch_to_device(batch: dict[str, Any], device: torch.device | str) -> tuple[dict, dict, torch.Tensor]:
    """A loader batch's (views, params, labels) on `device`, views normalised there."""
    norm = batch["normalize"]
    views = {}
    for k, v in batch["views"].items():
        v = v.to(device, non_blocking=True)
        views[k] = norm[k](v) if k in norm else v
    params = {k: v.to(device, non_blocking=True) for k, v in batch["params"].items()}
    return views, params, batch["label"].to(device, non_blocking=True)


class SampleToViews:
    """Decode one raw record and compute every view (with their random parameters).

    Views whose normalisation is deferred (`split_normalize`) come out as uint8; the
    batch's `"normalize"` entry maps them to their `Normalize`, for `batch_to_device`.

    Labels are -1 (unlabelled) or 0..`num_classes` - 1 (without `num_classes`: below 2**31); any
    other `cls` (57 for 10 classes, -2, "3.5", "seven") makes the record a `BadRecord`.
    """

    def __init__(self, views: dict[str, View], channels: int, num_classes: int | None = None) -> None:
        self.views, self.normalize = split_normalize(views)
        self.mode = "L" if channels == 1 else "RGB"
        self.num_classes = num_classes

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        key = next((k for k in IMAGE_KEYS if k in raw), None)
        if key is None:
            raise BadRecord(f"no image ({'/'.join(IMAGE_KEYS)}) in record")
        try:
            image = Image.open(io.BytesIO(raw[key]))
            image.load()
            if image.mode != self.mode:
                image = image.convert(self.mode)
        except Exception as exc:
            raise BadRecord(f"undecodable image: {exc}") from None
        label = -1
        if "cls" in raw:
            try:
                label = int(raw["cls"].decode() if isinstance(raw["cls"], bytes) else raw["cls"])
            except ValueError:
                raise BadRecord(f"bad label {raw['cls'][:20]!r}") from None
            top = self.num_classes if self.num_classes is not None else 2**31
            if not -1 <= label < top:
                raise BadRecord(f"label {label} outside -1..{top - 1}"
                                + (" (num_classes)" if self.num_classes is not None else ""))  # fmt: skip
        out: dict[str, torch.Tensor] = {}
        params: dict[str, torch.Tensor] = {}
        for name, transform, source in self.views:
            result = transform(image if source is None else out[source])
            if isinstance(result, tuple):
                out[name], params[name] = result
            else:
                out[name] = result
        return {"views": out, "params": params, "label": label, "key": raw["__key__"]}


def collate(samples: list[dict[str, Any]], normalize: dict[str, Normalize] | None = None) -> dict[str, Any]:
    return {
        "normalize": normalize or {},
        "views": {k: torch.stack([s["views"][k] for s in samples]) for k in samples[0]["views"]},
        "params": {k: torch.stack([s["params"][k] for s in samples]) for k in samples[0]["params"]},
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
    }


# ---------------------------------------------------------------------------
# Reading a shard
# ---------------------------------------------------------------------------


class BadShard(Exception):
    """A shard that cannot be read on: empty, truncated, a damaged tar header, not a tar, or (after
    its retries) unreachable. `transient`: a retry might read it (a cut or empty transfer)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class DataError(ValueError):
    """The stream cannot go on (no good record for `data.stall_seconds`, every shard bad): one line.

    torch's DataLoader re-raises a worker's exception as `type(exc)(<its traceback>)`; this class
    keeps only the original line of such a message, so the user reads one line.
    """

    def __init__(self, message: str = "") -> None:
        if "\nOriginal Traceback" in message:
            message = message.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
        super().__init__(message)


class _Orphaned(BaseException):
    """The data worker's trainer is gone (raised through the stream's generators, which close their
    shards and pipe commands, then the worker exits)."""


_END = b"\0" * 512
BACKOFF_SECONDS = 1.0  # a remote shard's k-th retry waits BACKOFF_SECONDS x 2**k


def _octal(field: bytes) -> int:
    """A tar number field: octal digits (NUL/space padded), or GNU base-256 (first byte 0x80/0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[:1] == b"\xff" else value
    digits = field.split(b"\0", 1)[0].strip()
    if digits.translate(None, b"01234567"):  # b"0".."7" only (int() also takes "+", "_", " ")
        raise BadShard(f"not a number: {field[:12]!r}")
    return int(digits or b"0", 8)


class _Pipe(io.RawIOBase):
    """The stdout of a `pipe:` command, read with a stall limit: no byte for `timeout` s, or an exit
    status other than 0 (or 141, SIGPIPE, as webdataset's gopen allows), raises `OSError`.

    `guard()` is called about every second while waiting (the stream's stall and parent checks).
    The command runs in its own process group, killed whole on close (shell pipelines included).
    """

    def __init__(self, cmd: str, timeout: float, guard: Any = None) -> None:
        self.cmd, self.timeout, self.guard = cmd, timeout, guard
        self.proc = subprocess.Popen(cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     start_new_session=True)  # fmt: skip
        self.fd = self.proc.stdout.fileno()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        waited = 0.0
        while not select.select([self.fd], [], [], min(1.0, self.timeout))[0]:
            waited += min(1.0, self.timeout)
            if waited >= self.timeout:
                raise TimeoutError(f"pipe:{self.cmd}: no bytes for {self.timeout:g} s")
            if self.guard is not None:
                self.guard()
        data = os.read(self.fd, len(buffer))
        if not data:
            try:
                status = self.proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"pipe:{self.cmd}: closed its output but did not exit") from None
            if status not in (0, 141):
                raise OSError(f"pipe:{self.cmd}: exit status {status}")
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.stdout.close()
        self.proc.wait()
        super().close()


def open_shard(url: str, timeout: float = 60.0, guard: Any = None) -> Any:
    """A binary stream of shard `url`: `pipe:` commands and `http(s)://` with a stall limit of
    `timeout` s (no byte for that long raises `OSError`), anything else through webdataset's gopen."""
    if url.startswith("pipe:"):
        return io.BufferedReader(_Pipe(url[5:], timeout, guard), 1 << 16)
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (the recipe's own URLs)
    return wds.gopen(url, "rb")


def tar_records(url: str, *, timeout: float = 60.0, guard: Any = None) -> Iterator[dict[str, Any]]:
    """The samples of one WebDataset shard (local path, `http(s)://`, `pipe:`; `.tar.gz`/`.tgz`
    gunzipped), read front to back: `{"__key__", "__url__", ext: bytes, ...}` per sample, files
    grouped by key (the name up to the first dot of its basename), `__*__` files skipped.

    A small ustar/GNU/pax reader instead of `tarfile` (which webdataset uses): the same records
    at a fraction of the per-record cost (see benchmarks/data_throughput.py). Raises `BadShard`,
    after the samples read so far, on an empty file, a truncated archive, a header whose checksum
    fails or whose fields do not parse (random bytes, a text file), a damaged gzip stream; `OSError`
    when the transfer fails (a `pipe:` command's exit status, no byte for `timeout` s).
    """
    raw = open_shard(url, timeout, guard)
    try:
        stream = gzip.GzipFile(fileobj=raw) if url.endswith((".gz", ".tgz")) else raw
        sample: dict[str, Any] | None = None
        for name, data in _tar_members(stream.read):
            base = name.rsplit("/", 1)[-1]
            if base.startswith("__"):
                continue
            dot = name.find(".", len(name) - len(base))
            key, ext = (name, "") if dot < 0 else (name[:dot], name[dot + 1 :].lower())
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[ext] = data
        if sample is not None:
            yield sample
    except zlib.error as exc:
        raise BadShard(f"damaged gzip stream: {exc}") from None
    finally:
        raw.close()


def _tar_members(read: Any) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar read through `read`; `BadShard` on what does not parse."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    first = True
    while (header := read(512)) != _END:
        if len(header) < 512:
            if first:
                raise BadShard("empty shard (0 bytes)" if not header else "not a tar (shorter than a header)",
                               transient=True)  # fmt: skip
            if header:
                raise BadShard("truncated tar header", transient=True)
            break  # end of file without the end-of-archive blocks: accepted, like tarfile
        what = "damaged tar header or not a tar" if first else "damaged tar header"
        try:
            checked = _octal(header[148:156]) == sum(header[:148]) + 256 + sum(header[156:])
            size, kind = _octal(header[124:136]), header[156:157]
        except BadShard as exc:
            raise BadShard(f"{what} ({exc})") from None
        if not checked:
            raise BadShard(f"{what} (checksum)")
        first = False
        data = read(size)
        if len(data) < size:
            raise BadShard("truncated tar member", transient=True)
        read(-size % 512)
        try:
            if kind == b"L":  # GNU long name of the next member
                long_name = data.rstrip(b"\0").decode()
                continue
            if kind in (b"x", b"g"):  # pax attributes: "<len> key=value\n" records
                if kind == b"x":
                    pax = dict(line.split("=", 1) for line in re.findall(r"\d+ ([^\n]*)\n", data.decode()))
                continue
            name = long_name or pax.get("path") or header[:100].split(b"\0", 1)[0].decode()
            if header[257:262] == b"ustar" and header[345] and not (long_name or "path" in pax):
                name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
        except ValueError as exc:  # undecodable name, a pax record without "="
            raise BadShard(f"damaged tar header ({exc})") from None
        long_name, pax = None, {}
        if kind in (b"0", b"\0", b"7"):  # not directories, links, devices
            yield name, data


# ---------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------


def _seed(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


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
        entry = f"{url} ({_one_line(exc)})"
        self.shards = [*(s for s in self.shards if not s.startswith(f"{url} (")), entry][-3:]

    def last_bad(self) -> str:
        return "; ".join(self.shards) or self.stats["last_bad"] or "none"

    def __call__(self) -> None:
        if self.parent is not None and os.getppid() != self.parent:
            raise _Orphaned
        idle = time.monotonic() - self.last
        if idle > self.stream.stall_seconds:
            s = self.stream
            raise DataError(f"{s.name}: rank {s.rank}, data worker {self.worker}: no good record for {idle:.0f} s "
                            f"(data.stall_seconds={s.stall_seconds:g}; {self.stats['bad']} bad of "
                            f"{self.stats['seen']} records read); last bad shards: {self.last_bad()}")  # fmt: skip

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
        self.stall_seconds, self.timeout_seconds, self.retries, self.name = stall_seconds, timeout_seconds, retries, name
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
        return [(order[j], range(max(lo - j * readers, 0), min(hi - j * readers, readers)))
                for j in range(lo // readers, (hi - 1) // readers + 1)]  # fmt: skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._stream()
        except _Orphaned:  # the generators below have closed their shards and pipe commands
            os._exit(0)

    def _stream(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The loader takes batches from its workers in turn, starting at worker 0. After a resume
        # at batch n, worker i plays the role (shards, seeds, cursor) of worker (i + n) % workers,
        # so the interleaved sequence continues exactly where it stopped.
        worker = (worker + self.role_offset) % num_workers
        start = self.resume.get(worker, Cursor())
        epochs = count(start.epoch) if self.epochs is None else range(start.epoch, self.epochs)
        stats = {"bad": 0, "seen": 0, "last_bad": ""}
        guard = _Guard(self, worker, stats)
        batch: list[dict[str, Any]] = []
        empty_epochs = 0
        for epoch in epochs:
            skip = start.emitted if epoch == start.epoch else 0
            emitted, bad_before = 0, stats["bad"]
            for raw in self._records(epoch, worker, num_workers, stats, guard):
                emitted += 1
                if emitted <= skip:
                    guard.progress()
                    continue
                stats["seen"] += 1
                seed = _seed(self.seed, epoch, self.rank, worker, emitted)
                torch.default_generator.manual_seed(seed)  # torch.manual_seed formats stack traces: 50x slower
                random.seed(seed)
                try:
                    batch.append(self.transform(raw))
                except BadRecord as exc:
                    self._bad(stats, f"{raw.get('__url__', '?')}: {raw.get('__key__', '?')}: {exc}")
                    guard()
                    continue
                guard.progress()
                if len(batch) == self.batch_size:
                    yield self._emit(batch, worker, num_workers, epoch, emitted, stats)
                    guard.progress()  # the time the loader took to ask for the next batch is not a stall
                    batch = []
            empty_epochs = empty_epochs + 1 if emitted == 0 else 0
            if emitted == 0 and self.epochs is None:  # an endless stream would never yield a batch
                where = f"{self.name}: rank {self.rank}, data worker {worker}: no records in epoch"
                split = f"{len(self.urls)} shards over {self.world_size} ranks x {num_workers} workers"
                if stats["bad"] == bad_before:  # every shard read cleanly: this reader has no records
                    raise DataError(f"{where} {epoch} ({split}: fewer records than readers, or unreadable shards)")
                if empty_epochs >= 2 and not self.resampled:  # a second pass, for shards that failed for a while
                    raise DataError(f"{where}s {epoch - 1} and {epoch} ({split}: every shard this reader reads "
                                    f"is bad); last bad shards: {guard.last_bad()}")  # fmt: skip
        if batch:
            yield self._emit(batch, worker, num_workers, epoch, emitted, stats)

    def _records(self, epoch: int, worker: int, num_workers: int, stats: dict[str, Any], guard: _Guard) -> Iterator[dict]:
        readers = self.world_size * num_workers

        def shard_records() -> Iterator[dict]:
            for url, keep in self.shards_for(epoch, worker, num_workers):
                guard()
                records = self._shard(url, guard)
                try:
                    yield from records if keep is None else (r for i, r in enumerate(records) if i % readers in keep)
                except (BadShard, OSError, EOFError) as exc:  # unreadable: skip the rest, count
                    guard.bad_shard(url, exc)
                    if keep is None or keep.start == 0:  # a shared shard counts once: for its first record's reader
                        self._bad(stats, f"{url}: {_one_line(exc)}")

        records = shard_records()
        if self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, epoch, self.rank, worker, "buffer"))
            records = wds.filters._shuffle(records, self.shuffle_buffer, min(100, self.shuffle_buffer), rng)
        per_worker = self.worker_epoch_samples(num_workers)
        return records if per_worker is None else islice(records, per_worker)

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
                    raise BadShard(_one_line(exc) + (f" (after {attempt + 1} attempts)" if attempt else "")) from None
                raise

    @staticmethod
    def _bad(stats: dict[str, Any], what: str) -> None:
        stats["bad"] += 1
        stats["last_bad"] = what

    def _emit(self, batch: list[dict], worker: int, num_workers: int, epoch: int, emitted: int, stats: dict) -> dict:
        out = collate(batch, self.transform.normalize)
        out["cursor"] = {"worker": worker, "num_workers": num_workers, "epoch": epoch, "emitted": emitted, **stats}
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


def make_loader(
    spec: str,
    views: dict[str, View],
    *,
    channels: int,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shardshuffle: bool = True,
    resampled: bool = False,
    shuffle_buffer: int = 0,
    epochs: int | None = None,
    resume: StreamPosition | None = None,
    pin_memory: bool = False,
    epoch_samples: int | None = None,
    stall_seconds: float = 600.0,
    timeout_seconds: float = 60.0,
    retries: int = 3,
    num_classes: int | None = None,
    name: str = "data.train",
) -> wds.WebLoader:
    """A `WebLoader(batch_size=None)` over the shards `spec` (batches built in the workers).

    Faults: a remote shard is retried `retries` times (`ShardStream._shard`), a transfer without a
    byte for `timeout_seconds` fails; an unreadable shard is skipped and counted as a bad record; a
    worker without a good record for `stall_seconds` raises `DataError` (one line, naming `name`,
    the spec and the last bad shards); labels outside -1..`num_classes` - 1 are bad records.
    """
    urls = shard_urls(spec)
    if not urls:
        raise ValueError(f"no shard URLs in {spec!r}")
    if resume is not None and resume.workers and resume.num_workers != max(num_workers, 1):
        capped = min(num_workers, len(urls) // world_size)  # loaders before the record-level split capped workers
        if resampled or resume.num_workers != max(capped, 1):  # at shards / ranks: such a stream continues exactly
            raise ValueError(f"cannot continue a stream read by {resume.num_workers} workers with {num_workers}")
        num_workers = capped
    stream = ShardStream(
        urls, SampleToViews(views, channels, num_classes), batch_size,
        rank=rank, world_size=world_size, seed=seed, shardshuffle=shardshuffle, resampled=resampled,
        shuffle_buffer=shuffle_buffer, epochs=epochs, resume=resume.workers if resume else None,
        role_offset=resume.batches % max(num_workers, 1) if resume else 0, epoch_samples=epoch_samples,
        stall_seconds=stall_seconds, timeout_seconds=timeout_seconds, retries=retries, name=f"{name}={spec}",
    )  # fmt: skip
    return wds.WebLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
        worker_init_fn=workers_ignore_stop_signals,  # the trainer stops them after its checkpoint
    )
