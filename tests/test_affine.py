"""Tests for plugins/affine.py (docs/methods.md#affine-head) and the composition of the three plugins."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from framework import Encoding
from framework.logging import read_metrics
from framework.model import Model
from framework.recipe.loading import RecipeError
from framework.startup import load_recipe, validate
from framework.testing import CONV28, run_steps, step_context, tiny_recipe
from plugins import affine
from plugins.blocks import AFFINE_COMPONENTS

RECIPES = Path(__file__).parents[1] / "recipes"
NO_SHARDS = {"train": "none.tar", "test": "none.tar"}
B = 8
WIDTH16 = SimpleNamespace(num_features=16)  # what build_modules reads of a 16-d encoder


def _recipe(tmp_path, backbones=CONV28, others=None, **cfg):
    """A recipe with the affine head on the clean view `x` unless `source` says otherwise."""
    plugins = {"backbones": backbones, **(others or {}), "affine": {"source": "x", **cfg}}
    return validate(tiny_recipe(tmp_path, NO_SHARDS, plugins=plugins), check_data=False)


def _batch(recipe, seed: int = 0):
    """`x` and `affine.view` as the data pipeline makes them: the plugin's transform per sample."""
    torch.manual_seed(seed)
    x = torch.randn(B, 1, 28, 28)
    transform = affine.augment(config=recipe, cfg=recipe.plugins["affine"])["view"].transform
    out, params = zip(*(transform(img) for img in x), strict=True)
    return {"x": x, "affine.view": torch.stack(out)}, {"affine.view": torch.stack(params)}


class LinearEncoder:
    """A stub backbone: h = W view.flatten(1), 16-d, with a trainable W."""

    def __init__(self) -> None:
        self.weight = torch.randn(16, 28 * 28, requires_grad=True)

    def encode(self, view):
        return Encoding(h=view.flatten(1) @ self.weight.T)


def _stub_ctx(recipe, seed: int = 0):
    views, params = _batch(recipe, seed)
    stub = LinearEncoder()
    return step_context(recipe, views, encode=stub.encode, params=params), stub


def _head(recipe, encoder=WIDTH16):
    return torch.nn.ModuleDict(affine.build_modules(cfg=recipe.plugins["affine"], encoder=encoder))


def _loss(recipe, own, ctx):
    return affine.auxiliary_head(ctx=ctx.scoped("affine"), cfg=recipe.plugins["affine"], own=own)["mse"]


# ---------------------------------------------------------------------------
# The head
# ---------------------------------------------------------------------------


def test_head_shape_follows_aggregation(tmp_path):
    r1, r2 = torch.randn(B, 16), torch.randn(B, 16)
    assert affine.aggregate(r1, r2, "diff").shape == (B, 16)
    torch.testing.assert_close(affine.aggregate(r1, r2, "diff"), r1 - r2)
    assert affine.aggregate(r1, r2, "concat").shape == (B, 32)
    for how, width in (("diff", 256), ("concat", 512)):
        head = _head(_recipe(tmp_path, aggregation=how)[0], SimpleNamespace(num_features=256))["head"]
        assert head[0].in_features == width and head[0].out_features == 512
        assert isinstance(head[1], torch.nn.BatchNorm1d) and head[-1].out_features == 6


@pytest.mark.parametrize(("encoder", "dim"), [("conv28", 256), ("resnet18", 512), ("resnet50", 2048)])
def test_head_width_is_the_encoders_num_features(tmp_path, encoder, dim):
    recipe, hooks = _recipe(tmp_path, backbones={**CONV28, "encoder": encoder, "decoder": None})
    model = Model(hooks, recipe)
    assert model.encoder.num_features == dim
    assert model.plugins["affine"]["head"][0].in_features == dim
    assert _head(recipe, SimpleNamespace(num_features=100))["head"][0].in_features == 100  # any encoder


