"""Images per second of `augssl shards imagefolder` (`write_shards`) with 1 and with 2 processes.

    python benchmarks/shard_writer.py [--images 2000] [--size 256] [--format jpg] [--repeats 2]
                                      [--out benchmarks/results/shard_writer.json]

An ImageFolder of `--images` synthetic JPEGs (quality 90, `--size` px, 10 classes of coloured
blobs with noise) is written to a temporary folder, then converted to shards (5000 per shard,
`--format`, quality 95) by `write_shards(image_folder_files(...), processes=P)` for P = 1 and 2,
interleaved `--repeats` times (medians reported) so a slow spell of the machine hits both alike;
each run checks that its shards are byte for byte those of the first one-process run. Each run
is a whole call, worker start included; the forkserver's one-off start (it imports the framework
once per writing process) is timed apart as `worker_start_seconds`. The load average is
recorded, and the speed-up of each repeat beside the medians': on a machine busy with other
work the figures swing from one repeat to the next and the speed-up is less than the cores give.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_report  # noqa: E402
from framework.data.shards import write_shards  # noqa: E402
from framework.data.sources import image_folder_files  # noqa: E402
from framework.testing import synthetic_samples  # noqa: E402


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--format", choices=["png", "jpg"], default="jpg")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; medians reported")
    parser.add_argument("--note", default="", help="what the machine was doing meanwhile, for the report")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shard_writer.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "folder"
        for s in synthetic_samples(args.images, args.size, 3):
            (folder / str(s.label)).mkdir(parents=True, exist_ok=True)
            s.image.save(folder / str(s.label) / f"{s.key}.jpg", quality=90)
        folder_bytes = sum(p.stat().st_size for p in folder.rglob("*.jpg"))
        out = Path(tmp) / "shards"
        pattern = str(out / "train-%06d.tar")

        def write(processes: int, files: list) -> float:
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            write_shards(files, pattern, fmt=args.format, quality=95, processes=processes)
            return time.perf_counter() - start

        files = image_folder_files(folder)
        start = time.perf_counter()
        write(2, files[:4])  # starts the forkserver: once per writing process
        worker_start = time.perf_counter() - start
        seconds: dict[int, list[float]] = {1: [], 2: []}
        reference: dict[str, bytes] | None = None
        for _ in range(args.repeats):
            for processes in seconds:
                seconds[processes].append(write(processes, files))
                written = shard_bytes(out)
                reference = reference or written
                if written != reference:
                    raise SystemExit(f"processes={processes}: the shards differ from one process's")
        shard_total = sum(len(b) for b in reference.values()) if reference else 0
    median = {p: statistics.median(s) for p, s in seconds.items()}
    rate = {p: args.images / m for p, m in median.items()}
    report = {
        "images": args.images,
        "image_size": args.size,
        "source": f"ImageFolder of synthetic JPEGs, quality 90, {folder_bytes / args.images / 1e3:.1f} kB each",
        "format": f"{args.format}, quality 95" if args.format == "jpg" else args.format,
        "shard_bytes": shard_total,
        "repeats": args.repeats,
        "images_per_second": {f"{p}_processes": round(r, 1) for p, r in rate.items()},
        "images_per_second_per_process": {f"{p}_processes": round(r / p, 1) for p, r in rate.items()},
        "speedup_2_over_1": round(rate[2] / rate[1], 3),
        "speedup_per_repeat": [round(one / two, 2) for one, two in zip(seconds[1], seconds[2], strict=True)],
        "seconds": {f"{p}_processes": [round(s, 2) for s in v] for p, v in seconds.items()},
        "worker_start_seconds": round(worker_start, 2),
        "byte_identical": True,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "note": args.note,
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
