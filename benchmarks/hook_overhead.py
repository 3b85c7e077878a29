"""What the plugin machinery costs: the engine's step (Model.forward through pluggy hooks,
weighted sum, backward, Adam step) vs a hand-written PyTorch step computing the same AAVAE
loss on the same modules and batch. ResNet-18 (CIFAR stem), 32 px, batch 64, CPU.

    python benchmarks/hook_overhead.py [--steps 20] [--threads 2]   -> benchmarks/results/hook_overhead.json

Reports the median step time of each and their ratio (engine / hand-written; 1.0 = no overhead).
"""

from __future__ import annotations

import argparse
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
from plugins.blocks import posterior_std, reconstruction_nll  # noqa: E402

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS / "hook_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out_dir:  # the recipe needs an output_dir; nothing is written to it
        recipe, hooks = validate(
            {
                "output_dir": out_dir,
                "train": {"steps": 1},
                "optim": {"lr": 2.5e-4},
                "data": {"train": "unused", "image_size": 32, "channels": 3, "mean": MEAN, "std": STD},
                "plugins": {
                    "backbones": {"encoder": "resnet18", "stem": "cifar", "decoder": "resnet18", "latent_dim": 128},
                    "aavae": {"likelihood": "gaussian"},
                },
            },
            check_data=False,
        )
    torch.manual_seed(0)
    model = Model(hooks, recipe).train()
    weights = model.weights()
    own = model.plugins["backbones"]
    opt = torch.optim.Adam(model.parameters(), lr=2.5e-4)
    x, aug = torch.randn(args.batch, 3, 32, 32), torch.randn(args.batch, 3, 32, 32)

    def engine_step() -> None:
        terms, _ = model({"x": x, "aavae.aug": aug}, {}, None, step=0)
        weighted_total(terms, weights).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain_step() -> None:
        mu, logvar = own["head"](own["encoder"](aug))
        z = mu + posterior_std(logvar) * torch.randn_like(mu)
        loss = reconstruction_nll(own["decoder"](z), x, "gaussian", MEAN, STD)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"engine": [], "plain": []}
    for _ in range(3):
        engine_step(), plain_step()  # warm-up
    for _ in range(args.steps):  # interleaved, so drift hits both alike
        for name, fn in (("engine", engine_step), ("plain", plain_step)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "hook_overhead",
        "model": "AAVAE ResNet-18 cifar stem, 32 px",
        "batch": args.batch,
        "device": "cpu",
        "threads": args.threads,
        "steps": args.steps,
        "median_step_s": med,
        "ratio_engine_over_plain": med["engine"] / med["plain"],
    }
    write_report(result, args.out)


if __name__ == "__main__":
    main()
