"""Linear evaluation of a pretrained run: freeze the encoder, extract pooled features of the
labelled train and test shards, fit a linear classifier, report test accuracy.

The same classifier is fitted on the raw pixels of the clean view, so the report shows
what pretraining bought. Results go to `<output_dir>/eval.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from framework import checkpoint
from framework.data import make_loader
from framework.model import Model
from framework.recipe import Recipe, load_recipe
from framework.types import View
from framework.views import clean_view


@torch.no_grad()
def extract(model: Model, spec: str, recipe: Recipe, batch_size: int, num_workers: int = 2) -> dict[str, torch.Tensor]:
    """Pooled features `h`, raw pixels of the clean view, and labels of every sample in `spec` (one pass)."""
    d = recipe.data
    views = {"x": View(clean_view(d.image_size, d.mean, d.std, d.channels, resize=d.resize))}
    loader = make_loader(
        spec, views, channels=d.channels, batch_size=batch_size, num_workers=num_workers,
        shardshuffle=False, shuffle_buffer=0, epochs=1,
    )  # fmt: skip
    feats, pixels, labels = [], [], []
    for batch in loader:  # inference only: no autograd graph, BatchNorm in eval mode
        x = batch["views"]["x"]
        feats.append(model.encode(x).h.float())
        pixels.append(x.flatten(1))
        labels.append(batch["label"])
    return {"features": torch.cat(feats), "pixels": torch.cat(pixels), "labels": torch.cat(labels)}


def fit_linear(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    l2: float = 1e-4, iters: int = 100,
) -> float:  # fmt: skip
    """Multinomial logistic regression (L-BFGS, full batch, standardised inputs); returns test accuracy."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    linear = torch.nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (linear(test_x).argmax(1) == test_y).float().mean().item()


def load_run(output_dir: str | Path, ckpt: str | Path | None = None) -> tuple[Model, Recipe, Path]:
    """Rebuild a run's model from its resolved recipe and load a checkpoint's weights (newest by default)."""
    output_dir = Path(output_dir)
    path = Path(ckpt) if ckpt else checkpoint.find_resume(output_dir, "auto")
    if path is None:
        raise FileNotFoundError(f"{output_dir}: no complete checkpoint to evaluate")
    recipe, hooks = load_recipe(path / "recipe.yaml", check_data=False)
    model = Model(hooks, recipe)
    model.load_state_dict(load_file(checkpoint.model_weights_file(path)))
    return model.eval(), recipe, path


def evaluate(output_dir: str | Path, ckpt: str | Path | None = None, baseline: bool = True) -> dict[str, Any]:
    """Linear probe on frozen features (and, with `baseline`, on raw pixels); writes and returns `eval.json`."""
    start = time.perf_counter()
    model, recipe, path = load_run(output_dir, ckpt)
    if not (recipe.eval.train and recipe.eval.test):
        raise ValueError(f"{path}/recipe.yaml: eval.train and eval.test (labelled shards) are needed")
    torch.manual_seed(0)
    train = extract(model, recipe.eval.train, recipe, recipe.eval.batch_size)
    test = extract(model, recipe.eval.test, recipe, recipe.eval.batch_size)
    result = {
        "protocol": "linear (L-BFGS logistic regression on frozen pooled features)",
        "checkpoint": str(path),
        "train_samples": len(train["labels"]),
        "test_samples": len(test["labels"]),
        "feature_dim": train["features"].shape[1],
        "accuracy": fit_linear(train["features"], train["labels"], test["features"], test["labels"]),
        "pixel_dim": train["pixels"].shape[1],
    }
    if baseline:
        result["raw_pixels_accuracy"] = fit_linear(train["pixels"], train["labels"], test["pixels"], test["labels"])
    result["seconds"] = round(time.perf_counter() - start, 1)
    (Path(output_dir) / "eval.json").write_text(json.dumps(result, indent=1))
    return result
