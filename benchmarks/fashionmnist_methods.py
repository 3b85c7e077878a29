"""Accuracy of each method on Fashion-MNIST under the fast, k-NN and linear probes, same
encoder, steps and seed; seeds aggregated.

    python benchmarks/fashionmnist_methods.py [--steps 1000] [--seed 0] [--linear-epochs 90]
        -> benchmarks/results/fashionmnist_methods_seed<N>.json (this seed)
        -> benchmarks/results/fashionmnist_methods.json (every seed run with these settings)

Trains recipes/{vae,aavae,crvae,simclr,simclr_affine}_fashionmnist.yaml (conv28 encoder,
batch 128) side by side in one invocation, each from scratch (its output folder is
emptied first, so the times are real), evaluates each with every protocol of
`framework.eval` on the frozen pooled features (the linear one on precomputed
features), and writes one JSON per seed with raw pixels, each method (accuracies,
pretraining epochs, train and eval seconds). The summary holds, per method and protocol,
every seed's accuracy, their mean and standard deviation, and the papers' directions
(AAVAE > VAE, CR-VAE >= VAE, SimCLR+affine >= SimCLR) under the linear probe, judged on
the means with the gap compared to the seeds' spread. Needs the Fashion-MNIST shards of
scripts/main.sh (data/fashion-mnist/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_report  # noqa: E402
from framework.eval import PROTOCOLS, evaluate  # noqa: E402

METHODS = ["vae", "aavae", "crvae", "simclr", "simclr_affine"]
BATCH, TRAIN_IMAGES = 128, 60000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--linear-epochs", type=int, default=90)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fashionmnist_methods.json"))
    args = parser.parse_args()

    results: dict[str, dict] = {}
    for i, method in enumerate(args.methods):
        out_dir = ROOT / "runs" / "bench" / f"{method}_s{args.steps}_seed{args.seed}"
        shutil.rmtree(out_dir, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "launch" / "train.py"),
                str(ROOT / "recipes" / f"{method}_fashionmnist.yaml"),
                f"train.steps={args.steps}",
                f"train.seed={args.seed}",
                f"output_dir={out_dir}",
            ],
            check=True,
            cwd=ROOT,
        )
        train_s = time.perf_counter() - start
        ev = evaluate(out_dir, baseline=i == 0, protocols=PROTOCOLS, epochs=args.linear_epochs)
        if i == 0:
            results["raw_pixels"] = {"accuracies": ev["raw_pixels_accuracies"], "dim": ev["pixel_dim"]}
        results[method] = {
            "accuracies": ev["accuracies"],
            "dim": ev["feature_dim"],
            "pretraining_epochs": round(args.steps * BATCH / TRAIN_IMAGES, 2),
            "train_seconds": round(train_s, 1),
            "eval_seconds": ev["seconds"],
        }
        print(json.dumps({method: results[method]}), flush=True)

    report = {
        "dataset": "fashion-mnist (60000 train / 10000 test)",
        "protocols": {
            "fast": "L-BFGS logistic regression",
            "knn": "weighted k-NN, k=200, T=0.07, cosine",
            "linear": f"SGD Nesterov, cosine, {args.linear_epochs} epochs, precomputed features",
        },
        "encoder": "conv28",
        "steps": args.steps,
        "seed": args.seed,
        "batch_size": BATCH,
        "linear_epochs": args.linear_epochs,
        "results": results,
    }
    out = Path(args.out)
    write_report(report, out.with_name(f"{out.stem}_seed{args.seed}.json"))
    write_report(summarise(out.parent, out.stem, args.steps, args.linear_epochs), out)


def summarise(folder: Path, stem: str, steps: int, linear_epochs: int) -> dict:
    """Every `<stem>_seed*.json` in `folder` run with these settings: per method and protocol the
    seeds' accuracies (percent), mean and (sample) standard deviation, and the mean times; the
    papers' directions on the means."""
    runs = [json.loads(f.read_text()) for f in sorted(folder.glob(f"{stem}_seed*.json"))]
    runs = [r for r in runs if r["steps"] == steps and r.get("linear_epochs", linear_epochs) == linear_epochs]
    table: dict[str, dict] = {}
    for method in dict.fromkeys(m for r in runs for m in r["results"]):  # first-seen order
        entries = [r["results"][method] for r in runs if method in r["results"]]
        table[method] = {p: _stats([100 * e["accuracies"][p] for e in entries]) for p in PROTOCOLS}  # percent
        for key in ("pretraining_epochs", "train_seconds", "eval_seconds"):
            if key in entries[0]:
                table[method][key] = _stats([e[key] for e in entries])["mean"]
    checks = {
        "AAVAE > VAE": ("aavae", "vae", False),
        "CR-VAE >= VAE": ("crvae", "vae", True),
        "SimCLR+affine >= SimCLR": ("simclr_affine", "simclr", True),
    }
    directions = {}
    for name, (a, b, ties) in checks.items():
        if a in table and b in table:
            gap = table[a]["linear"]["mean"] - table[b]["linear"]["mean"]  # points
            spread = max(table[a]["linear"]["std"], table[b]["linear"]["std"])
            directions[name] = {
                "holds": bool(gap >= 0 if ties else gap > 0),
                "gap_points": round(gap, 2),
                "gap_over_seed_std": round(gap / spread, 2) if spread else None,
            }
    return {
        "steps": steps,
        "linear_epochs": linear_epochs,
        "seeds": [r["seed"] for r in runs],
        "methods": table,
        "paper_directions_linear": directions,
    }


def _stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"values": [round(v, 2) for v in values], "mean": round(mean, 2), "std": round(std, 2)}


if __name__ == "__main__":
    main()
