"""`write_shards(..., processes=N)` / `augssl shards --processes N`: the same bytes as one process
(shards, manifest, shard boundaries under `maxcount` and `maxsize`), a damaged image or a dead
worker as one line naming the file with nothing half-written, and Ctrl-C stopping every worker."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from framework.data import sources
from framework.data.shards import write_shards
from tests.helpers import ENV, ROOT


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """60 small images in 3 classes (one with a sub-folder): PNG and JPEG, of varying sizes and
    modes (RGB, L, RGBA, P: the reader converts them), so encoded sizes differ from one to the next."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(60):
        folder = root / f"class{i % 3}" / ("sub" if i % 3 == 2 and i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (int(rng.integers(8, 40)), int(rng.integers(8, 40)), 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(["RGB", "L", "RGBA", "P"][i % 4])
        if i % 2:
            image.save(folder / f"{i:03d}.png")
        else:
            image.convert("RGB").save(folder / f"{i:03d}.jpg", quality=90)
    return root


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def cli(argv: list[str], capsys) -> tuple[int, str]:
    from framework.cli import shards_main

    with pytest.raises(SystemExit) as exit_:
        shards_main(argv)
        raise SystemExit(0)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 3])
def test_parallel_shards_are_the_sequential_shards_byte_for_byte(folder, tmp_path, processes):
    before = set(multiprocessing.active_children())  # other tests' long-lived processes, not this writer's
    out = tmp_path / "out"
    pattern = str(out / "train-%04d.tar")
    # 7 per shard: 60 does not divide; 50 per shard at most 9000 bytes: `maxsize` cuts shards of
    # uneven counts, which no split by sample count alone would reproduce
    for maxcount, maxsize in ((7, 3e9), (50, 9000)):
        sequential = write_shards(sources.image_folder(folder), pattern, maxcount=maxcount, maxsize=maxsize)
        expected = files_of(out)
        shutil.rmtree(out)
        files = sources.image_folder_files(folder)
        parallel = write_shards(files, pattern, maxcount=maxcount, maxsize=maxsize, processes=processes)
        assert parallel == sequential and files_of(out) == expected
        counts = [s["samples"] for s in parallel["shards"]]
        assert sum(counts) == 60 and (counts == [7] * 8 + [4] if maxcount == 7 else len(set(counts)) > 1), counts
        shutil.rmtree(out)
    assert not set(multiprocessing.active_children()) - before, "every worker is gone once the shards are written"


