"""Streaming the same shards from a local path, an HTTP server and a `pipe:` command; converters
through the CLI; a training run over corrupt shards."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from itertools import islice
from pathlib import Path

import pytest

from framework.data import make_loader, shard_urls
from framework.logging import read_metrics
from framework.testing import data_section, run_steps, tiny_recipe
from framework.types import View
from framework.views import FASHION_MNIST_STATS, clean_view
from tests.helpers import accelerate_launch, asset_samples, ddp_args, needs_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
X = {"x": View(clean_view(28, *FASHION_MNIST_STATS, channels=1))}


def stream(spec: str) -> list[tuple[str, int]]:
    loader = make_loader(data_section(spec, batch_size=10, num_workers=2, shuffle_buffer=30), X, seed=1, epochs=1)
    return [(k, int(label)) for b in loader for k, label in zip(b["key"], b["label"], strict=True)]


@pytest.fixture
def http_server(fmnist_shards):
    folder = Path(shard_urls(fmnist_shards["train"])[0]).parent
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_and_pipe_urls_give_the_same_samples_as_local_paths(fmnist_shards, http_server):
    local = fmnist_shards["train"]
    folder, name = local.rsplit("/", 1)
    assert len(stream(local)) == 192
    assert stream(f"{http_server}/{name}") == stream(local)
    assert stream(f"pipe:cat {folder}/{name}") == stream(local)


@pytest.mark.slow
@needs_fashion_mnist
def test_make_shards_cli_writes_shards_and_a_manifest(tmp_path):
    out = tmp_path / "fm" / "test-%04d.tar"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "make_shards.py"),
            "fashion-mnist",
            "--split",
            "test",
            "--out",
            str(out),
            "--maxcount",
            "40",
            "--limit",
            "100",
            "--format",
            "jpg",
            "--quality",
            "90",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "fm" / "test.json").read_text())
    assert manifest["samples"] == 100 and [s["samples"] for s in manifest["shards"]] == [40, 40, 20]
    assert manifest["format"] == "jpg" and manifest["source"] == "fashion-mnist" and len(manifest["classes"]) == 10
    assert len(stream(manifest["pattern"])) == 100


@pytest.mark.slow
def test_make_shards_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "make_shards.py"),
            "cifar10",
            str(tmp_path),
            "--out",
            str(tmp_path / "x-%03d.tar"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("augssl: error: ")


@pytest.mark.slow
def test_a_run_over_corrupt_shards_finishes_and_counts_the_planted_bad_records(tmp_path, fmnist_shards):
    urls = shard_urls(fmnist_shards["train"])
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for url in urls:
        shutil.copy(url, folder)
    victim = folder / Path(urls[0]).name  # corrupt 3 images' bytes inside one shard, keep the tar valid
    data = bytearray(victim.read_bytes())
    planted = 0
    start = 0
    while planted < 3:
        i = data.index(b"\x89PNG", start)
        data[i + 16 : i + 48] = b"\x00" * 32  # break the IHDR chunk: undecodable
        start, planted = i + 64, planted + 1
    victim.write_bytes(bytes(data))
    spec = str(folder / Path(urls[0]).name).replace("000000", f"{{000000..{len(urls) - 1:06d}}}")
    recipe = tiny_recipe(
        tmp_path,
        {"train": spec, "test": fmnist_shards["test"]},
        data={"batch_size": 8, "shuffle_buffer": 0, "max_bad_fraction": 0.5},
        log={"every": 24},
    )
    out = run_steps(recipe, steps=24)  # one epoch: 192 samples / 8
    assert read_metrics(out)[-1]["data.bad_records"] == 3


def _keys_per_rank(spec: str, out: Path, processes: int) -> list[list[str]]:
    """`tests/dist_keys.py` under `accelerate launch` (gloo on CPU, 2 workers a rank): each rank's keys."""
    accelerate_launch(ddp_args(processes), [spec, str(out)], script="dist_keys.py")
    ranks = [json.loads((out / f"keys_rank{r}.json").read_text()) for r in range(processes)]
    assert all(r["world_size"] == processes for r in ranks)
    return [r["keys"] for r in ranks]


@pytest.mark.slow
def test_two_processes_with_two_workers_each_see_every_key_exactly_once(tmp_path, fmnist_shards):
    ranks = _keys_per_rank(fmnist_shards["train"], tmp_path, 2)
    seen = ranks[0] + ranks[1]
    assert len(seen) == len(set(seen)) == 192, "the union is the dataset and no key is seen twice"
    assert set(ranks[0]).isdisjoint(ranks[1])


@pytest.mark.slow
def test_four_processes_with_two_workers_each_over_three_shards_see_every_key_exactly_once(tmp_path):
    """8 readers, 3 shards: each shard's records are split over the readers instead of whole shards."""
    from framework.data import write_shards

    info = write_shards(islice(asset_samples("test"), 30), str(tmp_path / "s" / "t-%02d.tar"), maxcount=11)
    assert [s["samples"] for s in info["shards"]] == [11, 11, 8]
    ranks = _keys_per_rank(info["pattern"], tmp_path, 4)
    seen = [k for keys in ranks for k in keys]
    assert sorted(seen) == sorted(s.key for s in islice(asset_samples("test"), 30)), "every key exactly once"
    assert all(len(keys) >= 6 for keys in ranks), [len(keys) for keys in ranks]  # here 6 to 9 of the 30 each
