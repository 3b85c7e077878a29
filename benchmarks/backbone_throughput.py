"""Training-step throughput of ResNet-50 vs ViT-S/16 (timm) at 224 and 96 px on this machine's CPU.

    python benchmarks/backbone_throughput.py [--batch 8] [--steps 5] [--threads 2]
        -> benchmarks/results/backbone_throughput.json

One SimCLR step through the engine's `Model.forward` (two views of `--batch` images each, the
projector, NT-Xent, backward, an SGD step) for `timm/resnet50` and `timm/vit_small_patch16_224`
(`img_size` = the image size, so 196 patches at 224 px and 36 at 96 px). The four settings run
side by side, round robin (one step of each in turn, after one warm-up step each), so a load on the
machine falls on all of them alike; the report gives each one's median step time, images/s (the
2 x batch views encoded per step) and the ratios ViT-S/16 / ResNet-50 per size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, write_report  # noqa: E402
from framework.model import Model, weighted_total  # noqa: E402
from framework.startup import validate  # noqa: E402

ENCODERS = {"resnet50": "timm/resnet50", "vit_s16": "timm/vit_small_patch16_224"}


def build(encoder: str, size: int, batch: int):
    """A SimCLR model on `encoder` at `size` px, its optimizer, and a step function."""
    with tempfile.TemporaryDirectory() as out_dir:  # the recipe needs an output_dir; nothing is written to it
        recipe, hooks = validate(
            {
                "output_dir": out_dir,
                "train": {"steps": 1},
                "optim": {"lr": 0.1},
                "data": {"train": "unused", "image_size": size, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
                "plugins": {"backbones": {"encoder": encoder, "latent_dim": None}, "simclr": {"temperature": 0.2}},
            },
            check_data=False,
        )
    torch.manual_seed(0)
    model = Model(hooks, recipe).train()
    weights = model.weights()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    views = {name: torch.randn(batch, 3, size, size) for name in ("x", "simclr.v1", "simclr.v2")}

    def step() -> float:
        start = time.perf_counter()
        terms, _ = model(views, {}, None, step=0)
        weighted_total(terms, weights).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return sum(p.numel() for p in model.encoder.parameters()), step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 96])
    ap.add_argument("--out", default=str(RESULTS / "backbone_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = {(name, size): build(enc, size, args.batch) for size in args.sizes for name, enc in ENCODERS.items()}
    times: dict[tuple[str, int], list[float]] = {key: [] for key in settings}
    for _, step in settings.values():  # warm-up: allocator, first-call dispatch
        step()
    for _ in range(args.steps):
        for key, (_, step) in settings.items():
            times[key].append(step())
    results = {}
    for (name, size), (params, _) in settings.items():
        median = statistics.median(times[(name, size)])
        results[f"{name}_{size}px"] = {
            "encoder": ENCODERS[name],
            "encoder_params": params,
            "step_seconds_median": round(median, 4),
            "images_per_second": round(2 * args.batch / median, 2),
        }
    ratios = {
        f"vit_s16_over_resnet50_{size}px": round(
            results[f"vit_s16_{size}px"]["images_per_second"] / results[f"resnet50_{size}px"]["images_per_second"], 3
        )
        for size in args.sizes
    }
    write_report(
        {
            "what": "SimCLR training step (2 views, projector, NT-Xent, backward, SGD), CPU, float32",
            "batch_per_view": args.batch,
            "timed_steps": args.steps,
            "threads": args.threads,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "results": results,
            "images_per_second_ratios": ratios,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
