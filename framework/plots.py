"""Pictures of a run: `augssl plot RUN` (loss terms and probe accuracy from `metrics.jsonl`)
and the engine's preview grids (views and reconstructions, `save_preview`).

Drawing only: the records come from the caller (`framework.logging.read_metrics`), so this
module imports nothing of the logger, which imports it for previews.

Left panel: `loss` and every loss term `<plugin>.<term>` (log scale when all are positive);
right panel: accuracies (`*.acc`, e.g. the online probe's `probe.acc`) when logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from framework.views import denormalize

SKIP = {"step", "lr", "images/s", "data.bad_records", "data.seen", "skipped_steps", "epoch"}


def plot_metrics(output_dir: str | Path, records: list[dict[str, Any]], out: str | Path | None = None) -> Path:
    """Write `<output_dir>/metrics.png` (or `out`) of the run's metrics `records`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError(f"{output_dir}/metrics.jsonl: no records")
    names = sorted({k for r in records for k in r if k not in SKIP and not k.startswith("lr/")})
    accuracies = [n for n in names if n.endswith(".acc")]
    losses = [n for n in names if n not in accuracies and (n == "loss" or n.count(".") == 1)]
    fig, axes = plt.subplots(1, 2 if accuracies else 1, figsize=(12 if accuracies else 7, 4.5), squeeze=False)
    panels = [(axes[0][0], losses, "loss terms")] + ([(axes[0][1], accuracies, "accuracy")] if accuracies else [])
    for ax, keys, title in panels:
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points, strict=True), label=key, lw=2 if key == "loss" else 1)
        if title == "loss terms" and all(r[k] > 0 for r in records for k in keys if k in r):
            ax.set_yscale("log")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(str(output_dir))
    fig.tight_layout()
    path = Path(out) if out else Path(output_dir) / "metrics.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_preview(
    path: str | Path, rows: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float], n: int = 8
) -> Path:
    """One PNG grid: a labelled row per image batch (B, C, H, W) in `rows` (normalised with
    `mean`/`std`, e.g. the clean view `x`, each augmented view, each reconstruction), `n` columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {name: batch for name, batch in rows.items() if batch.dim() == 4}
    n = min(n, *(len(b) for b in rows.values()))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n + 1.5, 1.2 * len(rows)), squeeze=False)
    for r, (name, batch) in enumerate(rows.items()):
        images = denormalize(batch[:n].detach().float().cpu(), mean, std)
        for c in range(n):
            ax = axes[r][c]
            image = images[c].clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
