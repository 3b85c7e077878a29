"""Plugin `simclr`: NT-Xent against a loop-by-loop formula, the head, the views, 2 real steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from framework import hookimpl
from framework.logging import read_metrics
from framework.model import Model
from framework.startup import load_recipe, validate
from framework.testing import run_steps, tiny_recipe
from plugins.blocks import infer_strength, multi_crop_nt_xent, nt_xent

CONTRASTIVE_BACKBONE = {"encoder": "conv28", "latent_dim": None}

ROOT = Path(__file__).resolve().parents[1]
NAME = "simclr"


def nt_xent_by_loops(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """The SimCLR paper's l(i, j), written out: 2N anchors, one positive each, the rest negatives."""
    z = [*z1.double(), *z2.double()]
    n = len(z1)

    def sim(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))

    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        numerator = math.exp(sim(z[i], z[positive]) / temperature)
        denominator = sum(math.exp(sim(z[i], z[k]) / temperature) for k in range(2 * n) if k != i)
        total += -math.log(numerator / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_the_formula(temperature):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 5, generator=g)
    z2 = z1 + 0.5 * torch.randn(6, 5, generator=g)
    got = nt_xent(z1, z2, temperature)
    assert got.item() == pytest.approx(nt_xent_by_loops(z1, z2, temperature), rel=1e-5)


def test_nt_xent_fixed_values():
    e = torch.eye(4)
    # 2N = 4 mutually orthogonal embeddings: every logit is 0, so each anchor's loss is log(2N - 1).
    assert nt_xent(e[:2], e[2:], 0.5).item() == pytest.approx(math.log(3), rel=1e-6)
    # Aligned pairs of orthogonal samples: positive cos 1, the 2 negatives cos 0.
    assert nt_xent(e[:2], e[:2], 0.5).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)
    # Cosine similarity: the scale of an embedding does not matter.
    z = torch.randn(4, 3)
    assert nt_xent(3 * z, z, 0.5).item() == pytest.approx(nt_xent(z, z, 0.5).item(), rel=1e-6)


def test_nt_xent_gradient_flows_to_both_views():
    z1, z2 = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    nt_xent(z1, z2, 0.5).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_nt_xent_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must both be"):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3))


def _recipe(tmp_path, shards, size=28, channels=1, **simclr):
    plugins = {"backbones": CONTRASTIVE_BACKBONE, "simclr": simclr}
    return tiny_recipe(tmp_path, shards, plugins=plugins, size=size, channels=channels)


def test_config_defaults_and_inference(tmp_path, fmnist_shards):
    cfg, _ = validate(_recipe(tmp_path, fmnist_shards), check_data=False)
    own = cfg.plugins["simclr"]
    assert (own.temperature, own.output_dim, own.strength) == (0.5, 128, None)
    assert infer_strength(cfg, None) == "mnist" and infer_strength(cfg, "stl") == "stl"
    for size, strength in ((32, "cifar"), (96, "stl")):
        rgb, _ = validate(_recipe(tmp_path, fmnist_shards, size=size, channels=3), check_data=False)
        assert infer_strength(rgb, None) == strength


def test_projection_head_and_views(tmp_path, fmnist_shards):
    cfg, hooks = validate(_recipe(tmp_path, fmnist_shards, output_dim=32), check_data=False)
    head = Model(hooks, cfg).plugins["simclr"]["projector"]  # sized by the encoder's num_features
    layers = [type(m) for m in head]
    assert layers == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (256, 256, 32)
    views = hooks.augment(cfg)
    assert {"simclr.v1", "simclr.v2"} <= set(views)
    solo, hooks = validate(_recipe(tmp_path, fmnist_shards, output_dim=256, proj_hidden_dim=2048), check_data=False)
    head = Model(hooks, solo).plugins["simclr"]["projector"]  # solo-learn's CIFAR projector: 2048 hidden, 256-d
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (256, 2048, 256)


def test_trains_two_steps_and_logs_nt_xent(tmp_path, fmnist_shards):
    out = run_steps(_recipe(tmp_path, fmnist_shards), steps=2)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        # batch 8: 2N = 16 embeddings; chance level is log(15) ~ 2.71
        assert 0 < r["simclr.nt_xent"] < 2 * math.log(15)
        assert r["loss"] == pytest.approx(r["simclr.nt_xent"])


def test_fashionmnist_recipe_is_comparable_to_the_vae():
    simclr, _ = load_recipe(ROOT / "recipes/simclr_fashionmnist.yaml", check_data=False)
    vae, _ = load_recipe(ROOT / "recipes/vae_fashionmnist.yaml", check_data=False)
    assert simclr.plugins["backbones"].encoder == vae.plugins["backbones"].encoder == "conv28"
    assert simclr.plugins["backbones"].latent_dim is None
    assert simclr.data == vae.data and simclr.train == vae.train and simclr.eval == vae.eval


