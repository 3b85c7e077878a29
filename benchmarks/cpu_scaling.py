"""Data-parallel scaling on CPU: 2 processes x 1 thread against 1 process x 1 thread, same
per-process batch, same recipe, under `accelerate launch` (gloo all-reduce).

    python benchmarks/cpu_scaling.py [--steps 40] [--recipe recipes/aavae_fashionmnist.yaml]
        -> benchmarks/results/cpu_scaling.json

Both runs are launched side by side in one invocation (one after the other, the machine
otherwise idle), read the same shards and log images/s every 10 steps; the first logged
window (start-up, first batches) is dropped and the median of the rest is taken.
Efficiency = images/s(2 procs) / (2 x images/s(1 proc)); 1.0 is perfect scaling. Needs the
Fashion-MNIST shards of scripts/main.sh, or any recipe whose `data.train` exists.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_report  # noqa: E402
from framework.logging import read_metrics  # noqa: E402
from framework.testing import free_port  # noqa: E402


def run(recipe: str, processes: int, steps: int, batch: int, out: Path) -> dict:
    launch = [
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    if processes > 1:
        launch.insert(0, "--multi_gpu")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch,
        str(ROOT / "launch" / "train.py"),
        recipe,
        f"output_dir={out}",
        f"train.steps={steps}",
        "log.every=10",
        f"checkpoint.every={10 * steps}",
        f"data.batch_size={batch}",
        "data.num_workers=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    rates = [r["images/s"] for r in read_metrics(out)][1:]
    return {
        "processes": processes,
        "threads_per_process": 1,
        "batch_per_process": batch,
        "images_per_second": statistics.median(rates),
        "windows": rates,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "aavae_fashionmnist.yaml"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_scaling.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(args.recipe, 1, args.steps, args.batch, Path(tmp) / "one")
        two = run(args.recipe, 2, args.steps, args.batch, Path(tmp) / "two")
    report = {
        "benchmark": "cpu_scaling",
        "recipe": Path(args.recipe).name,
        "steps": args.steps,
        "cores": os.cpu_count(),
        "backend": "gloo (accelerate MULTI_CPU)",
        "one_process": one,
        "two_processes": two,
        "speedup": two["images_per_second"] / one["images_per_second"],
        "efficiency": two["images_per_second"] / (2 * one["images_per_second"]),
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
