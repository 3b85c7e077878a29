"""Shards on disk: writing, streaming split by rank and worker, bad records, resume positions."""

from __future__ import annotations

import io
import json
import random
import tarfile
from itertools import islice
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from framework.data import (
    BadShard,
    Cursor,
    DeviceViews,
    Sample,
    SampleToViews,
    ShardStream,
    StreamPosition,
    batch_to_device,
    encode_image,
    make_loader,
    split_views,
    tar_records,
    write_shards,
)
from framework.testing import data_section
from framework.types import OnDevice, View
from framework.views import FASHION_MNIST_STATS, clean_view
from tests.helpers import asset_samples

X = {"x": View(clean_view(28, *FASHION_MNIST_STATS, channels=1))}


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_write_shards_round_trips_images_labels_and_manifest(tmp_path):
    samples = list(islice(asset_samples("test"), 50))
    info = write_shards(samples, str(tmp_path / "t-%04d.tar"), maxcount=20, manifest={"source": "fashion-mnist"})
    assert info["samples"] == 50 and [s["samples"] for s in info["shards"]] == [20, 20, 10]
    assert info["pattern"].endswith("t-{0000..0002}.tar") and info["source"] == "fashion-mnist"
    assert json.loads((tmp_path / "t.json").read_text()) == info
    loader = make_loader(data_section(info["pattern"], batch_size=7, num_workers=0, shardshuffle=False), X, epochs=1)
    batches = list(loader)
    assert batches[0]["views"]["x"].dtype == torch.uint8, "normalisation is deferred to the device"
    got = torch.cat([batch_to_device(b, "cpu")[0]["x"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    expect = torch.stack([X["x"].transform(s.image) for s in samples])
    assert torch.equal(got, expect) and labels.tolist() == [s.label for s in samples]


def test_a_derived_view_gets_uint8_only_if_it_says_it_accepts_it():
    from framework.views import Normalize
    from plugins.blocks import AffineWithParams

    class Plain:  # a third-party derived view that expects the normalised tensor
        def __call__(self, x):
            assert x.dtype == torch.float32
            return x

    stats = FASHION_MNIST_STATS
    views = {**X, "aff": View(AffineWithParams(*stats), source="x"), "plain": View(Plain(), source="x")}
    worker, deferred, _ = split_views(views)
    assert set(deferred) == {"x", "aff"} and isinstance(deferred["x"], Normalize)
    sample = SampleToViews(views, channels=1)(
        {"__key__": "k", "png": encode_image(next(asset_samples("test")).image), "cls": b"3"}
    )
    assert sample["views"]["x"].dtype == sample["views"]["aff"].dtype == torch.uint8
    assert sample["views"]["plain"].dtype == torch.float32


@pytest.mark.parametrize("world_size, num_workers", [(1, 3), (2, 2), (4, 3)])  # 8 shards; (4, 3): 12 readers
def test_an_epoch_split_by_rank_and_worker_sees_every_key_once(tmp_path, fmnist_shards, world_size, num_workers):
    seen: list[str] = []
    for rank in range(world_size):
        section = data_section(fmnist_shards["train"], batch_size=5, num_workers=num_workers, shuffle_buffer=10)
        loader = make_loader(section, X, rank=rank, world_size=world_size, seed=3, epochs=1)
        seen += keys_of(loader)
    assert len(seen) == len(set(seen)) == 192


def test_the_order_is_reproducible_from_the_seed(fmnist_shards):
    def order(seed):
        section = data_section(fmnist_shards["train"], batch_size=8, num_workers=2, shuffle_buffer=20)
        return keys_of(make_loader(section, X, seed=seed, epochs=1))

    assert order(1) == order(1) and order(1) != order(2)


@pytest.mark.parametrize("rank, world_size, num_workers", [(0, 1, 2), (1, 4, 3)])  # 8 shards; 12 readers: records split
def test_resuming_from_a_position_continues_the_stream(fmnist_shards, rank, world_size, num_workers):
    section = data_section(fmnist_shards["train"], batch_size=8, num_workers=num_workers, shuffle_buffer=20)
    kwargs = dict(seed=5, epochs=1, rank=rank, world_size=world_size)
    full = list(make_loader(section, X, **kwargs))
    cut = 5 if world_size == 1 else 2
    position = StreamPosition()
    for batch in full[:cut]:
        position.update(batch["cursor"])
    rest = list(make_loader(section, X, resume=position, **kwargs))
    keys = [k for b in full[:cut] + rest for k in b["key"]]
    assert keys == [k for b in full for k in b["key"]]
    assert torch.equal(rest[0]["views"]["x"], full[cut]["views"]["x"])
    assert StreamPosition.from_state_dict(position.state_dict()).workers == position.workers
    assert position.workers[0] == (Cursor(0, 24) if world_size == 1 else Cursor(0, 8))


def test_a_checkpoint_of_a_loader_that_capped_its_workers_continues_with_its_worker_count(fmnist_shards):
    """Loaders before the record-level split ran min(workers, shards / ranks) workers; such a
    checkpoint (8 shards, 4 ranks: 2 of 3 workers) resumes exactly with those 2."""
    kwargs = dict(seed=2, epochs=1, rank=1, world_size=4)
    section = data_section(fmnist_shards["train"], batch_size=4, num_workers=2, shuffle_buffer=8)
    full = list(make_loader(section, X, **kwargs))
    position = StreamPosition()
    for batch in full[:3]:
        position.update(batch["cursor"])
    section = data_section(fmnist_shards["train"], batch_size=4, num_workers=3, shuffle_buffer=8)
    rest = list(make_loader(section, X, resume=position, **kwargs))
    assert [k for b in full[:3] + rest for k in b["key"]] == [k for b in full for k in b["key"]]


class KeysAndDraws:
    """A stand-in for `SampleToViews` that decodes nothing: each record's key and one draw of the
    RNG the stream seeds per sample (so a resumed stream must reproduce the augmentations too)."""

    normalize: dict = {}

    def __call__(self, raw):
        return {"views": {}, "params": {}, "label": random.randrange(10**9), "key": raw["__key__"]}


def _fake_shards(tmp_path, sizes: list[int]) -> list[str]:
    urls = []
    for j, size in enumerate(sizes):
        urls.append(str(tmp_path / f"f-{j}.tar"))
        with tarfile.open(urls[-1], "w") as tar:
            for i in range(size):
                _tar_member(tar, f"s{j}_{i:02d}.png", b"png")
    return urls


def _stream(urls, rank, world_size, num_workers, monkeypatch, **kw) -> list[dict]:
    """One reader's batches, as data worker `num_workers` > 0 would see them, in this process."""
    worker = kw.pop("worker", 0)
    info = SimpleNamespace(id=worker, num_workers=num_workers) if num_workers else None
    monkeypatch.setattr("framework.data.stream.get_worker_info", lambda: info)
    kw = {"batch_size": 1, "seed": 7, "shardshuffle": True, "resampled": False, "shuffle_buffer": 4, "epochs": 2, **kw}
    return list(ShardStream(urls, KeysAndDraws(), rank=rank, world_size=world_size, **kw))


@pytest.mark.parametrize("sizes", [[7], [7, 4], [7, 4, 9], [7, 4, 9, 1, 6]])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_any_shard_count_over_any_ranks_and_workers_sees_every_key_once_per_epoch(
    tmp_path, monkeypatch, sizes, world_size
):
    urls = _fake_shards(tmp_path, sizes)
    every = sorted(f"s{j}_{i:02d}" for j, n in enumerate(sizes) for i in range(n))
    for num_workers in (0, 1, 2, 3):
        readers = world_size * max(num_workers, 1)
        seen: dict[int, list[str]] = {0: [], 1: []}
        for rank in range(world_size):
            for worker in range(max(num_workers, 1)):
                for b in _stream(urls, rank, world_size, num_workers, monkeypatch, worker=worker):
                    seen[b["cursor"]["epoch"]] += b["key"]
                stream = ShardStream(
                    urls,
                    KeysAndDraws(),
                    1,
                    rank=rank,
                    world_size=world_size,
                    seed=7,
                    shardshuffle=True,
                    resampled=False,
                    shuffle_buffer=0,
                    epochs=1,
                )
                assert len(stream.shards_for(0, worker, readers // world_size)) <= max(2, -(-len(sizes) // readers))
        assert sorted(seen[0]) == sorted(seen[1]) == every, (world_size, num_workers)


def test_a_record_level_stream_resumed_from_a_cursor_continues_exactly(tmp_path, monkeypatch):
    urls = _fake_shards(tmp_path, [7, 4, 9])  # 3 shards, 2 ranks x 3 workers: records split
    for rank, worker in ((0, 0), (1, 2)):
        full = _stream(urls, rank, 2, 3, monkeypatch, worker=worker, batch_size=2, epochs=3)
        assert {b["cursor"]["epoch"] for b in full} == {0, 1, 2}
        for cut in (0, 1, len(full) // 2, len(full) - 2):
            c = full[cut]["cursor"]
            rest = _stream(
                urls,
                rank,
                2,
                3,
                monkeypatch,
                worker=worker,
                batch_size=2,
                epochs=3,
                resume={worker: Cursor(c["epoch"], c["emitted"])},
            )
            assert [(b["key"], b["label"].tolist()) for b in rest] == [
                (b["key"], b["label"].tolist()) for b in full[cut + 1 :]
            ]


def test_one_shard_over_more_ranks_than_records_and_an_endless_stream_without_records(tmp_path):
    write_shards(islice(asset_samples("test"), 3), str(tmp_path / "one-%02d.tar"))
    spec = str(tmp_path / "one-00.tar")

    def keys(rank, epochs=1):
        return keys_of(
            make_loader(data_section(spec, batch_size=2, num_workers=0), X, rank=rank, world_size=4, epochs=epochs)
        )

    assert [len(keys(r)) for r in range(4)] == [1, 1, 1, 0] and len({k for r in range(4) for k in keys(r)}) == 3
    assert (
        len(list(islice(make_loader(data_section(spec, batch_size=2, num_workers=0), X, rank=2, world_size=4), 3))) == 3
    )
    with pytest.raises(ValueError, match="rank 3, data worker 0: no records in epoch 0"):
        keys(3, epochs=None)


def _tar_member(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_bad_records_are_skipped_and_counted(tmp_path):
    samples = list(islice(asset_samples("test"), 6))
    write_shards(samples, str(tmp_path / "good-%02d.tar"), maxcount=10)
    png = io.BytesIO()
    samples[0].image.save(png, format="PNG")
    with tarfile.open(tmp_path / "bad-00.tar", "w") as tar:
        _tar_member(tar, "a.png", b"not a png")  # undecodable
        _tar_member(tar, "a.cls", b"1")
        _tar_member(tar, "b.cls", b"2")  # no image
        _tar_member(tar, "c.png", png.getvalue())
        _tar_member(tar, "c.cls", b"seven")  # bad label
        _tar_member(tar, "d.png", png.getvalue())
        _tar_member(tar, "d.cls", b"3")  # fine
    spec = f"{tmp_path}/good-00.tar::{tmp_path}/bad-00.tar"
    batches = list(make_loader(data_section(spec, batch_size=4, num_workers=0, shardshuffle=False), X, epochs=1))
    assert sorted(k for b in batches for k in b["key"]) == sorted([s.key for s in samples] + ["d"])
    cursor = batches[-1]["cursor"]
    assert cursor["bad"] == 3 and cursor["seen"] == 10 and "bad-00.tar" in cursor["last_bad"]


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_png_record_is_scaled_to_8_bits_not_clipped_to_white(tmp_path, channels):
    """A shard record holding a 16-bit PNG (any writer's shards may): PIL's convert made every pixel above
    255 white; the view gets each pixel's 8 high bits."""
    wide = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 83  # 0..65011
    write_shards([Sample("wide", Image.fromarray(wide), 0)], str(tmp_path / "w-%02d.tar"))
    assert Image.open(io.BytesIO(next(tar_records(str(tmp_path / "w-00.tar")))["png"])).mode == "I;16"
    views = {"x": View(clean_view(28, [0.5] * channels, [0.25] * channels, channels))}
    section = data_section(str(tmp_path / "w-00.tar"), channels=channels, batch_size=1, num_workers=0)
    (batch,) = make_loader(section, views, epochs=1)
    expected = torch.from_numpy((wide >> 8).astype(np.uint8)).expand(channels, 28, 28)
    assert batch["cursor"]["bad"] == 0 and torch.equal(batch["views"]["x"][0], expected)


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_tar_records_reads_what_webdatasets_tarfile_reader_reads(tmp_path, fmt, suffix):
    from webdataset.tariterators import tarfile_samples

    long_dir = "d" * 120  # beyond the 100-byte name field: GNU long name, pax path or ustar prefix
    members = [
        ("dir/a.b/s1.png", b"x" * 700),
        ("dir/a.b/s1.CLS", b"3"),
        (f"{long_dir}/s2.seg.png", b"y" * 10),
        ("__meta__", b"m"),
        (f"{long_dir}/s2.seg.json", b"{}"),
        ("\u00fcn/s3.png", b""),
    ]
    path = tmp_path / f"shard{suffix}"
    with tarfile.open(
        path, "w:gz" if suffix == ".tar.gz" else "w", format=getattr(tarfile, f"{fmt.upper()}_FORMAT")
    ) as tar:
        for name, data in members:
            _tar_member(tar, name, data)
    ours = list(tar_records(str(path)))
    assert ours == list(tarfile_samples([{"url": str(path)}]))
    assert [r["__key__"] for r in ours] == ["dir/a.b/s1", f"{long_dir}/s2", "\u00fcn/s3"]
    assert ours[0]["cls"] == b"3" and ours[1]["seg.png"] == b"y" * 10  # extensions lower-cased, after the first dot


def test_truncated_and_damaged_shards_are_skipped_and_counted(tmp_path):
    samples = list(islice(asset_samples("test"), 12))
    write_shards(samples, str(tmp_path / "s-%02d.tar"), maxcount=4)  # s-00, s-01, s-02: 4 samples each
    first = (tmp_path / "s-00.tar").read_bytes()
    (tmp_path / "s-00.tar").write_bytes(first[: len(first) // 2])  # cut inside a member
    third = bytearray((tmp_path / "s-02.tar").read_bytes())
    third[0] ^= 0xFF  # the first header's name: its checksum no longer holds
    (tmp_path / "s-02.tar").write_bytes(bytes(third))
    with pytest.raises(BadShard, match="truncated"):
        list(tar_records(str(tmp_path / "s-00.tar")))
    with pytest.raises(BadShard, match="checksum"):
        list(tar_records(str(tmp_path / "s-02.tar")))
    spec = f"{tmp_path}/s-{{00..02}}.tar"
    batches = list(make_loader(data_section(spec, batch_size=4, num_workers=0, shardshuffle=False), X, epochs=1))
    keys = [k for b in batches for k in b["key"]]
    assert keys[-4:] == [s.key for s in samples[4:8]]  # the intact shard, whole
    assert set(keys[:-4]) < {s.key for s in samples[:4]}  # what precedes the cut
    cursor = batches[-1]["cursor"]
    assert cursor["bad"] == 2 and "s-02.tar" in cursor["last_bad"] and "checksum" in cursor["last_bad"]


def test_resampled_epochs_are_cut_by_epoch_samples_and_draw_shards_per_rank(tmp_path):
    samples = list(islice(asset_samples("test"), 12))
    write_shards(samples, str(tmp_path / "r-%02d.tar"), maxcount=3)  # 4 shards of 3
    spec, dataset = f"{tmp_path}/r-{{00..03}}.tar", {s.key for s in samples}

    def batches(epoch_samples=None, **kw):
        section = data_section(spec, batch_size=3, num_workers=0, resampled=True, epoch_samples=epoch_samples)
        return list(make_loader(section, X, epochs=2, **kw))

    default = batches()  # an epoch: as many shards as the list holds (4 x 3 records)
    assert sum(len(b["key"]) for b in default) == 24 and {k for b in default for k in b["key"]} <= dataset
    cut = batches(epoch_samples=7)
    assert sum(len(b["key"]) for b in cut) == 14 and cut[-1]["cursor"]["epoch"] == 1
    assert cut[-1]["cursor"]["emitted"] == 7  # the second epoch's records, counted from its start
    ranks = [batches(epoch_samples=8, rank=r, world_size=2) for r in (0, 1)]
    assert [sum(len(b["key"]) for b in rank) for rank in ranks] == [8, 8]  # 8 per epoch over both ranks
    assert [k for b in ranks[0] for k in b["key"]] != [k for b in ranks[1] for k in b["key"]]  # independent draws


def test_views_split_for_the_device_only_where_asked_and_never_a_source():
    """With `on_device` a view with `on_device` runs its worker part (uint8 out) and its batch step is the
    device's; a view another derives from stays whole in the workers; without it every view is as before."""
    from tests.helpers import Brightness, FlipBright, RandomFlip

    bright = OnDevice(RandomFlip(), Brightness())
    views = {**X, "b": View(FlipBright(), on_device=bright), "s": View(FlipBright(), on_device=bright)}
    views["d"] = View(lambda t: -t, source="s")
    worker, deferred, device = split_views(views, on_device=True)
    assert list(device) == ["b"] and device["b"] is bright.batch and set(deferred) == {"x"}
    assert {name: type(t) for name, t, _ in worker if name in "bs"} == {"b": RandomFlip, "s": FlipBright}
    whole = split_views(views)  # data.augment_on=workers: every view whole, as before the device split
    assert [t for name, t, _ in whole.worker if name != "x"] == [views[n].transform for n in "bsd"]
    assert set(whole.deferred) == {"x"} and whole.device == {}
    sample = SampleToViews(views, channels=1, on_device=True)(
        {"__key__": "k", "png": encode_image(next(asset_samples("test")).image), "cls": b"3"}
    )
    assert sample["views"]["b"].dtype == torch.uint8 and sample["views"]["s"].dtype == torch.float32


def test_device_views_draw_the_same_parameters_for_a_row_in_any_number_of_processes():
    """One process of batch 8 and two of batch 4 give each row of the global batch the same parameters,
    whatever the global RNG; the draws change with the step and the micro-step, and are the same again
    for the same (seed, step, micro-step): a resumed run draws what an uninterrupted one did."""
    from tests.helpers import Brightness, RandomFlip

    images = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)

    def run(rank: int, world: int, step: int = 3, micro: int = 1, seed: int = 0) -> torch.Tensor:
        views = {"b": View(RandomFlip(), on_device=OnDevice(RandomFlip(), Brightness()))}
        device = DeviceViews(views, True, torch.device("cpu"), seed, rank, world, 8 // world)
        torch.manual_seed(rank + world)  # the global RNG plays no part
        rows = images[rank * 8 // world : (rank + 1) * 8 // world]
        return device({"b": rows, "x": rows}, step, micro)["b"]

    one = run(0, 1)
    assert torch.equal(one, torch.cat([run(0, 2), run(1, 2)])) and torch.equal(one, run(0, 1))
    assert not torch.equal(one[:4], run(0, 1)[4:]), "each row its own draw"
    for other in (run(0, 1, step=4), run(0, 1, micro=0), run(0, 1, seed=1)):
        assert not torch.equal(one, other)
    views = {"b": View(RandomFlip(), on_device=OnDevice(RandomFlip(), Brightness()))}
    workers = DeviceViews(views, False, torch.device("cpu"), 0, 0, 1, 8)
    assert workers.steps == [] and workers({"b": images}, 3, 1)["b"] is images
