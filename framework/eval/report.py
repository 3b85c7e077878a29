"""The accuracies of a pretrained encoder: `evaluate`, the report `augssl eval` prints and writes
to `<output_dir>/eval.json`, and `online_knn`, the k-NN probe the engine logs during training.

`evaluate` freezes the encoder, extracts pooled features of the labelled train and test shards
(`framework.eval.features`), fits each protocol's classifier on them and reports test accuracy.
Protocols (`augssl eval --protocol`):
- `fast`: multinomial logistic regression by full-batch L-BFGS on standardised features
  (seconds; the default, and what `scripts/main.sh` prints).
- `linear`: the offline protocol of docs/methods.md#offline-evaluation: a Linear layer trained by SGD
  (Nesterov, momentum 0.9, lr 0.1 x batch/256, cosine to 0) for `epochs` epochs. By default
  on features extracted once (fast); with `augment=True` the train images get
  RandomCrop(pad 4) + horizontal flip and features are re-extracted every epoch, as the
  paper's protocol does (one encoder pass per epoch).
- `knn`: weighted k-NN (k=200, cosine similarity, votes weighted by exp(sim / 0.07)),
  as solo-learn and lightly report it.

Each classifier is also fitted on the raw pixels of the clean view, so the report shows
what pretraining bought.

Distributed: `accelerate launch launch/evaluate.py RUN` splits feature extraction over the
processes (the expensive part) and gathers the features on every rank, sorted by sample key,
so N processes report what one process reports. `online_knn` is the same k-NN, on a capped
subset, called by the engine every `eval.knn_every` steps.

In a run with an EMA teacher (`framework.teacher`) `evaluate` measures the student's or the teacher's encoder
(`evaluated_encoder`: `augssl eval --encoder`, else the recipe's `teacher.evaluate` or the plugins' choice) and
says which in the report; `online_knn` always probes the student.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from framework.checkpoint import load_encoder, tensors_digest
from framework.distributed import process_state
from framework.eval.classifiers import fit_linear, fit_sgd_linear, knn_accuracy
from framework.eval.features import crop_and_flip, extract
from framework.model import Model
from framework.recipe.schema import DataConfig, EvalConfig
from framework.teacher import EncoderChoice

PROTOCOLS = ("fast", "linear", "knn")


def online_knn(model: Model, data: DataConfig, e: EvalConfig) -> dict[str, float]:
    """`knn.acc`: the k-NN probe of the encoder as it is now, on at most `eval.knn_samples`
    train and test samples. The engine calls it every `eval.knn_every` steps on every rank (the
    features are gathered); the global RNG and the model's train/eval mode are left as they were.

    It probes the student (the online encoder) in every run, also in one with an EMA teacher whatever
    `teacher.evaluate` says: `augssl eval` measures the teacher offline.
    """
    was_training = model.training
    assert e.train and e.test  # eval.knn_every needs them (EvalConfig checks)
    model.eval()
    with torch.random.fork_rng(devices=[]):  # the loader draws seeds: keep a resumed run's noise exact
        train, test = (
            extract(model, spec, data, e.batch_size, data.num_workers, max_samples=e.knn_samples, pixels=False)
            for spec in (e.train, e.test)
        )
    model.train(was_training)
    return {"knn.acc": knn_accuracy(train["features"], train["labels"], test["features"], test["labels"])}


def _labelled(samples: dict[str, torch.Tensor], key: str, spec: str) -> dict[str, torch.Tensor]:
    """`samples`, if every one has a label (not -1, the label of a record without `.cls`); else ValueError."""
    missing = int((samples["labels"] < 0).sum())
    if missing == len(samples["labels"]):
        raise ValueError(f"{key}: no labels in {spec} (no record has a .cls of 0 or more); give labelled shards")
    if missing:
        raise ValueError(f"{key}: {missing} of {len(samples['labels'])} samples in {spec} have no label (.cls)")
    return samples


def evaluate(
    output_dir: str | Path,
    ckpt: str | Path | None = None,
    baseline: bool = True,
    protocols: Sequence[str] = ("fast",),
    epochs: int = 90,
    augment: bool = False,
    knn_k: int = 200,
    knn_temperature: float = 0.07,
    linear_batch_size: int = 256,
    encoder: EncoderChoice | None = None,
) -> dict[str, Any]:
    """Classifiers on frozen features (and, with `baseline`, on raw pixels); writes and returns `eval.json`.

    Under `accelerate launch` every rank extracts its share of the features (see `extract`) and
    fits the same classifiers on all of them, on its device; the main process writes the JSON.

    `accuracies[protocol]` (and `raw_pixels_accuracies`) hold each protocol's test accuracy;
    `accuracy` / `raw_pixels_accuracy` repeat the first protocol's, for older readers;
    `encoder` says which encoder was measured (`framework.teacher.evaluated_encoder`: the argument, `augssl eval
    --encoder`, else the recipe's `teacher.evaluate` or the plugins' choice; `teacher` only in a run with an EMA
    teacher) and `encoder_blake2b` identifies it (`augssl export` shows only its accuracies).

    Refused with a ValueError naming `eval.train` or `eval.test`, before eval.json is touched: shards
    that gave another number of samples than their manifests list (a damaged shard is skipped by
    the stream), and samples without labels.
    """
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown or not protocols:
        raise ValueError(f"protocols {sorted(unknown) or '[]'}: choose from {', '.join(PROTOCOLS)}")
    start = time.perf_counter()
    model, recipe, path, which = load_encoder(output_dir, ckpt, encoder)
    encoder_digest = tensors_digest(model.encoder_of(which).state_dict())
    teacher = which == "teacher"
    model.to(process_state().device)
    train_spec, test_spec = recipe.eval.train, recipe.eval.test
    if not (train_spec and test_spec):
        raise ValueError(f"{path}/recipe.yaml: eval.train and eval.test (labelled shards) are needed")
    torch.manual_seed(0)
    train, test = (
        _labelled(
            extract(model, spec, recipe.data, recipe.eval.batch_size, pixels=baseline, key=key, teacher=teacher),
            key,
            spec,
        )
        for key, spec in (("eval.train", train_spec), ("eval.test", test_spec))
    )

    def reextract(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(epoch)
        fresh = extract(
            model,
            train_spec,
            recipe.data,
            recipe.eval.batch_size,
            transform=lambda x: crop_and_flip(x, generator=g),
            pixels=False,
            teacher=teacher,
        )
        return fresh["features"], fresh["labels"]

    def fit(protocol: str, kind: str) -> float:
        args = (train[kind], train["labels"], test[kind], test["labels"])
        if protocol == "fast":
            return fit_linear(*args)
        if protocol == "knn":
            return knn_accuracy(*args, k=knn_k, temperature=knn_temperature)
        use_aug = augment and kind == "features"  # raw pixels: precomputed, unaugmented
        return fit_sgd_linear(
            *args, epochs=epochs, batch_size=linear_batch_size, reextract=reextract if use_aug else None
        )

    descriptions = {
        "fast": "L-BFGS logistic regression on standardised frozen pooled features",
        "linear": f"SGD Nesterov m=0.9, lr 0.1 x {linear_batch_size}/256, cosine, {epochs} epochs, "
        + (
            "RandomCrop(pad 4)+flip, features re-extracted per epoch"
            if augment
            else "precomputed features, no augmentation"
        ),
        "knn": f"weighted k-NN, k={knn_k}, cosine similarity, temperature {knn_temperature}",
    }
    accuracies = {p: fit(p, "features") for p in protocols}
    result: dict[str, Any] = {
        "protocol": {p: descriptions[p] for p in protocols},
        "checkpoint": str(path),
        "encoder": which,  # student, or teacher: the EMA teacher's copy of the encoder
        "encoder_blake2b": encoder_digest,  # what augssl export compares before it shows these accuracies
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
