"""Shards on disk and on the wire: writing them, naming them, reading one.

- Writing: `write_shards` turns a stream of `Sample`s into tar shards and a manifest, all or
  nothing (the writer's own `.tmp` files renamed once every sample is written), one writer at a
  time per manifest (a lock), reading and encoding them in worker processes if asked (the same
  bytes); `brace_pattern` names the result.
- Naming: `shard_urls` expands a shard spec (brace patterns, `::` lists), `is_local` tells a
  path from a remote URL, `check_shards` finds missing local shards before a run starts.
- Reading: `tar_records` yields one shard's records (`open_shard`: local, `http(s)://`, `pipe:`
  with a stall limit); what cannot be read on is a `BadShard`.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import multiprocessing
import multiprocessing.forkserver
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from itertools import count, islice
from pathlib import Path
from typing import Any, Protocol

import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from framework.data.sources import Sample

# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def encode_image(image: Image.Image, fmt: str = "png", quality: int = 95) -> bytes:
    """`image` as the bytes of a PNG or JPEG (`quality`) file."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    elif fmt in ("jpg", "jpeg"):
        image.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unsupported image format {fmt!r} (png, jpg)")
    return buf.getvalue()


class SampleRef(Protocol):
    """A sample not read yet (`sources.ImageFile`): what `write_shards` loads in its workers."""

    def load(self) -> Sample: ...


# Samples per task handed to a worker, and tasks in flight per worker: a task is long enough to
# dwarf its pickling and keep every worker busy while the writer waits for the oldest, short
# enough that the encoded bytes in flight stay a few hundred MB even for full-size ImageNet PNGs
# (16 workers x 2 x 16 x ~0.5 MB).
_CHUNK, _AHEAD = 16, 2


def write_shards(
    samples: Iterable[Sample | SampleRef],
    pattern: str,
    maxcount: int = 5000,
    maxsize: float = 3e9,
    fmt: str = "png",
    quality: int = 95,
    manifest: dict[str, Any] | None = None,
    processes: int = 1,
) -> dict[str, Any]:
    """Write `samples` to tar shards `pattern` (e.g. `out/train-%06d.tar`).

    Each record holds `<key>.<fmt>` (the image) and `<key>.cls` (the label). A manifest
    (`<dir>/<prefix>.json`: sample count, shard list with counts, format, plus
    `manifest`) is written beside the shards and returned.

    `processes` > 1: the samples are loaded (a `SampleRef`'s `load()`: reading and decoding a
    file, under this process's `PIL.Image.MAX_IMAGE_PIXELS`) and encoded in that many worker
    processes (`_context`), `_CHUNK` samples per task, in order; this process writes the tars. The
    shards and manifest are byte for byte those of `processes=1` (same records, same order, same
    shard boundaries, `maxsize` included). A sample that fails raises its error here, the first in
    sample order; a worker that dies (a signal, out of memory) raises `ChildProcessError` naming the
    sample it died on, when a lone worker dies on it again, or the range of samples in flight.

    All or nothing: shards and manifest are written as `<name>.<pid>.tmp`, this writer's own, and
    renamed over their names only once every sample is written; if `samples` raises (a wrong source,
    a damaged file) or yields nothing (`ValueError`), or a rename fails (`OSError` saying how many
    shards it replaced), every temporary is removed and the files not yet replaced are untouched.
    One writer at a time: a second one of the same manifest raises `ShardsBusy` (`_writer_lock`)
    before writing anything; the temporaries of one that was killed are removed by the next. Shards
    the pattern numbers past the new last one (a data set written there before with more shards) are
    removed, said on stderr, so that no glob mixes two data sets.
    """
    if processes < 1:
        raise ValueError(f"processes={processes}: needs at least 1")
    encode_image(Image.new("RGB", (1, 1)), fmt, quality)  # a wrong format fails before any worker starts
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    prefix = Path(pattern).name.split("%")[0].rstrip("-_.") or "shards"
    manifest_path = Path(pattern).with_name(f"{prefix}.json")
    suffix = f".{os.getpid()}.tmp"  # this writer's: never another's (which the lock keeps away, where it can)
    manifest_tmp = manifest_path.with_name(manifest_path.name + suffix)
    counts: dict[str, int] = {}
    ext = "jpg" if fmt == "jpeg" else fmt
    with _writer_lock(manifest_path, pattern) as locked:
        if locked:  # no other writer lives: a temporary here is a killed one's
            _remove_leftovers(pattern, manifest_path)
        records = (
            map(partial(_record, fmt=fmt, quality=quality, ext=ext), samples)
            if processes == 1
            else _records_in_workers(samples, processes, fmt, quality, ext)
        )
        try:
            # An integer mtime keeps tarfile from adding a PAX header per member (a float mtime needs
            # one): half the headers to parse when streaming, and byte-identical shards for equal input.
            with wds.ShardWriter(pattern + suffix, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=0) as sink:
                for record in records:
                    sink.write(record)
                    counts[sink.fname] = counts.get(sink.fname, 0) + 1
            if not counts:
                raise ValueError(f"no samples to write to {pattern} (existing shards left as they are)")
            info = {
                "samples": sum(counts.values()),
                "shards": [{"url": Path(name).name.removesuffix(suffix), "samples": n} for name, n in counts.items()],
                "pattern": brace_pattern(pattern, len(counts)),
                "format": fmt,
                **(manifest or {}),
            }
            manifest_tmp.write_text(json.dumps(info, indent=1))
        except BaseException:
            if isinstance(records, Generator):
                records.close()  # the workers stop before the temporaries go
            _remove_temporaries(pattern + suffix, manifest_tmp)
            raise
        _rename([*counts, str(manifest_tmp)], suffix)
        _remove_stale(pattern, len(counts))
    return info