def test_nt_xent_runs_in_float32_under_autocast():
    z1, z2 = torch.randn(8, 4).bfloat16(), torch.randn(8, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nt_xent(z1, z2, 0.1)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(nt_xent_by_loops(z1.float(), z2.float(), 0.1), rel=1e-5)


# --- multi-crop (docs/methods.md#multi-crop) ----------------------------------------------


def multi_crop_by_loops(crops: list[torch.Tensor], temperature: float) -> float:
    """solo-learn's simclr_loss_func with indexes repeated per crop, written out: every crop of the same image
    is a positive, `-log(sum_pos exp(s) / sum_{all but self} exp(s))` per anchor, the mean over anchors."""
    b = len(crops[0])
    z = [(k, i, v) for k, c in enumerate(crops) for i, v in enumerate(c.double())]

    def sim(a: torch.Tensor, c: torch.Tensor) -> float:
        return float(a @ c) / (math.sqrt(float(a @ a)) * math.sqrt(float(c @ c)))

    total = 0.0
    for k, i, a in z:
        others = [(kk, ii, c) for kk, ii, c in z if (kk, ii) != (k, i)]
        positive = sum(math.exp(sim(a, c) / temperature) for _, ii, c in others if ii == i)
        total += -math.log(positive / sum(math.exp(sim(a, c) / temperature) for _, _, c in others))
    return total / (len(crops) * b)


def test_multi_crop_nt_xent_with_two_crops_is_nt_xent():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = (z1.detach() + 0.5 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    for temperature in (0.2, 0.5):
        want, got = nt_xent(z1, z2, temperature), multi_crop_nt_xent([z1, z2], temperature)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
        want_grads = torch.autograd.grad(want, [z1, z2])
        for g_got, g_want in zip(torch.autograd.grad(got, [z1, z2]), want_grads, strict=True):
            torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-15)
    f1, f2 = z1.detach().float(), z2.detach().float()
    torch.testing.assert_close(multi_crop_nt_xent([f1, f2], 0.5), nt_xent(f1, f2, 0.5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_multi_crop_nt_xent_matches_the_formula_for_three_and_four_crops(temperature):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(5, 4, generator=g)
    for k in (3, 4):
        crops = [base + 0.7 * torch.randn(5, 4, generator=g) for _ in range(k)]
        got = multi_crop_nt_xent(crops, temperature).item()
        assert got == pytest.approx(multi_crop_by_loops(crops, temperature), rel=1e-5)


def test_multi_crop_nt_xent_fixed_value_and_bad_input():
    e = torch.eye(6)
    # 3 crops of 2 images, all 6 embeddings orthogonal: every logit 0; 2 positives among 5 others: log(5 / 2)
    assert multi_crop_nt_xent([e[0:2], e[2:4], e[4:6]], 0.5).item() == pytest.approx(math.log(5 / 2), rel=1e-6)
    # the 3 crops of an image identical, the 2 images orthogonal: 2 e^(1/T) over 2 e^(1/T) + 3
    same = e[:2]
    want = math.log((2 * math.exp(2) + 3) / (2 * math.exp(2)))
    assert multi_crop_nt_xent([same, same, same], 0.5).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 crops"):
        multi_crop_nt_xent([same], 0.5)
    with pytest.raises(ValueError, match="same shape"):
        multi_crop_nt_xent([same, e[:3]], 0.5)


class ViewShapes:
    """Records the shapes of the views the plugins see."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}

    @hookimpl
    def regularize(self, ctx):
        self.shapes = {k: tuple(v.shape) for k, v in ctx.views.items()}
        return {}


def test_trains_two_steps_with_multi_crop(tmp_path, fmnist_shards):
    crops = {"global": {"count": 2, "scale": [0.14, 1.0]}, "local": {"count": 2, "size": 16}}
    spy = ViewShapes()
    out = run_steps(_recipe(tmp_path, fmnist_shards, crops=crops), steps=2, extra_plugins={"spy": spy})
    assert {k: v for k, v in spy.shapes.items() if k.startswith(NAME)} == {
        "simclr.v1": (8, 1, 28, 28),
        "simclr.v2": (8, 1, 28, 28),
        "simclr.l1": (8, 1, 16, 16),
        "simclr.l2": (8, 1, 16, 16),
    }
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        # 4 crops x batch 8: 31 others, 3 positives each; chance level log(31 / 3) ~ 2.34
        assert 0 < r["simclr.nt_xent"] < 2 * math.log(31 / 3)
        assert r["loss"] == pytest.approx(r["simclr.nt_xent"])
