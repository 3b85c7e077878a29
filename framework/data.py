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
"""

from __future__ import annotations

import gzip
import io
import json
import random
import re
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
from framework.recipe import shard_urls
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
    """
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    ext = "jpg" if fmt == "jpeg" else fmt
    # An integer mtime keeps tarfile from adding a PAX header per member (a float mtime needs
    # one): half the headers to parse when streaming, and byte-identical shards for equal input.
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=0) as sink:
        for sample in samples:
            sink.write({"__key__": sample.key, ext: encode_image(sample.image, fmt, quality), "cls": sample.label})
            counts[sink.fname] = counts.get(sink.fname, 0) + 1
    info = {
        "samples": sum(counts.values()),
        "shards": [{"url": Path(name).name, "samples": n} for name, n in counts.items()],
        "pattern": brace_pattern(pattern, len(counts)) if counts else None,
        "format": fmt,
        **(manifest or {}),
    }
    prefix = Path(pattern).name.split("%")[0].rstrip("-_.") or "shards"
    Path(pattern).with_name(f"{prefix}.json").write_text(json.dumps(info, indent=1))
    return info


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
    """

    def __init__(self, views: dict[str, View], channels: int) -> None:
        self.views, self.normalize = split_normalize(views)
        self.mode = "L" if channels == 1 else "RGB"

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
    """A shard that cannot be read on: truncated, or a damaged tar header."""


_END = b"\0" * 512


def _octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def tar_records(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one WebDataset shard (local path, `http(s)://`, `pipe:`; `.tar.gz`/`.tgz`
    gunzipped), read front to back: `{"__key__", "__url__", ext: bytes, ...}` per sample, files
    grouped by key (the name up to the first dot of its basename), `__*__` files skipped.

    A small ustar/GNU/pax reader instead of `tarfile` (which webdataset uses): the same records
    at a fraction of the per-record cost (see benchmarks/data_throughput.py). Raises `BadShard`
    on a truncated archive or a header whose checksum fails, after the samples read so far.
    """
    raw = wds.gopen(url, "rb")
    try:
        read = (gzip.GzipFile(fileobj=raw) if url.endswith((".gz", ".tgz")) else raw).read
        sample: dict[str, Any] | None = None
        long_name: str | None = None
        pax: dict[str, str] = {}
        while (header := read(512)) != _END:
            if len(header) < 512:
                if header:
                    raise BadShard("truncated tar header")
                break  # end of file without the end-of-archive blocks: accepted, like tarfile
            if _octal(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
                raise BadShard("damaged tar header (checksum)")
            size, kind = _octal(header[124:136]), header[156:157]
            data = read(size)
            if len(data) < size:
                raise BadShard("truncated tar member")
            read(-size % 512)
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
            long_name, pax = None, {}
            if kind not in (b"0", b"\0", b"7"):  # directories, links, devices
                continue
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
    finally:
        raw.close()


# ---------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------


def _seed(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


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
    ) -> None:
        self.urls, self.transform, self.batch_size = urls, transform, batch_size
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
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The loader takes batches from its workers in turn, starting at worker 0. After a resume
        # at batch n, worker i plays the role (shards, seeds, cursor) of worker (i + n) % workers,
        # so the interleaved sequence continues exactly where it stopped.
        worker = (worker + self.role_offset) % num_workers
        start = self.resume.get(worker, Cursor())
        epochs = count(start.epoch) if self.epochs is None else range(start.epoch, self.epochs)
        stats = {"bad": 0, "seen": 0, "last_bad": ""}
        batch: list[dict[str, Any]] = []
        for epoch in epochs:
            skip = start.emitted if epoch == start.epoch else 0
            emitted = 0
            for raw in self._records(epoch, worker, num_workers, stats):
                emitted += 1
                if emitted <= skip:
                    continue
                stats["seen"] += 1
                seed = _seed(self.seed, epoch, self.rank, worker, emitted)
                torch.default_generator.manual_seed(seed)  # torch.manual_seed formats stack traces: 50x slower
                random.seed(seed)
                try:
                    batch.append(self.transform(raw))
                except BadRecord as exc:
                    self._bad(stats, f"{raw.get('__url__', '?')}: {raw.get('__key__', '?')}: {exc}")
                    continue
                if len(batch) == self.batch_size:
                    yield self._emit(batch, worker, num_workers, epoch, emitted, stats)
                    batch = []
            if emitted == 0 and self.epochs is None:  # an endless stream would never yield a batch
                raise ValueError(f"rank {self.rank}, data worker {worker}: no records in epoch {epoch} "
                                 f"({len(self.urls)} shards over {self.world_size} ranks x {num_workers} "
                                 "workers: fewer records than readers, or unreadable shards)")  # fmt: skip
        if batch:
            yield self._emit(batch, worker, num_workers, epoch, emitted, stats)

    def _records(self, epoch: int, worker: int, num_workers: int, stats: dict[str, Any]) -> Iterator[dict]:
        readers = self.world_size * num_workers

        def shard_records() -> Iterator[dict]:
            for url, keep in self.shards_for(epoch, worker, num_workers):
                records = tar_records(url)
                try:
                    yield from records if keep is None else (r for i, r in enumerate(records) if i % readers in keep)
                except (BadShard, OSError, EOFError) as exc:  # truncated or unreadable: skip the rest, count
                    if keep is None or keep.start == 0:  # a shared shard counts once: for its first record's reader
                        self._bad(stats, f"{url}: {exc}")

        records = shard_records()
        if self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, epoch, self.rank, worker, "buffer"))
            records = wds.filters._shuffle(records, self.shuffle_buffer, min(100, self.shuffle_buffer), rng)
        per_worker = self.worker_epoch_samples(num_workers)
        return records if per_worker is None else islice(records, per_worker)

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
) -> wds.WebLoader:
    """A `WebLoader(batch_size=None)` over the shards `spec` (batches built in the workers)."""
    urls = shard_urls(spec)
    if not urls:
        raise ValueError(f"no shard URLs in {spec!r}")
    if resume is not None and resume.workers and resume.num_workers != max(num_workers, 1):
        capped = min(num_workers, len(urls) // world_size)  # loaders before the record-level split capped workers
        if resampled or resume.num_workers != max(capped, 1):  # at shards / ranks: such a stream continues exactly
            raise ValueError(f"cannot continue a stream read by {resume.num_workers} workers with {num_workers}")
        num_workers = capped
    stream = ShardStream(
        urls, SampleToViews(views, channels), batch_size,
        rank=rank, world_size=world_size, seed=seed, shardshuffle=shardshuffle, resampled=resampled,
        shuffle_buffer=shuffle_buffer, epochs=epochs, resume=resume.workers if resume else None,
        role_offset=resume.batches % max(num_workers, 1) if resume else 0, epoch_samples=epoch_samples,
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
