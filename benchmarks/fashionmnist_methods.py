"""Accuracy of each method on Fashion-MNIST under the fast, k-NN and linear probes, same
steps, batch and seed; seeds aggregated.

    python benchmarks/fashionmnist_methods.py [--steps 1000] [--seed 0] [--linear-epochs 90]
        [--methods dino aavae_dino --merge]
        -> benchmarks/results/fashionmnist_methods_seed<N>.json (this seed)
        -> benchmarks/results/fashionmnist_methods.json (every seed run with these settings)

Trains recipes/<method>_fashionmnist.yaml for each method (vae, aavae, crvae, simclr,
simclr_affine: conv28 encoder; dino, aavae_dino: a 4-block ViT at patch 4; batch 128) side by
side in one invocation, each from scratch (its output folder is emptied first, so the times
are real), evaluates each with every protocol of `framework.eval` on the frozen pooled
features (the linear one on precomputed features) of the encoder `framework.eval` measures
(the student, or the EMA teacher where that evaluates it), and writes one JSON per seed with
raw pixels, each method (accuracies, backbone, whose features, pretraining epochs, train and
eval seconds). `--merge` keeps the rows of this seed's JSON
(same steps and linear epochs) and adds or replaces those run now, so new methods join the
table without rerunning the old. The summary holds, per method and protocol, every seed's
accuracy, their mean and standard deviation, and the directions checked (AAVAE > VAE,
CR-VAE >= VAE, SimCLR+affine >= SimCLR from the papers; DINO+AAVAE >= DINO, ours) under the
linear probe, judged on the means with the gap compared to the seeds' spread. Needs the
Fashion-MNIST shards of scripts/main.sh (data/fashion-mnist/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_report  # noqa: E402
from framework.eval import PROTOCOLS, evaluate  # noqa: E402

METHODS = ["vae", "aavae", "crvae", "simclr", "simclr_affine", "dino", "aavae_dino"]
BATCH, TRAIN_IMAGES = 128, 60000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--linear-epochs", type=int, default=90)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fashionmnist_methods.json"))
    parser.add_argument("--merge", action="store_true", help="keep this seed's other rows (same settings)")
    args = parser.parse_args()
    out = Path(args.out)
    seed_file = out.with_name(f"{out.stem}_seed{args.seed}.json")

    results = kept_rows(seed_file, args.steps, args.linear_epochs) if args.merge else {}
    for method in args.methods:
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
        baseline = "raw_pixels" not in results
        ev = evaluate(out_dir, baseline=baseline, protocols=PROTOCOLS, epochs=args.linear_epochs)
        if baseline:
            results = {"raw_pixels": {"accuracies": ev["raw_pixels_accuracies"], "dim": ev["pixel_dim"]}, **results}
        results[method] = {
            "accuracies": ev["accuracies"],
            "dim": ev["feature_dim"],
            "backbone": backbone_of(out_dir),
            "features": ev.get("encoder", "student"),  # whose encoder was measured (student or EMA teacher)
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
        "steps": args.steps,
        "seed": args.seed,
        "batch_size": BATCH,
        "linear_epochs": args.linear_epochs,
        "results": results,
    }
    write_report(report, seed_file)
    write_report(summarise(out.parent, out.stem, args.steps, args.linear_epochs), out)


def kept_rows(seed_file: Path, steps: int, linear_epochs: int) -> dict[str, dict]:
    """The rows of an earlier report of this seed (none without one), each naming its backbone and whose
    features were measured (older reports name one encoder for all rows and measure the student). A report run
    with other settings is refused rather than overwritten."""
    if not seed_file.exists():
        return {}
    old = json.loads(seed_file.read_text())
    if (old["steps"], old.get("linear_epochs", linear_epochs)) != (steps, linear_epochs):
        raise SystemExit(
            f"--merge: {seed_file} has steps {old['steps']}, linear epochs {old.get('linear_epochs')}; "
            f"this run {steps}, {linear_epochs}: choose another --out"
        )
    rows = old["results"]
    for method, row in rows.items():
        if method != "raw_pixels":
            row.setdefault("backbone", row.pop("encoder", old.get("encoder")))
            row.setdefault("features", "student")
    return rows


def backbone_of(run: Path) -> str:
    """The encoder of a run, from its resolved recipe: its name and any timm options."""
    backbones = yaml.safe_load((run / "recipe.yaml").read_text())["plugins"]["backbones"]
    options = backbones.get("timm_kwargs") or {}
    return backbones["encoder"] + (f" {json.dumps(options, sort_keys=True)}" if options else "")


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
        for key in ("backbone", "features"):  # one per method: the seeds' rows say the same
            if key in entries[0]:
                table[method][key] = entries[0][key]
    checks = {
        "AAVAE > VAE": ("aavae", "vae", False),
        "CR-VAE >= VAE": ("crvae", "vae", True),
        "SimCLR+affine >= SimCLR": ("simclr_affine", "simclr", True),
        "DINO+AAVAE >= DINO": ("aavae_dino", "dino", True),  # ours: no paper composes the two
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
