"""Data faults with real files and processes: damaged and non-tar shards, labels outside the classes,
decompression bombs, dead / failing / stalled HTTP servers and `pipe:` commands, streams that can never
yield, data workers whose trainer is killed, and `augssl shards` over a wrong source, a folder of link
loops, a decompression bomb, beside a second writer, over a file it cannot replace, and over more shards."""

from __future__ import annotations

import gc
import gzip
import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import framework.data.stream as stream
from framework.data import BadShard, DataError, Sample, make_loader, shard_urls, sources, tar_records, write_shards
from framework.data.sources import fashion_mnist
from framework.testing import data_section, tiny_recipe, write_recipe
from framework.types import View
from framework.views import FASHION_MNIST_STATS, clean_view
from tests.helpers import AUGSSL_CLI, ENV, asset_samples, augssl, bomb_png, needs_fashion_mnist, one_line

ROOT = Path(__file__).resolve().parents[1]
X = {"x": View(clean_view(28, *FASHION_MNIST_STATS, channels=1))}


@pytest.fixture
def good(tmp_path):
    """Two intact shards of 4 real images each: `good-00.tar`, `good-01.tar`; returns their keys."""
    samples = list(islice(asset_samples("test"), 8))
    write_shards(samples, str(tmp_path / "good-%02d.tar"), maxcount=4)
    return sorted(s.key for s in samples)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(stream, "BACKOFF_SECONDS", 0.05)
    gc.collect()  # shut earlier tests' loaders down (torch joins a worker that raised for 5 s) outside the timings


def load(spec: str, num_workers: int = 0, epochs: int | None = 1, **settings) -> list[dict]:
    settings = {"timeout_seconds": 1, "retries": 1, **settings}
    section = data_section(spec, batch_size=2, num_workers=num_workers, shardshuffle=False, **settings)
    return list(make_loader(section, X, epochs=epochs))


def keys(batches: list[dict]) -> list[str]:
    return sorted(k for b in batches for k in b["key"])


def _header_with_size(size_field: bytes) -> bytes:
    """A ustar header whose checksum holds but whose size field is `size_field`."""
    info = tarfile.TarInfo("a.png")
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT)[:512])
    header[124:136] = size_field.ljust(12, b"\0")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def damaged_files(folder: Path, good_shard: Path) -> dict[str, Path]:
    gz = gzip.compress(good_shard.read_bytes())
    files = {
        "random bytes": os.urandom(20_000),
        "text file": b"just some text, not a tar\n" * 100,
        "zero-length file": b"",
        "non-octal size": _header_with_size(b"99999999999") + b"\0" * 1024,
        "non-octal checksum": b"x" * 148 + b"zz\0zz\0zz" + b"\0" * 356,
        "short file": b"\0" * 100,
        "damaged gzip": gz[:40] + bytes(b ^ 0x5A for b in gz[40:400]) + gz[400:],
    }
    out = {}
    for what, content in files.items():
        path = folder / (what.replace(" ", "_") + (".tar.gz" if "gzip" in what else ".tar"))
        path.write_bytes(content)
        out[what] = path
    return out


def test_damaged_and_non_tar_files_raise_bad_shard_and_are_skipped_and_counted(tmp_path, good):
    bad = damaged_files(tmp_path, tmp_path / "good-00.tar")
    for path in bad.values():
        with pytest.raises(BadShard):  # not ValueError (int(..., 8)), zlib.error, nor silently nothing
            list(tar_records(str(path)))
    spec = "::".join([str(tmp_path / "good-00.tar"), *map(str, bad.values()), str(tmp_path / "good-01.tar")])
    batches = load(spec)
    assert keys(batches) == good, "every good record, none from the damaged files"
    assert batches[-1]["cursor"]["bad"] == len(bad)


