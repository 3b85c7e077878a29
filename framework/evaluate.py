"""Evaluation of a pretrained run: freeze the encoder, extract pooled features of the labelled
train and test shards, fit a classifier on them, report test accuracy.

Protocols (`augssl eval --protocol`):
- `fast`: multinomial logistic regression by full-batch L-BFGS on standardised features
  (seconds; the default, and what `scripts/main.sh` prints).
- `linear`: the offline protocol of METHODS.md section 2: a Linear layer trained by SGD
  (Nesterov, momentum 0.9, lr 0.1 x batch/256, cosine to 0) for `epochs` epochs. By default
  on features extracted once (fast); with `augment=True` the train images get
  RandomCrop(pad 4) + horizontal flip and features are re-extracted every epoch, as the
  paper's protocol does (one encoder pass per epoch).
- `knn`: weighted k-NN (k=200, cosine similarity, votes weighted by exp(sim / 0.07)),
  as solo-learn and lightly report it.

Each classifier is also fitted on the raw pixels of the clean view, so the report shows
what pretraining bought. Results go to `<output_dir>/eval.json`.

Distributed: `accelerate launch launch/evaluate.py RUN` splits feature extraction over the
processes (the expensive part) and gathers the features on every rank, sorted by sample key,
so N processes report what one process reports. `online_knn` is the same k-NN, on a capped
subset, called by the engine every `eval.knn_every` steps.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather, gather_object, pad_across_processes
from safetensors.torch import load_file

from framework import checkpoint
from framework.data import batch_to_device, clean_x_view, make_loader
from framework.distributed import process_state
from framework.model import Model
from framework.recipe import Recipe, load_recipe

PROTOCOLS = ("fast", "linear", "knn")


def crop_and_flip(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomCrop(size, padding=pad) + RandomHorizontalFlip on a batch (B, C, H, W), per sample.

    Applied to the normalised clean view; zero padding is then the dataset mean.
    """
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def extract(
    model: Model, spec: str, recipe: Recipe, batch_size: int, num_workers: int = 2,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None, max_samples: int | None = None,
    pixels: bool = True,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Pooled features `h`, raw pixels of the clean view (unless `pixels=False`), and labels of the
    samples in `spec`, sorted by sample key, on this process's device.

    Distributed: each rank encodes its share of the shards (split like training's) and every rank
    receives all of them, so a run on N processes extracts N times faster and fits the same
    classifier as one process. `max_samples` caps the samples (the first of each rank's share; the
    shard order is fixed, so the subset is the same every call). `transform` (e.g. `crop_and_flip`)
    is applied to each batch of the clean view before encoding.
    """
    state = process_state()
    d = recipe.data
    loader = make_loader(
        spec, {"x": clean_x_view(d)}, channels=d.channels, batch_size=batch_size, num_workers=num_workers,
        rank=state.process_index, world_size=state.num_processes, shardshuffle=False, shuffle_buffer=0, epochs=1,
    )  # fmt: skip
    cap = None if max_samples is None else math.ceil(max_samples / state.num_processes)
    dtype = next(model.parameters()).dtype  # bf16 under DeepSpeed's bf16 mode
    parts: dict[str, list] = {"features": [], "labels": [], "keys": [], **({"pixels": []} if pixels else {})}
    for batch in loader:  # inference only: no autograd graph, BatchNorm in eval mode (the caller's)
        x = batch_to_device(batch, state.device)[0]["x"]
        if transform is not None:
            x = transform(x)
        parts["features"].append(model.encode(x.to(dtype)).h.float())
        if pixels:
            parts["pixels"].append(x.flatten(1).float())
        parts["labels"].append(batch["label"].to(state.device))
        parts["keys"] += batch["key"]
        if cap is not None and len(parts["keys"]) >= cap:
            break
    n = len(parts["keys"]) if cap is None else min(cap, len(parts["keys"]))
    local = {k: torch.cat(v)[:n] if v else None for k, v in parts.items() if k != "keys"}
    result = _gather_sorted(local, parts["keys"][:n], state)
    if not len(result["labels"]):
        raise ValueError(f"{spec}: no samples to extract features from")
    return result


def _gather_sorted(local: dict[str, torch.Tensor | None], keys: list[str], state: Any) -> dict[str, torch.Tensor]:
    """Every rank's rows, concatenated on every rank and sorted by sample key (an order that does
    not depend on the number of processes or loader workers).

    A rank without rows (`None`: more ranks and workers than samples) takes part in every
    collective with empty tensors of the other ranks' shape and dtype.
    """
    if state.num_processes > 1:
        counts = gather(torch.tensor([len(keys)], device=state.device)).tolist()
        keys = gather_object(keys)
        # each tensor's row shape and dtype, from the ranks that have rows
        like = [s for s in gather_object([{k: (t.shape[1:], t.dtype) for k, t in local.items() if t is not None}]) if s]
        for name, t in local.items() if like else ():
            if t is None:
                shape, dtype = like[0][name]
                t = torch.empty((0, *shape), dtype=dtype, device=state.device)
            padded = gather(pad_across_processes(t, dim=0))  # (num_processes * longest, ...)
            rows = padded.shape[0] // state.num_processes
            local[name] = torch.cat([padded[r * rows : r * rows + c] for r, c in enumerate(counts)])
    if not keys:  # no rank has a sample (extract says so)
        return {name: torch.empty(0, device=state.device) for name in local}
    order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__), device=state.device)
    return {name: t[order] for name, t in local.items()}


def fit_linear(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    l2: float = 1e-4, iters: int = 100,
) -> float:  # fmt: skip
    """Multinomial logistic regression (L-BFGS, full batch, standardised inputs); returns test accuracy."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    linear = torch.nn.Linear(train_x.shape[1], classes).to(train_x.device)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (linear(test_x).argmax(1) == test_y).float().mean().item()


def fit_sgd_linear(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    epochs: int = 90, batch_size: int = 256, lr: float | None = None, weight_decay: float = 0.0,
    reextract: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None, seed: int = 0,
) -> float:  # fmt: skip
    """The offline linear protocol: SGD (Nesterov, m=0.9, lr 0.1 x batch/256 unless given), cosine schedule
    over every step; returns test accuracy.

    Inputs are standardised with the first epoch's train statistics (a fixed affine map: the same
    model class, better conditioned). `reextract(epoch)` returns fresh (features, labels) of the
    augmented train set for epochs after the first.
    """
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    classes = int(max(train_y.max(), test_y.max())) + 1
    linear = torch.nn.Linear(train_x.shape[1], classes).to(train_x.device)
    lr = 0.1 * batch_size / 256 if lr is None else lr
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_y) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for epoch in range(epochs):
        if reextract is not None and epoch > 0:
            train_x, train_y = reextract(epoch)
        order = torch.randperm(len(train_y), generator=g).to(train_x.device)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = torch.nn.functional.cross_entropy(linear((train_x[idx] - mean) / std), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (linear((test_x - mean) / std).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    k: int = 200, temperature: float = 0.07, chunk: int = 1024,
) -> float:  # fmt: skip
    """Weighted k-NN on L2-normalised features: the k most cosine-similar train samples vote with
    weight exp(sim / temperature) (solo-learn / lightly); returns test accuracy."""
    train_x = torch.nn.functional.normalize(train_x.float(), dim=1)
    test_x = torch.nn.functional.normalize(test_x.float(), dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_y))
    correct = 0
    for i in range(0, len(test_y), chunk):
        sim, idx = (test_x[i : i + chunk] @ train_x.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), classes, device=sim.device).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[i : i + chunk]).sum().item()
    return correct / len(test_y)