@pytest.mark.slow
def test_the_cli_writes_the_same_shards_and_manifest_with_any_number_of_processes(folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["imagefolder", str(folder), "--split", "val", "--out", str(out / "val-%03d.tar"), "--maxcount", "9"]
    written = {}
    for processes in ("1", "2"):
        assert cli([*argv, "--format", "jpg", "--limit", "40", "--processes", processes], capsys)[0] == 0
        written[processes] = files_of(out)
        shutil.rmtree(out)
    assert written["1"] == written["2"]
    assert sorted(written["1"]) == [f"val-{i:03d}.tar" for i in range(5)] + ["val.json"]


def test_processes_below_one_are_refused_before_anything_is_written(folder, tmp_path, capsys):
    with pytest.raises(ValueError, match="processes=0"):
        write_shards(sources.image_folder_files(folder), str(tmp_path / "o" / "t-%02d.tar"), processes=0)
    code, err = cli(
        ["imagefolder", str(folder), "--out", str(tmp_path / "o" / "t-%02d.tar"), "--processes", "-2"], capsys
    )
    assert code == 2 and err == "augssl: error: --processes -2: needs 0 (one per CPU core) or more\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_damaged_image_is_one_line_naming_it_and_leaves_the_existing_shards_untouched(folder, tmp_path, capsys):
    out = tmp_path / "out"
    pattern = str(out / "train-%03d.tar")
    assert cli(["imagefolder", str(folder), "--out", pattern, "--maxcount", "25"], capsys)[0] == 0
    before = files_of(out)
    good = (folder / "class0" / "000.jpg").read_bytes()
    truncated = folder / "class2" / "zz_truncated.jpg"  # the header reads, the pixels do not
    truncated.write_bytes(good[: len(good) // 2])
    not_an_image = folder / "class1" / "zz_text.png"
    not_an_image.write_bytes(b"not an image at all")
    for bad in (not_an_image, truncated):  # the first damaged file in sample order is the one named
        errors = {}
        for processes in ("1", "2"):
            code, errors[processes] = cli(
                ["imagefolder", str(folder), "--out", pattern, "--maxcount", "5", "--processes", processes], capsys
            )
            assert code == 2 and len(errors[processes].splitlines()) == 1, errors[processes]
            assert files_of(out) == before, "existing shards and manifest untouched, no temporaries left"
        assert errors["1"] == errors["2"] and errors["1"].startswith(f"augssl: error: {bad}: unreadable image ("), (
            errors
        )
        bad.unlink()


@dataclass(frozen=True)
class Killer:
    """A sample whose loading kills its worker process, as a segfault in a decoder would."""

    key: str
    path: str

    def load(self) -> sources.Sample:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


@pytest.mark.slow
def test_a_worker_that_dies_is_one_error_naming_the_sample_it_died_on_and_nothing_is_written(folder, tmp_path):
    before = set(multiprocessing.active_children())  # other tests' long-lived processes, not this writer's
    out = tmp_path / "out"
    items: list = sources.image_folder_files(folder)
    items.insert(37, Killer("train_crash", str(folder / "class1" / "crash.png")))
    with pytest.raises(ChildProcessError) as error:
        write_shards(items, str(out / "train-%02d.tar"), maxcount=10, processes=2)
    assert str(error.value).startswith(f"{folder / 'class1' / 'crash.png'}: a worker process died converting it")
    assert list(out.iterdir()) == [], "no shard, no manifest, no temporary"
    assert not set(multiprocessing.active_children()) - before


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_even_one_stuck_on_a_file_and_leaves_the_existing_shards(folder, tmp_path):
    out = tmp_path / "out"
    pattern = str(out / "train-%03d.tar")
    args = [sys.executable, "-m", "framework.cli", "shards", "imagefolder", str(folder), "--out", pattern]
    subprocess.run([*args, "--limit", "12"], check=True, cwd=ROOT, env=ENV, capture_output=True, timeout=120)
    before = files_of(out)
    os.mkfifo(folder / "class2" / "zz_stuck.png")  # opening it blocks its worker until a writer comes: never
    proc = subprocess.Popen(
        [*args, "--maxcount", "5", "--processes", "2"],
        cwd=ROOT,
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: Ctrl-C at a terminal signals the whole group
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("train-003.tar.*.tmp")):  # 15 records written: the workers are busy
            assert proc.poll() is None and time.monotonic() < deadline, "the writer did not get going"
            time.sleep(0.1)
        time.sleep(1.0)  # the 60 good images are done by now; the stuck file holds everything up
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert err == "augssl: interrupted; the shards and manifest already there are left untouched\n"
    assert files_of(out) == before
    deadline = time.monotonic() + 10
    while True:  # the workers and the forkserver are gone with the writer
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a process of the writer's group outlived it"
        time.sleep(0.1)


def test_an_image_file_is_read_like_the_image_folder_reads_it(folder):
    files = sources.image_folder_files(folder, split="val")
    samples = list(sources.image_folder(folder, split="val"))
    assert [(f.key, f.label) for f in files] == [(s.key, s.label) for s in samples]
    loaded = files[5].load()
    assert loaded.image.mode == "RGB" and loaded.image.tobytes() == samples[5].image.tobytes()
    broken = sources.ImageFile("val_x", str(folder / "class0" / "000.jpg"), 0)
    Path(broken.path).write_bytes(b"GIF89a")  # a header, nothing after it
    with pytest.raises(ValueError, match=r"000\.jpg: unreadable image \(UnidentifiedImageError: "):
        broken.load()
