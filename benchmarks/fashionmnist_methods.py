"""Accuracy of each method on Fashion-MNIST under the fast, k-NN and linear probes, same
encoder, steps and seed.

    python benchmarks/fashionmnist_methods.py [--steps 1000] [--seed 0] [--linear-epochs 90]
        -> benchmarks/results/fashionmnist_methods.json

Trains recipes/{vae,aavae,crvae,simclr,simclr_affine}_fashionmnist.yaml (conv28 encoder,
batch 128) side by side in one invocation, each from scratch (its output folder is
emptied first, so the times are real), evaluates each with every protocol of
`framework.evaluate` on the frozen pooled features (the linear one on precomputed
features), and writes one JSON with raw pixels, each method (accuracies, pretraining
epochs, train and eval seconds), and the papers' directions (AAVAE > VAE, CR-VAE >= VAE,
SimCLR+affine >= SimCLR) under the linear probe. Needs the Fashion-MNIST shards of
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
from framework.evaluate import PROTOCOLS, evaluate  # noqa: E402

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
            [sys.executable, str(ROOT / "launch" / "train.py"), str(ROOT / "recipes" / f"{method}_fashionmnist.yaml"),
             f"train.steps={args.steps}", f"train.seed={args.seed}", f"output_dir={out_dir}"],
            check=True, cwd=ROOT,
        )  # fmt: skip
        train_s = time.perf_counter() - start
        ev = evaluate(out_dir, baseline=i == 0, protocols=PROTOCOLS, epochs=args.linear_epochs)
        if i == 0:
            results["raw_pixels"] = {"accuracies": ev["raw_pixels_accuracies"], "dim": ev["pixel_dim"]}
        results[method] = {"accuracies": ev["accuracies"], "dim": ev["feature_dim"],
                           "pretraining_epochs": round(args.steps * BATCH / TRAIN_IMAGES, 2),
                           "train_seconds": round(train_s, 1), "eval_seconds": ev["seconds"]}  # fmt: skip
        print(json.dumps({method: results[method]}), flush=True)

    def acc(m: str) -> float | None:
        return results.get(m, {}).get("accuracies", {}).get("linear")

    checks = {"AAVAE > VAE": ("aavae", "vae", False), "CR-VAE >= VAE": ("crvae", "vae", True),
              "SimCLR+affine >= SimCLR": ("simclr_affine", "simclr", True)}  # fmt: skip
    directions = {}
    for name, (a, b, ties) in checks.items():
        if acc(a) is not None and acc(b) is not None:
            directions[name] = bool(acc(a) >= acc(b)) if ties else bool(acc(a) > acc(b))
    report = {
        "dataset": "fashion-mnist (60000 train / 10000 test)",
        "protocols": {"fast": "L-BFGS logistic regression", "knn": "weighted k-NN, k=200, T=0.07, cosine",
                      "linear": f"SGD Nesterov, cosine, {args.linear_epochs} epochs, precomputed features"},
        "encoder": "conv28", "steps": args.steps, "seed": args.seed, "batch_size": BATCH,
        "results": results, "paper_directions_hold": directions,
    }  # fmt: skip
    write_report(report, args.out)


if __name__ == "__main__":
    main()