def test_labels_outside_the_recipe_classes_are_counted_bad_records(tmp_path):
    png = io.BytesIO()
    next(asset_samples("test")).image.save(png, format="PNG")
    labels = {
        "ok0": b"0",
        "ok9": b"9",
        "unlabelled": b"-1",
        "big": b"57",
        "neg": b"-2",
        "float": b"3.5",
        "huge": b"1" * 40,
        "word": b"seven",
    }
    with tarfile.open(tmp_path / "labels.tar", "w") as tar:
        for key, cls in labels.items():
            for ext, payload in (("png", png.getvalue()), ("cls", cls)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    batches = load(str(tmp_path / "labels.tar"), num_classes=10)
    assert keys(batches) == ["ok0", "ok9", "unlabelled"]
    assert batches[-1]["cursor"]["bad"] == 5 and "labels.tar" in batches[-1]["cursor"]["last_bad"]
    assert keys(load(str(tmp_path / "labels.tar"))) == ["big", "ok0", "ok9", "unlabelled"], "no num_classes: 57 passes"


# --- decompression bombs in the shards -------------------------------------------------------


def _shard_of_pngs(path: Path, pngs: dict[str, bytes]) -> Path:
    """A shard of `key.png` + `key.cls` (0) records, written as any tool may (no re-encoding)."""
    with tarfile.open(path, "w") as tar:
        for key, png in pngs.items():
            for ext, payload in (("png", png), ("cls", b"0")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_decompression_bomb_in_a_shard_stops_the_stream_saying_how_to_allow_it(tmp_path, num_workers, monkeypatch):
    """Not a bad record skipped in silence (the image may be genuine, written with --max-image-pixels): one line
    naming the shard and the record, and the recipe key that lifts PIL's limit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # a stream without workers sets this one's
    png = io.BytesIO()
    next(asset_samples("test")).image.save(png, format="PNG")  # 28 x 28 = 784 pixels
    shard = _shard_of_pngs(
        tmp_path / "b.tar", {"ok": png.getvalue(), "bomb": bomb_png(tmp_path / "x.png").read_bytes()}
    )
    with pytest.raises(DataError) as stopped:
        load(str(shard), num_workers=num_workers)
    assert str(stopped.value) == (
        f"{shard}: bomb: 200000000 pixels, over PIL's decompression-bomb limit of 178956970 (twice "
        "PIL.Image.MAX_IMAGE_PIXELS): a damaged or hostile file, or a huge image; if it is genuine, allow it with "
        "data.max_image_pixels=200000000 (0: no limit)"
    )
    small = _shard_of_pngs(tmp_path / "s.tar", {"ok": png.getvalue()})  # the recipe's own limit, both ways
    with pytest.raises(
        DataError, match="ok: 784 pixels, over PIL's decompression-bomb limit of 200 .*data.max_image_pixels=784 "
    ):
        load(str(small), num_workers=num_workers, max_image_pixels=100)
    assert keys(load(str(small), num_workers=num_workers, max_image_pixels=784)) == ["ok"]


@pytest.mark.slow
def test_a_run_over_a_decompression_bomb_stops_with_one_line(tmp_path, fmnist_shards):
    png = io.BytesIO()
    next(asset_samples("test")).image.save(png, format="PNG")
    shard = _shard_of_pngs(
        tmp_path / "b.tar", {"bomb": bomb_png(tmp_path / "x.png").read_bytes(), "ok": png.getvalue()}
    )
    shards = {"train": str(shard), "test": fmnist_shards["test"]}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, shards, data={"num_workers": 1}))
    assert one_line([recipe]).endswith("allow it with data.max_image_pixels=200000000 (0: no limit)")


# --- remote shards ----------------------------------------------------------------------------


@pytest.fixture
def silent_server():
    """Accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def flaky_server(tmp_path):
    """Serves tmp_path; `/fail500/<name>` always answers 500, `/once/<name>` 500 on the first request."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def log_message(self, *a):
            pass

        def do_GET(self):
            requests.append(self.path)
            if self.path.startswith("/fail500/") or (self.path.startswith("/once/") and requests.count(self.path) == 1):
                self.send_error(500)
                return
            self.path = "/" + self.path.rsplit("/", 1)[-1]
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


@pytest.mark.slow
def test_dead_failing_and_stalled_remote_shards_are_retried_then_skipped_and_counted(
    tmp_path, good, silent_server, flaky_server
):
    url, requests = flaky_server
    faults = [
        f"{silent_server}/good-00.tar",
        f"{url}/fail500/good-00.tar",
        "pipe:cat /missing.tar",
        "pipe:true",
        "pipe:sleep 30",
        f"http://127.0.0.1:{_closed_port()}/good-00.tar",
    ]
    start = time.monotonic()
    batches = load("::".join([f"{url}/once/good-00.tar", *faults, f"{url}/good-01.tar"]), retries=2)
    took = time.monotonic() - start
    assert keys(batches) == good, "the shard that failed once is read on its retry"
    cursor = batches[-1]["cursor"]
    assert cursor["bad"] == len(faults) and "after 3 attempts" in cursor["last_bad"]
    assert requests.count("/fail500/good-00.tar") == 3 and requests.count("/once/good-00.tar") == 2
    assert took < 15, f"timeouts of 1 s, 2 retries: {took:.1f} s"  # silent and sleep: 3 x 1 s each, + backoff


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- streams that can never yield ---------------------------------------------------------------


def _all_bad_records(folder: Path) -> Path:
    """A valid tar whose every record is undecodable: a stream over it reads on forever without a batch."""
    with tarfile.open(folder / "undecodable.tar", "w") as tar:
        for i in range(50):
            for ext, payload in (("png", b"not a png"), ("cls", b"1")):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return folder / "undecodable.tar"


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.slow
def test_an_endless_stream_over_unreadable_shards_stops_with_one_line(tmp_path, num_workers):
    (tmp_path / "e-0.tar").write_bytes(b"")
    (tmp_path / "e-1.tar").write_bytes(b"")
    spec = f"{tmp_path}/e-{{0..1}}.tar::pipe:cat /missing.tar"
    with pytest.raises(DataError) as err:  # two empty epochs in a row (the second: for transient failures)
        load(spec, num_workers, epochs=None)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"data.train={spec}: rank 0, data worker 0")
    assert "every shard" in message and "e-1.tar (empty shard" in message and "missing.tar" in message

    spec = str(_all_bad_records(tmp_path))
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load(spec, num_workers, epochs=None, stall_seconds=2)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"data.train={spec}:")
    assert "no good record for" in message and "data.stall_seconds=2" in message


@pytest.mark.slow
def test_a_resampled_stream_over_dead_remote_shards_stops_after_stall_seconds(silent_server):
    spec = f"{silent_server}/a.tar::pipe:sleep 30"
    start = time.monotonic()
    with pytest.raises(DataError, match=r"no good record for \d+ s \(data.stall_seconds=3") as err:
        load(spec, epochs=None, resampled=True, stall_seconds=3, retries=5)
    assert 3 <= time.monotonic() - start < 8
    assert "127.0.0.1" in str(err.value) or "pipe:sleep 30 (" in str(err.value), "names the shard being retried"


# --- a data worker whose trainer dies -----------------------------------------------------------

TRAINER = textwrap.dedent("""
    import sys
    from framework.data import make_loader
    from framework.testing import data_section
    from framework.types import View
    from framework.views import FASHION_MNIST_STATS, clean_view
    X = {"x": View(clean_view(28, *FASHION_MNIST_STATS, channels=1))}
    loader = make_loader(data_section(sys.argv[1], batch_size=2, num_workers=1, timeout_seconds=600), X)
    print("started", flush=True)
    for batch in loader:
        pass
""")


def _descendants(pid: int) -> list[int]:
    psutil = pytest.importorskip("psutil")
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def _alive(pid: int) -> bool:
    psutil = pytest.importorskip("psutil")
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("stuck", ["reading undecodable records", "waiting on a silent pipe command"])
def test_a_data_worker_exits_when_its_trainer_is_killed(tmp_path, stuck):
    spec = str(_all_bad_records(tmp_path)) if stuck.startswith("reading") else "pipe:sleep 300"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, spec], cwd=ROOT, env=env, stdout=subprocess.PIPE)
    try:
        assert trainer.stdout.readline().strip() == b"started"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(_descendants(trainer.pid)) < (
            1 if stuck.startswith("reading") else 2
        ):
            time.sleep(0.2)  # the worker (and its `sleep`)
        workers = _descendants(trainer.pid)
        assert workers, "the trainer started a data worker"
        time.sleep(1.5)  # stuck in its loop
        assert all(_alive(p) for p in workers)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    alive = [p for p in workers if _alive(p)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"{stuck}: {len(alive)} of {len(workers)} processes outlived their trainer by 5 s"


LEAVER = textwrap.dedent("""
    import sys
    from framework.data import DataError, make_loader
    from framework.testing import data_section
    from framework.types import View
    from framework.views import FASHION_MNIST_STATS, clean_view
    X = {"x": View(clean_view(28, *FASHION_MNIST_STATS, channels=1))}
    def train():
        for batch in make_loader(data_section(sys.argv[1], batch_size=2, num_workers=2, stall_seconds=2), X):
            pass
    try:
        train()
    except DataError as exc:  # as the CLI does: one line, exit 2, the loader's workers still alive
        print(f"augssl: error: {exc}", file=sys.stderr)
        raise SystemExit(2)
""")


@pytest.mark.slow
def test_a_trainer_stopped_by_a_data_error_exits_with_one_line(tmp_path):
    """Its workers ignore SIGTERM while it lives (preemption), so multiprocessing's exit would wait for them."""
    spec = str(_all_bad_records(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", LEAVER, spec], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and time.monotonic() - start < 30
    lines = [line for line in proc.stderr.splitlines() if line.startswith("augssl:")]
    assert len(lines) == 1 and lines[0].startswith(f"augssl: error: data.train={spec}: rank 0, data worker")


# --- augssl shards: a wrong source, link loops, a bomb, a second writer, a failed rename --------


def _shards_cli(argv: list[str], capsys) -> tuple[int, str]:
    from framework.cli import shards_main

    with pytest.raises(SystemExit) as exit_:
        shards_main(argv)
        raise SystemExit(0)
    return exit_.value.code, capsys.readouterr().err


@needs_fashion_mnist
def test_shards_with_a_wrong_source_leave_existing_shards_and_manifest_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    pattern = str(out / "train-%03d.tar")
    assert (
        _shards_cli(
            ["fashion-mnist", "--split", "test", "--out", pattern, "--maxcount", "10", "--limit", "25"], capsys
        )[0]
        == 0
    )
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["train-000.tar", "train-001.tar", "train-002.tar", "train.json"]

    # an image folder that breaks after 12 images (2 shards written), and a root without the files
    folder = tmp_path / "images"
    for i, sample in enumerate(islice(fashion_mnist(split="test"), 20)):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        sample.image.save(folder / f"c{i % 2}" / f"{i:03d}.png")
    (folder / "c0" / "012.png").write_bytes(b"truncated png")
    wrong = [["imagefolder", str(folder)], ["fashion-mnist", str(tmp_path / "nowhere")]]
    for source in wrong:
        code, err = _shards_cli([*source, "--split", "test", "--out", pattern, "--maxcount", "5"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("augssl: error: "), err
        after = {p.name: p.read_bytes() for p in out.iterdir()}
        assert after == before, f"{source[0]}: existing shards and manifest untouched, no temporaries left"
    assert keys(load(str(out / "train-{000..002}.tar"))) == sorted(
        s.key for s in islice(fashion_mnist(split="test"), 25)
    )


def _image_folder(root: Path, n: int, seed: int = 0) -> Path:
    """`root/{c0,c1}/NNN.png`: `n` small RGB images, alternately in two classes."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i:03d}.png")
    return root


def _records(spec: str) -> list[tuple[str, bytes]]:
    return [(r["__key__"], r["png"]) for url in shard_urls(spec) for r in tar_records(url)]


@pytest.mark.slow
def test_shards_over_a_folder_of_link_loops_list_each_image_once(tmp_path):
    """Two links to the folder itself and one to the root: the listing never ended (each link doubles the paths
    to walk, until the path is too long), and the root's other class was listed again under the first one."""
    folder = _image_folder(tmp_path / "images", 16)
    (folder / "c0" / "self1").symlink_to(".")
    (folder / "c0" / "self2").symlink_to(".")
    (folder / "c1" / "root").symlink_to("..")
    out = tmp_path / "out"
    proc = augssl("shards", "imagefolder", folder, "--out", out / "t-%02d.tar")
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels = [int(r["cls"]) for r in tar_records(str(out / "t-00.tar"))]
    assert labels == [0] * 8 + [1] * 8


def test_a_decompression_bomb_is_one_line_saying_how_to_allow_it_and_the_limit_reaches_the_workers(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # `--max-image-pixels` sets this process's
    folder = _image_folder(tmp_path / "images", 6)
    out = tmp_path / "out"
    pattern = str(out / "t-%02d.tar")
    bomb = bomb_png(folder / "c1" / "bomb.png")
    for processes in ("1", "2"):
        code, err = _shards_cli(["imagefolder", str(folder), "--out", pattern, "--processes", processes], capsys)
        assert code == 2 and err == (
            f"augssl: error: {bomb}: 200000000 pixels, over PIL's decompression-bomb limit of 178956970 (twice "
            "PIL.Image.MAX_IMAGE_PIXELS): a damaged or hostile file, or a huge image; if it is genuine, allow it "
            "with --max-image-pixels=200000000 (0: no limit)\n"
        ), err
        assert not out.exists() or not list(out.iterdir()), "nothing written"
    bomb.unlink()
    for limit, written in (("20", False), ("64", True)):  # 8 x 8 = 64 pixels: over twice 20, not over 64
        for processes in ("1", "2"):
            argv = ["imagefolder", str(folder), "--out", pattern, "--processes", processes, "--max-image-pixels", limit]
            code, err = _shards_cli(argv, capsys)
            assert (code == 0) == written and ("allow it with --max-image-pixels=64 " in err) != written, err


def test_rewriting_a_pattern_with_fewer_shards_removes_the_stale_ones(tmp_path, capsys):
    """10 shards, then 3 of another data set: `t-*.tar` used to find 3 new and 7 old ones."""
    out = tmp_path / "out"
    first = [Sample(f"old{i:02d}", s.image, s.label) for i, s in enumerate(islice(asset_samples("test"), 20))]
    write_shards(first, str(out / "t-%02d.tar"), maxcount=2)
    (out / "t-12.tar").write_bytes(b"")  # a gap before it: found all the same
    (out / "t-5.tar").write_bytes(b"not this pattern's: %02d")
    info = write_shards(islice(asset_samples("train"), 5), str(out / "t-%02d.tar"), maxcount=2)
    assert sorted(p.name for p in out.iterdir()) == ["t-00.tar", "t-01.tar", "t-02.tar", "t-5.tar", "t.json"]
    assert [k for k, _ in _records(str(out / "t-{00..02}.tar"))] == [s.key for s in islice(asset_samples("train"), 5)]
    assert info["pattern"].endswith("t-{00..02}.tar")
    err = capsys.readouterr().err
    assert err == f"augssl: removed 8 shards left by an earlier data set at {out}/t-%02d.tar ({out}/t-03.tar .. " + (
        f"{out}/t-12.tar): it now holds 3\n"
    ), err


def test_a_rename_that_fails_removes_every_temporary_and_says_which_shards_are_new(tmp_path, capsys):
    folder = _image_folder(tmp_path / "images", 6)
    out = tmp_path / "out"
    pattern = str(out / "t-%02d.tar")
    assert _shards_cli(["imagefolder", str(folder), "--out", pattern, "--maxcount", "2"], capsys)[0] == 0
    (out / "t-01.tar").unlink()
    (out / "t-01.tar").mkdir()  # cannot be replaced by a file
    (out / "t-01.tar" / "keep").write_text("")
    code, err = _shards_cli(["imagefolder", str(folder), "--out", pattern, "--maxcount", "2"], capsys)
    assert code == 2 and err == (
        f"augssl: error: {out}/t-01.tar: cannot replace it (Is a directory): the first 1 of 4 files are the new ones, "
        "the others the old; the temporaries are removed: write them again\n"
    ), err
    assert sorted(p.name for p in out.iterdir()) == ["t-00.tar", "t-01.tar", "t-02.tar", "t.json"], "no temporary"


def _held_writer(folder: Path, pattern: str) -> tuple[subprocess.Popen, int]:
    """`augssl shards imagefolder folder --out pattern --maxcount 2` in a subprocess, held on its last image, a
    named pipe `c1/zz.png`: returned once it has the pipe open (the lock held, its other shards written) with
    the pipe's writing end, to give it `RED` (or kill it)."""
    fifo = folder / "c1" / "zz.png"
    os.mkfifo(fifo)
    command = [sys.executable, "-c", AUGSSL_CLI, "shards", "imagefolder", folder, "--out", pattern, "--maxcount", "2"]
    writer = subprocess.Popen(command, env=ENV, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while True:
        try:
            return writer, os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            assert writer.poll() is None, writer.communicate()
            time.sleep(0.1)


RED = io.BytesIO()
Image.new("RGB", (8, 8), "red").save(RED, format="PNG")


@pytest.mark.slow
def test_a_second_writer_of_the_same_shards_stops_with_one_line_and_the_first_writes_its_own(tmp_path):
    """The two used to write the same temporaries: one failed, leaving them, and a shard held the other's bytes."""
    first, second = _image_folder(tmp_path / "a", 8, seed=1), _image_folder(tmp_path / "b", 12, seed=2)
    out = tmp_path / "out"
    pattern = str(out / "t-%02d.tar")
    writer, fifo = _held_writer(first, pattern)
    try:
        line = one_line(["shards", "imagefolder", second, "--out", pattern, "--maxcount", "3"], script="augssl")
        holder = f"pid {writer.pid} on {socket.gethostname()} ({out}/t.json.lock)"
        assert (
            line
            == f"augssl: error: {pattern}: being written by {holder}: wait for it to finish, or write to another --out"
        )
        os.set_blocking(fifo, True)
        os.write(fifo, RED.getvalue())
        os.close(fifo)
        _, err = writer.communicate(timeout=300)
    finally:
        writer.kill()
    assert writer.returncode == 0, err
    assert sorted(p.name for p in out.iterdir()) == [f"t-{i:02d}.tar" for i in range(5)] + ["t.json"]
    files, records = sources.image_folder_files(first), _records(str(out / "t-{00..04}.tar"))
    assert [key for key, _ in records] == [file.key for file in files]
    for file, (_, png) in zip(files, records, strict=True):  # the first writer's images, none of the second's
        want = Image.open(RED) if file.path.endswith("zz.png") else Image.open(file.path)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(want.convert("RGB"))), file.path


@pytest.mark.slow
def test_the_temporaries_of_a_killed_writer_are_removed_by_the_next(tmp_path, capsys):
    folder = _image_folder(tmp_path / "images", 8)
    out = tmp_path / "out"
    pattern = str(out / "t-%02d.tar")
    writer, fifo = _held_writer(folder, pattern)
    writer.kill()
    writer.communicate(timeout=300)
    os.close(fifo)
    left = sorted(p.name for p in out.iterdir())
    assert left == [f"t-{i:02d}.tar.{writer.pid}.tmp" for i in range(4)] + ["t.json.lock"], left
    (folder / "c1" / "zz.png").unlink()
    (folder / "c1" / "zz.png").write_bytes(RED.getvalue())
    assert _shards_cli(["imagefolder", str(folder), "--out", pattern, "--maxcount", "2"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [f"t-{i:02d}.tar" for i in range(5)] + ["t.json"]
