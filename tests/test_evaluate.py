"""Linear evaluation: the probe itself, and `launch/evaluate.py` on a trained run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from framework.cli import eval_main
from framework.evaluate import crop_and_flip, fit_linear, fit_sgd_linear, knn_accuracy
from framework.testing import run_steps, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_linear_probe_separable_classes_and_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(5, 16, generator=g)
    y = torch.randint(0, 5, (2000,), generator=g)
    x = centers[y] + torch.randn(2000, 16, generator=g)
    assert fit_linear(x[:1500], y[:1500], x[1500:], y[1500:]) > 0.97
    shuffled = y[torch.randperm(2000, generator=g)]
    assert abs(fit_linear(x[:1500], shuffled[:1500], x[1500:], shuffled[1500:]) - 0.2) < 0.08


def _blobs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = 4 * torch.randn(5, 16, generator=g)
    y = torch.randint(0, 5, (2000,), generator=g)
    return centers[y] + torch.randn(2000, 16, generator=g), y, y[torch.randperm(2000, generator=g)]


def test_sgd_linear_protocol_separable_classes_and_shuffled_labels():
    x, y, shuffled = _blobs()
    assert fit_sgd_linear(x[:1500], y[:1500], x[1500:], y[1500:], epochs=10) > 0.97
    assert abs(fit_sgd_linear(x[:1500], shuffled[:1500], x[1500:], shuffled[1500:], epochs=10) - 0.2) < 0.08


def test_sgd_linear_protocol_reextracts_features_each_epoch():
    x, y, _ = _blobs()
    seen = []

    def reextract(epoch):
        seen.append(epoch)
        return x[:1500] + 0.1 * torch.randn(1500, 16), y[:1500]

    assert fit_sgd_linear(x[:1500], y[:1500], x[1500:], y[1500:], epochs=4, reextract=reextract) > 0.97
    assert seen == [1, 2, 3]


def test_knn_separable_classes_and_shuffled_labels():
    x, y, shuffled = _blobs()
    assert knn_accuracy(x[:1500], y[:1500], x[1500:], y[1500:]) > 0.97
    assert abs(knn_accuracy(x[:1500], shuffled[:1500], x[1500:], shuffled[1500:]) - 0.2) < 0.08


def test_knn_is_a_weighted_nearest_neighbour_vote():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[0.2, 1.0], [1.0, 0.05]])
    assert knn_accuracy(train, labels, test, torch.tensor([1, 0]), k=1) == 1.0
    # k=3: two far neighbours of class 0 are outweighed by one near neighbour of class 1 (temperature 0.07)
    assert knn_accuracy(train, labels, test[:1], torch.tensor([1]), k=3) == 1.0
    assert knn_accuracy(train, labels, test[:1], torch.tensor([1]), k=3, temperature=100.0) == 0.0


def test_crop_and_flip_shifts_and_mirrors():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).view(2, 3, 8, 8)
    out = crop_and_flip(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)


def test_evaluate_a_trained_run(tmp_path, fmnist_shards):
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards, train={"checkpoint_every": 2}), steps=2)
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "linear probe, test accuracy (192 train / 96 test images)" in proc.stdout
    assert "raw pixels" in proc.stdout and str(out) in proc.stdout
    result = json.loads((out / "eval.json").read_text())
    assert result["train_samples"] == 192 and result["test_samples"] == 96
    assert 0.1 < result["accuracy"] <= 1 and 0.4 < result["raw_pixels_accuracy"] <= 1  # real images: above chance
    assert result["checkpoint"].endswith("step_00000002")


def test_eval_all_protocols(tmp_path, fmnist_shards, capsys):
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards, train={"checkpoint_every": 2}), steps=2)
    eval_main([str(out), "--protocol", "all", "--epochs", "2", "--augment"])
    printed = capsys.readouterr().out
    assert "frozen-feature classifiers, test accuracy (192 train / 96 test images)" in printed
    assert "fast" in printed and "linear" in printed and "knn" in printed and "re-extracted" in printed
    result = json.loads((out / "eval.json").read_text())
    assert set(result["accuracies"]) == set(result["raw_pixels_accuracies"]) == {"fast", "linear", "knn"}
    assert result["dataset"] == {"train": fmnist_shards["train"], "test": fmnist_shards["test"]}
    assert result["raw_pixels_accuracies"]["knn"] > 0.4  # real images: above chance (0.1)
    assert all(0 < acc <= 1 for acc in result["accuracies"].values())
