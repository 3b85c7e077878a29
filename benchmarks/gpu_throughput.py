"""GPU throughput and peak memory, DDP against DeepSpeed ZeRO-2, bf16, end to end through
`launch/train.py` (the real engine, the streaming pipeline and its data workers included):

- AAVAE, ResNet-50 (STL stem) + ResNet-50 decoder, 96 px (recipes/aavae_stl10.yaml);
- SimCLR, ResNet-18 (CIFAR stem), 32 px (recipes/simclr_cifar10.yaml).

    python benchmarks/gpu_throughput.py [--gpus N] [--steps 60] -> benchmarks/results/gpu_throughput.json

Synthetic images (STL-10 and CIFAR-10 cannot be downloaded here) are written as JPEG
shards first. Every run logs images/s (all ranks) and peak GPU memory (rank 0, from
`torch.cuda.max_memory_allocated`) every 10 steps; the first window (start-up, cuDNN
autotuning) is dropped, the median of the rest is reported. bf16 comes from the launch
(`--mixed_precision bf16`), as a user's would; the recipe sets none. Without CUDA it writes a
JSON saying so and exits 0, unless `--cpu-smoke` (tiny batches, CPU bf16 autocast, DDP and
ZeRO-2 on gloo: checks that the script and both rows work, its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_report  # noqa: E402
from framework.data import write_shards  # noqa: E402
from framework.logging import read_metrics  # noqa: E402
from framework.testing import free_port, synthetic_samples  # noqa: E402

MODELS = {  # name: (recipe, image size, per-GPU batch)
    "aavae_resnet50_96px": ("aavae_stl10.yaml", 96, 256),
    "simclr_resnet18_32px": ("simclr_cifar10.yaml", 32, 256),
}
MODES = {"ddp": [], "zero2": ["--use_deepspeed", "--zero_stage", "2"]}


def shards(root: Path, size: int, n: int, readers: int) -> str:
    """`n` synthetic JPEGs in at least 16 shards, and at least one per reader (GPUs x workers): any
    count streams, but whole shards per reader read each record once, as large datasets do."""
    pattern = root / f"synthetic_{size}px" / "train-%06d.tar"
    maxcount = max(1, n // max(16, readers))
    return write_shards(synthetic_samples(n, size, 3), str(pattern), maxcount=maxcount, fmt="jpg")["pattern"]


def run(recipe: str, spec: str, mode: str, args: argparse.Namespace, batch: int, out: Path) -> dict:
    launch = [
        "--num_processes",
        str(args.gpus),
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *MODES[mode],
    ]
    if mode == "ddp" and args.gpus > 1:
        launch.insert(0, "--multi_gpu")
    log_every = 1 if args.cpu_smoke else 10
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch,
        str(ROOT / "launch" / "train.py"),
        str(ROOT / "recipes" / recipe),
        f"output_dir={out}",
        f"data.train={spec}",
        f"data.batch_size={batch}",
        f"data.num_workers={args.workers}",
        f"train.steps={args.steps}",
        f"log.every={log_every}",
        f"checkpoint.every={10 * args.steps}",
        "optim.warmup_steps=0",
        "optim.optimizer=adam",  # one optimizer in every mode: DeepSpeed's ZeRO cannot step the recipes' LARS
        "eval.train=null",
        "eval.test=null",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()] or [f"exit {proc.returncode}"]
        return {"error": next((ln for ln in lines if ln.startswith("augssl")), lines[-1])}
    records = read_metrics(out)[1:] or read_metrics(out)
    return {
        "images_per_second": statistics.median(r["images/s"] for r in records),
        "peak_memory_gib": max((r.get("memory/peak_gib", 0.0) for r in records), default=0.0),
        "batch_per_gpu": batch,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=max(1, torch.cuda.device_count()))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=min(12, (os.cpu_count() or 2) - 1))
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--cpu-smoke", action="store_true", help="run on CPU with tiny batches (checks the script)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_throughput.json"))
    args = ap.parse_args()
    report: dict = {"benchmark": "gpu_throughput", "steps": args.steps}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        report["skipped"] = "no CUDA device: run it on a GPU machine"
    else:
        report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke test)"
        report.update({"gpus": args.gpus, "precision": "bf16", "results": {}})
        modes = list(MODES)
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models:
                recipe, size, batch = MODELS[name]
                batch = 4 if args.cpu_smoke else batch
                spec = shards(Path(tmp), size, 64 if args.cpu_smoke else 8192, args.gpus * max(1, args.workers))
                for mode in modes:
                    result = run(recipe, spec, mode, args, batch, Path(tmp) / f"{name}_{mode}")
                    report["results"][f"{name}/{mode}"] = result
                    print(json.dumps({f"{name}/{mode}": result}), flush=True)
                    Path(args.out).write_text(json.dumps(report, indent=1))  # a time limit keeps what was measured
            for name in args.models:
                ddp, zero = (report["results"].get(f"{name}/{m}", {}) for m in ("ddp", "zero2"))
                if "images_per_second" in ddp and "images_per_second" in zero:
                    report["results"][f"{name}/zero2_over_ddp_images_per_second"] = (
                        zero["images_per_second"] / ddp["images_per_second"]
                    )
    write_report(report, args.out)


if __name__ == "__main__":
    main()