class ShardsBusy(OSError):
    """Another process is writing the same shards (it holds their manifest's `.lock`)."""


@contextlib.contextmanager
def _writer_lock(manifest_path: Path, pattern: str) -> Iterator[bool]:
    """Hold `<manifest>.lock` (`flock`, released by the OS if this process dies) while the shards are
    written: a second writer of the same manifest raises `ShardsBusy` at once, naming the holder. On a
    filesystem without `flock` there is no lock (each writer still writes only its own temporaries).
    Yields whether the lock is held."""
    locked = True
    path = manifest_path.with_name(manifest_path.name + ".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace") or "another process"
            os.close(fd)
            raise ShardsBusy(
                f"{pattern}: being written by {holder} ({path}): wait for it to finish, or write to another --out"
            ) from None
        except OSError:  # a filesystem without flock
            locked = False
            break
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break  # else the holder removed the file between our open and flock: again
        os.close(fd)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    try:
        yield locked
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: a waiting opener sees another inode and retries
        os.close(fd)  # lets go of the lock


def _rename(temporaries: list[str], suffix: str) -> None:
    """Rename each temporary over its name (the `suffix` cut), in order; if one rename fails, it and
    the ones after are removed and `OSError` says how many were renamed (those are the new ones)."""
    for done, name in enumerate(temporaries):
        try:
            os.replace(name, name.removesuffix(suffix))
        except OSError as exc:
            for rest in temporaries[done:]:
                Path(rest).unlink(missing_ok=True)
            raise OSError(
                f"{name.removesuffix(suffix)}: cannot replace it ({exc.strerror or exc}): the first {done} of "
                f"{len(temporaries)} files are the new ones, the others the old; the temporaries are removed: "
                "write them again"
            ) from None