def test_loss_is_mse_over_the_enabled_components_only(tmp_path):
    recipe, _ = _recipe(tmp_path, components=["scale", "angle"])
    assert recipe.plugins["affine"].components == ["angle", "scale"]  # canonical order
    own = _head(recipe)
    ctx, _ = _stub_ctx(recipe)
    target = ctx.params["affine.view"]
    # disabled components are held at identity in the view itself
    torch.testing.assert_close(target[:, [1, 2, 4, 5]], torch.zeros(B, 4))
    assert (target[:, 0] != 0).all()
    loss = _loss(recipe, own, ctx)

    h1, h2 = ctx.encode("x").h, ctx.encode("affine.view").h
    pred = own["head"](h1 - h2)
    torch.testing.assert_close(loss, F.mse_loss(pred[:, [0, 3]], target[:, [0, 3]]))

    ctx.params["affine.view"] = target + torch.tensor([0, 5.0, 5.0, 0, 5.0, 5.0])  # disabled columns
    torch.testing.assert_close(_loss(recipe, own, ctx), loss)
    ctx.params["affine.view"] = target + torch.tensor([5.0, 0, 0, 0, 0, 0])  # an enabled one
    assert _loss(recipe, own, ctx) > loss + 1


def test_unknown_or_empty_components_are_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"plugins\.affine\.components"):
        _recipe(tmp_path, components=["angle", "zoom"])
    with pytest.raises(RecipeError, match=r"plugins\.affine\.components"):
        _recipe(tmp_path, components=[])


def test_view_is_derived_from_the_source(tmp_path):
    recipe, _ = _recipe(tmp_path, others={"aavae": {}}, source="aavae.aug")
    view = affine.augment(config=recipe, cfg=recipe.plugins["affine"])["view"]
    assert view.source == "aavae.aug" and view.transform.components == frozenset(AFFINE_COMPONENTS)
    plain = _recipe(tmp_path)[0]
    assert affine.augment(config=plain, cfg=plain.plugins["affine"])["view"].source == "x"
    recipe.plugins["affine"].source = "simclr.v1"  # no simclr in this recipe
    with pytest.raises(ValueError, match="simclr"):
        affine.augment(config=recipe, cfg=recipe.plugins["affine"])


@pytest.mark.parametrize(
    ("others", "expected"),
    [
        ({"simclr": {}}, "simclr.v1"),
        ({"byol": {}}, "byol.v1"),
        ({"barlow": {}}, "barlow.v1"),
        ({"aavae": {}}, "aavae.aug"),
        ({"kl": {}, "consistency": {"lambda": 1.0}}, "consistency.t"),
        ({"aavae": {}, "consistency": {"lambda": 1.0}}, "aavae.aug"),  # the first in recipe order
    ],
)
def test_the_default_source_is_the_base_methods_first_augmented_view(tmp_path, others, expected):
    plugins = {"backbones": CONV28, **others, "affine": {}}
    recipe = validate(tiny_recipe(tmp_path, NO_SHARDS, plugins=plugins), check_data=False)[0]
    assert recipe.plugins["affine"].source is None and affine.source_of(recipe.plugins["affine"], recipe) == expected
    assert affine.augment(config=recipe, cfg=recipe.plugins["affine"])["view"].source == expected


def test_without_an_augmented_view_the_default_source_is_refused(tmp_path):
    plugins = {"backbones": CONV28, "kl": {}, "affine": {}}
    recipe = validate(tiny_recipe(tmp_path, NO_SHARDS, plugins=plugins), check_data=False)[0]
    with pytest.raises(ValueError, match=r"source: no plugin of the recipe makes an augmented view"):
        affine.augment(config=recipe, cfg=recipe.plugins["affine"])


