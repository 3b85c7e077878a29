"""Linear evaluation: the probe itself, and `launch/evaluate.py` on a trained run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from framework.evaluate import fit_linear
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
