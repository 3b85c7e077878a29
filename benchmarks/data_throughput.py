"""Images per second per data worker at 96 px with the STL-10 AAVAE views (clean x + SimCLR "stl").

    python benchmarks/data_throughput.py [--images 2000] [--out benchmarks/results/data_throughput.json]

(a) augssl's pipeline reading WebDataset shards (1 worker);
(b) torchvision ImageFolder of the same JPEGs, same transforms, plain DataLoader (1 worker);
(c) the same transforms on images already decoded in memory (the ceiling of this transform stack).
Also: records/s of the shard reader alone, augssl's `tar_records` vs webdataset's `tarfile` path.
All three run the worker-side stack (uint8 out, normalisation deferred to the device); the
ceiling with float32 normalisation in the worker is reported beside it.
Run side by side in one invocation, interleaved `--repeats` times (medians reported); the images
are synthetic 96-px RGB (STL-10 cannot be downloaded here), stored as JPEG quality 95 in both (a)
and (b).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from webdataset.tariterators import tarfile_samples  # noqa: E402

from benchmarks.common import write_report  # noqa: E402
from framework.data import make_loader, shard_urls, split_views, tar_records, write_shards  # noqa: E402
from framework.testing import data_section, synthetic_samples  # noqa: E402
from framework.types import View  # noqa: E402
from framework.views import STL10_STATS, clean_view  # noqa: E402
from plugins.blocks import simclr_view  # noqa: E402

SIZE, BATCH = 96, 64


def views() -> dict[str, View]:
    mean, std = STL10_STATS
    return {"x": View(clean_view(SIZE, mean, std, 3)), "aavae.aug": View(simclr_view(SIZE, mean, std, 3, "stl"))}


class BothViews:
    """The same two transforms for the baselines: what a data worker runs (uint8 out; the
    normalisation runs on the training device for all three), or with `normalised=True`
    the whole views, float32 out (the figure before normalisation moved to the device)."""

    def __init__(self, normalised: bool = False) -> None:
        self.transforms = (
            [v.transform for v in views().values()] if normalised else [t for _, t, _ in split_views(views()).worker]
        )

    def __call__(self, image):
        return tuple(t(image) for t in self.transforms)


def rate(iterable, n_images: int) -> float:
    it = iter(iterable)
    next(it)  # warm-up: worker start, first batch
    start, seen = time.perf_counter(), 0
    for batch in it:
        seen += len(batch["key"]) if isinstance(batch, dict) else len(batch[1])
        if seen >= n_images:
            break
    return seen / (time.perf_counter() - start)


def records_per_second(reader, urls: list[str], repeats: int = 3) -> float:
    """Records/s of a shard reader alone (bytes out, nothing decoded); best of `repeats` passes."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(1 for url in urls for _ in reader(url))
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians reported")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.images + 2 * BATCH
    with tempfile.TemporaryDirectory() as tmp:
        samples = list(synthetic_samples(n, SIZE, 3))
        info = write_shards(samples, f"{tmp}/shards/train-%04d.tar", maxcount=500, fmt="jpg", quality=95)
        folder = Path(tmp) / "folder"
        for s in samples:
            (folder / str(s.label)).mkdir(parents=True, exist_ok=True)
            s.image.save(folder / str(s.label) / f"{s.key}.jpg", quality=95)

        decoded = [s.image.convert("RGB") for s in samples]

        def in_memory(both: BothViews) -> float:
            start = time.perf_counter()
            for image in decoded[: args.images]:
                both(image)
            return args.images / (time.perf_counter() - start)

        def shards() -> float:
            section = data_section(info["pattern"], SIZE, 3, batch_size=BATCH, num_workers=1)
            return rate(make_loader(section, views(), epochs=1), args.images)

        def folder_loader() -> float:
            return rate(
                DataLoader(
                    ImageFolder(str(folder), transform=BothViews()), batch_size=BATCH, num_workers=1, shuffle=True
                ),
                args.images,
            )

        configs = {
            "a_shards_pipeline": shards,
            "b_imagefolder_dataloader": folder_loader,
            "c_in_memory_ceiling": lambda: in_memory(BothViews()),
            "c_float32_normalised_in_worker": lambda: in_memory(BothViews(normalised=True)),
        }
        runs: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits all alike
            for name, measure in configs.items():
                runs[name].append(measure())
        median = {name: statistics.median(values) for name, values in runs.items()}
        a, b, c, c_float = median.values()
        readers = {
            "augssl_tar_records": lambda u: tar_records(u),
            "webdataset_tarfile_samples": lambda u: tarfile_samples([{"url": u}]),
        }
        read_rates = {name: records_per_second(reader, shard_urls(info["pattern"])) for name, reader in readers.items()}
    report = {
        "image_size": SIZE,
        "views": "clean x + SimCLR stl (AAVAE STL-10)",
        "images": args.images,
        "workers": 1,
        "repeats": args.repeats,
        "images_per_second_per_worker": median,
        "every_repeat": runs,
        "tar_reading_records_per_second": read_rates,
        "ratios": {"a_over_b": a / b, "a_over_c": a / c, "a_over_c_float32": a / c_float},
        "goals": {"a >= b": a >= b, "a >= 0.8 c": a >= 0.8 * c},
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