def online_knn(model: Model, recipe: Recipe) -> dict[str, float]:
    """`knn.acc`: the k-NN probe of the encoder as it is now, on at most `eval.knn_samples`
    train and test samples. The engine calls it every `eval.knn_every` steps on every rank (the
    features are gathered); the global RNG and the model's train/eval mode are left as they were.
    """
    e, was_training = recipe.eval, model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):  # the loader draws seeds: keep a resumed run's noise exact
        train, test = (extract(model, spec, recipe, e.batch_size, recipe.data.num_workers, max_samples=e.knn_samples,
                               pixels=False) for spec in (e.train, e.test))  # fmt: skip
    model.train(was_training)
    return {"knn.acc": knn_accuracy(train["features"], train["labels"], test["features"], test["labels"])}


def load_run(output_dir: str | Path, ckpt: str | Path | None = None) -> tuple[Model, Recipe, Path]:
    """Rebuild a run's model from its resolved recipe and load a checkpoint's weights (newest by default)."""
    output_dir = Path(output_dir)
    path = Path(ckpt) if ckpt else checkpoint.find_resume(output_dir, "auto")
    if path is None:
        raise FileNotFoundError(f"{output_dir}: no complete checkpoint to evaluate")
    if not (path / checkpoint.STATE_FILE).is_file():
        raise FileNotFoundError(f"--checkpoint {path}: not a complete checkpoint (no {checkpoint.STATE_FILE})")
    recipe, hooks = load_recipe(path / "recipe.yaml", check_data=False)
    model = Model(hooks, recipe)
    model.load_state_dict(load_file(checkpoint.model_weights_file(path)))
    return model.eval(), recipe, path