def _numbered(pattern: str) -> list[tuple[int, str, bool]]:
    """(number, path, temporary) of each file in `pattern`'s folder that is one of its shards (`pattern %
    number`) or a writer's temporary of one (`<shard>.<pid>.tmp`), in number order."""
    folder, name = os.path.split(pattern)
    field = re.search(r"%0?\d*d", name)
    if field is None:  # the number is in a folder's name
        return []
    shape = re.compile(re.escape(name[: field.start()]) + r"(\d+)" + re.escape(name[field.end() :]) + r"(\.\d+\.tmp)?")
    found = []
    for entry in os.scandir(folder or "."):
        match = shape.fullmatch(entry.name)
        if match and name % int(match[1]) + (match[2] or "") == entry.name and entry.is_file():
            found.append((int(match[1]), entry.path, match[2] is not None))
    return sorted(found)


def _remove_leftovers(pattern: str, manifest_path: Path) -> None:
    """Remove the temporaries of a writer that was killed (SIGKILL, a node lost) before it could."""
    for _, path, temporary in _numbered(pattern):
        if temporary:
            os.unlink(path)
    for entry in os.scandir(manifest_path.parent):
        if re.fullmatch(re.escape(manifest_path.name) + r"\.\d+\.tmp", entry.name):
            os.unlink(entry.path)


def _remove_stale(pattern: str, n_shards: int) -> None:
    """Remove the shards `pattern` numbers `n_shards` and above (left by a data set written there before
    with more shards), saying so on stderr: a glob of the pattern then finds only the new ones."""
    stale = [path for number, path, temporary in _numbered(pattern) if number >= n_shards and not temporary]
    for path in stale:
        os.unlink(path)
    if stale:
        print(
            f"augssl: removed {len(stale)} shards left by an earlier data set at {pattern} ({stale[0]} .. "
            f"{stale[-1]}): it now holds {n_shards}",
            file=sys.stderr,
        )


def _record(item: Sample | SampleRef, fmt: str, quality: int, ext: str) -> dict[str, Any]:
    """One sample (loaded first if a `SampleRef`) as the record `write_shards` writes."""
    sample = item if isinstance(item, Sample) else item.load()
    return {"__key__": sample.key, ext: encode_image(sample.image, fmt, quality), "cls": sample.label}


def _records_of(chunk: list[Sample | SampleRef], fmt: str, quality: int, ext: str) -> list[dict[str, Any]]:
    """A worker's task: the records of `chunk`, in order."""
    return [_record(item, fmt, quality, ext) for item in chunk]