@pytest.mark.parametrize("aggregation", ["diff", "concat"])
def test_gradients_reach_the_encoder_through_both_passes(tmp_path, aggregation):
    recipe, hooks = _recipe(tmp_path, aggregation=aggregation)
    model = Model(hooks, recipe).train()
    views, params = _batch(recipe, seed=1)
    ctx = model.context(views, params)
    r1, r2 = ctx.encode("x").h, ctx.encode("affine.view").h  # the cached encodings the plugin reuses
    r1.retain_grad()
    r2.retain_grad()
    _loss(recipe, model.plugins["affine"], ctx).backward()
    assert r1.grad is not None and r1.grad.abs().sum() > 0
    assert r2.grad is not None and r2.grad.abs().sum() > 0
    if aggregation == "diff":
        torch.testing.assert_close(r1.grad, -r2.grad)
    first_conv = model.plugins["backbones"]["encoder"][0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_stub_encoder_gets_gradient_from_each_pass(tmp_path):
    """Detaching either pass changes the encoder's gradient: both contribute."""
    recipe, _ = _recipe(tmp_path)
    own = _head(recipe)
    ctx, stub = _stub_ctx(recipe, seed=2)
    _loss(recipe, own, ctx).backward()
    full = stub.weight.grad.clone()
    for detached in ("x", "affine.view"):
        ctx2 = step_context(recipe, ctx.views, encode=stub.encode, params=ctx.params)
        enc = ctx2.encode(detached)
        enc.h = enc.h.detach()
        stub.weight.grad = None
        _loss(recipe, own, ctx2).backward()
        assert not torch.allclose(stub.weight.grad, full)


# ---------------------------------------------------------------------------
# Attachment to the autoencoders, and the three-plugin composition
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "source", "base_terms"),
    [({"kl": {}}, "x", {"kl.recon", "kl.kl"}), ({"aavae": {}}, "aavae.aug", {"aavae.recon"})],
)
def test_attaches_to_an_autoencoder(tmp_path, fmnist_shards, base, source, base_terms):
    plugins = {"backbones": CONV28, **base, "affine": {"source": source, "weight": 10.0}}
    records = read_metrics(run_steps(tiny_recipe(tmp_path, fmnist_shards, plugins=plugins), steps=2))
    for r in records:
        assert base_terms | {"affine.mse"} <= set(r)
        assert r["loss"] == pytest.approx(sum(r[t] for t in base_terms) + 10.0 * r["affine.mse"], rel=1e-5)


def test_aavae_consistency_affine_compose(tmp_path, fmnist_shards):
    plugins = {
        "backbones": CONV28,
        "aavae": {},
        "consistency": {"lambda": 0.5, "weight": 0.5},
        "affine": {"source": "aavae.aug", "weight": 3.0},
    }
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards, plugins=plugins), steps=2)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    weights = {
        "aavae.recon": 1.0,
        "consistency.recon_t": 0.5,
        "consistency.kl_t": 0.5,
        "consistency.consistency": 0.5,
        "affine.mse": 3.0,
    }
    for r in records:
        assert set(weights) <= set(r)
        assert not {"consistency.recon_x", "consistency.kl_x"} & set(r)  # aavae stands for L_vae(x)
        assert all(torch.isfinite(torch.tensor(r[t])) and r[t] >= 0 for t in weights)
        assert r["loss"] == pytest.approx(sum(w * r[t] for t, w in weights.items()), rel=1e-5)
        assert r["skipped_steps"] == 0


def test_composition_recipe_validates():
    recipe, _ = load_recipe(RECIPES / "aavae_crvae_affine_stl10.yaml", check_data=False)
    assert set(recipe.plugins) == {"backbones", "aavae", "consistency", "affine"}
    assert recipe.plugins["affine"].source == "aavae.aug"
    assert recipe.plugins["backbones"].encoder == "resnet50"  # the head's input: 2048-d
    aa, _ = load_recipe(RECIPES / "aavae_stl10.yaml", check_data=False)
    assert recipe.plugins["backbones"] == aa.plugins["backbones"] and recipe.train == aa.train