def evaluate(
    output_dir: str | Path, ckpt: str | Path | None = None, baseline: bool = True,
    protocols: Sequence[str] = ("fast",), epochs: int = 90, augment: bool = False,
    knn_k: int = 200, knn_temperature: float = 0.07, linear_batch_size: int = 256,
) -> dict[str, Any]:  # fmt: skip
    """Classifiers on frozen features (and, with `baseline`, on raw pixels); writes and returns `eval.json`.

    Under `accelerate launch` every rank extracts its share of the features (see `extract`) and
    fits the same classifiers on all of them, on its device; the main process writes the JSON.

    `accuracies[protocol]` (and `raw_pixels_accuracies`) hold each protocol's test accuracy;
    `accuracy` / `raw_pixels_accuracy` repeat the first protocol's, for older readers.
    """
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown or not protocols:
        raise ValueError(f"protocols {sorted(unknown) or '[]'}: choose from {', '.join(PROTOCOLS)}")
    start = time.perf_counter()
    model, recipe, path = load_run(output_dir, ckpt)
    model.to(process_state().device)
    if not (recipe.eval.train and recipe.eval.test):
        raise ValueError(f"{path}/recipe.yaml: eval.train and eval.test (labelled shards) are needed")
    torch.manual_seed(0)
    train, test = (extract(model, spec, recipe, recipe.eval.batch_size, pixels=baseline)
                   for spec in (recipe.eval.train, recipe.eval.test))  # fmt: skip

    def reextract(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(epoch)
        fresh = extract(model, recipe.eval.train, recipe, recipe.eval.batch_size,
                        transform=lambda x: crop_and_flip(x, generator=g), pixels=False)  # fmt: skip
        return fresh["features"], fresh["labels"]

    def fit(protocol: str, kind: str) -> float:
        args = (train[kind], train["labels"], test[kind], test["labels"])
        if protocol == "fast":
            return fit_linear(*args)
        if protocol == "knn":
            return knn_accuracy(*args, k=knn_k, temperature=knn_temperature)
        use_aug = augment and kind == "features"  # raw pixels: precomputed, unaugmented
        return fit_sgd_linear(*args, epochs=epochs, batch_size=linear_batch_size, reextract=reextract if use_aug else None)

    descriptions = {
        "fast": "L-BFGS logistic regression on standardised frozen pooled features",
        "linear": f"SGD Nesterov m=0.9, lr 0.1 x {linear_batch_size}/256, cosine, {epochs} epochs, "
        + ("RandomCrop(pad 4)+flip, features re-extracted per epoch" if augment else "precomputed features, no augmentation"),
        "knn": f"weighted k-NN, k={knn_k}, cosine similarity, temperature {knn_temperature}",
    }
    accuracies = {p: fit(p, "features") for p in protocols}
    result: dict[str, Any] = {
        "protocol": {p: descriptions[p] for p in protocols},
        "checkpoint": str(path),
        "dataset": {"train": recipe.eval.train, "test": recipe.eval.test},
        "train_samples": len(train["labels"]),
        "test_samples": len(test["labels"]),
        "feature_dim": train["features"].shape[1],
        "accuracies": accuracies,
        "accuracy": accuracies[protocols[0]],
        "pixel_dim": recipe.data.channels * recipe.data.image_size**2,
    }
    if baseline:
        result["raw_pixels_accuracies"] = {p: fit(p, "pixels") for p in protocols}
        result["raw_pixels_accuracy"] = result["raw_pixels_accuracies"][protocols[0]]
    result["seconds"] = round(time.perf_counter() - start, 1)
    if process_state().is_main_process:
        (Path(output_dir) / "eval.json").write_text(json.dumps(result, indent=1))
    return result