def _records_in_workers(
    samples: Iterable[Sample | SampleRef], processes: int, fmt: str, quality: int, ext: str
) -> Generator[dict[str, Any], None, None]:
    """The records of `samples` in order, made by `processes` worker processes.

    At most `_AHEAD` tasks per worker are in flight, so a slow disk or a huge folder never piles
    records up in memory. Closing the generator early (an error, Ctrl-C in this process) kills
    the workers at once (a worker stuck on a file must not hold Ctrl-C up): none outlives it.
    """
    context = _context()
    pool = _pool(processes, context)
    pending: deque[tuple[list[Sample | SampleRef], Future[list[dict[str, Any]]]]] = deque()
    items = iter(samples)
    finished = False
    try:
        while True:
            try:
                while len(pending) < _AHEAD * processes and (chunk := list(islice(items, _CHUNK))):
                    pending.append((chunk, pool.submit(_records_of, chunk, fmt, quality, ext)))
                if not pending:
                    finished = True
                    return
                records = pending[0][1].result()
            except BrokenProcessPool:  # from `result()`, or `submit()` once a worker is gone
                in_flight = [item for chunk, _ in pending for item in chunk]
                raise ChildProcessError(_worker_died(in_flight, context, fmt, quality, ext)) from None
            pending.popleft()
            yield from records
    finally:
        if not finished:
            # No public way before Python 3.14's `terminate_workers()`; the workers hold no file.
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def _context() -> Any:
    """Forkserver: each worker is forked from a clean single-threaded server that has imported
    this module once (not `fork`: this process may hold threads; not `spawn`: every worker would
    import torch anew, seconds of CPU each). Spawn where there is no forkserver (Windows).

    The server is started with SIGINT ignored, which its forks keep: Ctrl-C at the terminal (sent
    to the whole process group) reaches only this process, which stops the workers.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # no effect once the server runs: it has it then
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            multiprocessing.forkserver.ensure_running()  # starts it (at once: it imports on its own)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
    return context


def _pool(processes: int, context: Any) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        processes, mp_context=context, initializer=_worker_init, initargs=(Image.MAX_IMAGE_PIXELS,)
    )


def _worker_init(max_image_pixels: int | None) -> None:
    """In each worker: the writer's decompression-bomb limit (`augssl shards --max-image-pixels`); Ctrl-C
    is the writer's to handle (it stops the workers), and a worker whose parent is gone (the writer
    killed, and with it the forkserver) exits instead of waiting forever."""
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker_died(items: list[Sample | SampleRef], context: Any, fmt: str, quality: int, ext: str) -> str:
    """Why the workers broke while `items` were in flight: the items are tried again one by one
    in a fresh lone worker, and the one it dies on is named; if none kills it, the range (the
    first death was not one file's: memory, a signal)."""

    def name(item: Sample | SampleRef) -> str:
        return str(getattr(item, "path", None) or getattr(item, "key", item))

    with _pool(1, context) as lone:
        for item in items:
            try:
                lone.submit(_records_of, [item], fmt, quality, ext).result()
            except BrokenProcessPool:
                return f"{name(item)}: a worker process died converting it (a crash in its decoder?)"
            except Exception:  # an error of its own (a damaged file): not what killed the worker
                continue
    return f"a worker process died (killed? out of memory?) with {len(items)} samples in flight: " + (
        f"{name(items[0])} .. {name(items[-1])}"
    )


def _remove_temporaries(tmp_pattern: str, manifest_tmp: Path) -> None:
    """Delete an unfinished `write_shards`' `.tmp` shards and manifest."""
    manifest_tmp.unlink(missing_ok=True)
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
    return f"{pattern[: m.start()]}{{{0:0{width}d}..{n_shards - 1:0{width}d}}}{pattern[m.end() :]}"


# ---------------------------------------------------------------------------
# Naming
# ---------------------------------------------------------------------------


def shard_urls(spec: str) -> list[str]:
    """Expand a shard spec (brace patterns, `::`-separated lists) into URLs."""
    return [url for part in spec.split("::") for url in braceexpand(part.strip()) if url]


def is_local(url: str) -> bool:
    """A path or `file://` URL (not `pipe:` nor another scheme's URL)."""
    return not re.match(r"^(pipe:|[a-z][a-z0-9+.-]*://)", url) or url.startswith("file://")


def check_shards(key: str, spec: str) -> None:
    """`ValueError` naming `key` if `spec` lists no URL or a missing local shard (remote URLs are not probed)."""
    urls = shard_urls(spec)
    if not urls:
        raise ValueError(f"{key}: no shard URLs in {spec!r}")
    missing = [u for u in urls if is_local(u) and not Path(u.removeprefix("file://")).exists()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(urls)})" if len(missing) > 1 else ""
        raise ValueError(f"{key}: no such shard: {missing[0]}{more}")


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


class BadShard(Exception):
    """A shard that cannot be read on: empty, truncated, a damaged tar header, not a tar, or (after
    its retries) unreachable. `transient`: a retry might read it (a cut or empty transfer)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


_END = b"\0" * 512


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
        self.proc = subprocess.Popen(
            cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True
        )
        assert self.proc.stdout is not None  # stdout=PIPE
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
        assert self.proc.stdout is not None  # stdout=PIPE
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
                raise BadShard(
                    "empty shard (0 bytes)" if not header else "not a tar (shorter than a header)", transient=True
                )
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
