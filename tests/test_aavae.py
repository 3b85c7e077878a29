"""Tests for plugins/aavae.py (docs/methods.md#aavae): encode t(x), reconstruct the clean x, no KL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.transforms import v2

from framework import Encoding
from framework.logging import read_metrics
from framework.model import Model
from framework.startup import load_recipe, validate
from framework.testing import CONV28, run_steps, step_context, tiny_recipe
from plugins import aavae
from plugins.blocks import gaussian_nll, infer_strength

RECIPES = Path(__file__).parents[1] / "recipes"
NO_SHARDS = {"train": "none.tar", "test": "none.tar"}


class IdentityAE:
    """A stub encoder/decoder: z is the flattened view, the decoder reshapes it back.

    With it, the reconstruction is exactly the encoded view, so the loss says which image
    was encoded and which one is the target. `encoded` records what was encoded.
    """

    def __init__(self) -> None:
        self.encoded: list[torch.Tensor] = []

    def encode(self, view):
        self.encoded.append(view)
        z = view.flatten(1)
        return Encoding(h=z, mu=z, logvar=torch.zeros_like(z), z=z)

    def decode(self, encoding):
        return encoding.z.view(-1, 1, 28, 28)


def _terms(recipe, views, stub):
    ctx = step_context(recipe, views, encode=stub.encode, decode=stub.decode, plugin="aavae")
    return aavae.regularize(ctx=ctx, cfg=recipe.plugins["aavae"])


def _recipe(tmp_path, **aavae_cfg):
    data = tiny_recipe(tmp_path, NO_SHARDS, plugins={"backbones": CONV28, "aavae": aavae_cfg})
    return validate(data, check_data=False)[0]


def _views(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(8, 1, 28, 28, generator=g),
        "aavae.aug": torch.randn(8, 1, 28, 28, generator=g),
    }


def test_reconstructs_the_clean_x_from_the_augmented_view(tmp_path):
    recipe, views, stub = _recipe(tmp_path), _views(), IdentityAE()
    terms = _terms(recipe, views, stub)
    assert set(terms) == {"recon"}  # no KL term
    assert len(stub.encoded) == 1 and stub.encoded[0] is views["aavae.aug"]
    # x_hat is the augmented view itself: the loss is its distance to x, computed by hand
    expected = 0.5 * (views["aavae.aug"] - views["x"]).pow(2).sum() / 8
    torch.testing.assert_close(terms["recon"], expected)
    assert terms["recon"] > 100  # reconstructing the augmented view would give 0 here


def test_bernoulli_likelihood_targets_x_in_unit_range(tmp_path):
    recipe, views = _recipe(tmp_path, likelihood="bernoulli"), _views(1)
    terms = _terms(recipe, views, IdentityAE())
    target = (views["x"] * 0.25 + 0.5).clamp(0, 1)  # tiny_recipe: mean 0.5, std 0.25
    logits = views["aavae.aug"]
    expected = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 8
    torch.testing.assert_close(terms["recon"], expected)


def test_real_backbone_loss_by_hand(tmp_path):
    """With the real conv28 encoder/decoder (eval: z = mu), recon = gaussian_nll(dec(mu(t(x))), x)."""
    recipe, hooks = validate(
        tiny_recipe(tmp_path, NO_SHARDS, plugins={"backbones": CONV28, "aavae": {}}),
        check_data=False,
    )
    model = Model(hooks, recipe).eval()
    views = _views(2)
    with torch.no_grad():
        terms = aavae.regularize(ctx=model.context(views, {}).scoped("aavae"), cfg=recipe.plugins["aavae"])
        own = model.plugins["backbones"]
        mu, _ = own["head"](own["encoder"](views["aavae.aug"]))
        x_hat = own["decoder"](mu)
    torch.testing.assert_close(terms["recon"], gaussian_nll(x_hat, views["x"]))
    assert not torch.allclose(terms["recon"], gaussian_nll(x_hat, views["aavae.aug"]))


def test_needs_a_vae_head(tmp_path):
    class NoHead(IdentityAE):
        def encode(self, view):
            return Encoding(h=view.flatten(1))

    with pytest.raises(ValueError, match="latent_dim"):
        _terms(_recipe(tmp_path), _views(), NoHead())


@pytest.mark.parametrize(
    ("size", "channels", "expected"),
    [(28, 1, "mnist"), (96, 1, "mnist"), (32, 3, "cifar"), (96, 3, "stl"), (64, 3, "stl")],
)
def test_default_strength_follows_the_data(tmp_path, size, channels, expected):
    data = tiny_recipe(tmp_path, NO_SHARDS, size=size, channels=channels, plugins={"backbones": CONV28, "aavae": {}})
    assert infer_strength(validate(data, check_data=False)[0]) == expected


def _blurs(view) -> bool:
    return any(
        isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur)
        for t in view.transform.transforms
    )


def test_augment_builds_the_simclr_view(tmp_path):
    base = tiny_recipe(tmp_path, NO_SHARDS, size=96, channels=3, plugins={"backbones": CONV28, "aavae": {}})
    recipe = validate(base, check_data=False)[0]
    view = aavae.augment(config=recipe, cfg=recipe.plugins["aavae"])["aug"]
    assert view.source is None and _blurs(view)  # 96 px RGB -> "stl" (blur)
    out = view.transform(Image.new("RGB", (120, 100), (200, 10, 30)))
    assert out.shape == (3, 96, 96)
    recipe.plugins["aavae"].strength = "cifar"  # an explicit choice wins
    assert not _blurs(aavae.augment(config=recipe, cfg=recipe.plugins["aavae"])["aug"])


def test_trains_and_logs_recon_only(tmp_path, fmnist_shards):
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards, plugins={"backbones": CONV28, "aavae": {}}), steps=2)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert {k for k in r if k.startswith("aavae.")} == {"aavae.recon", "aavae.logvar_mean"}
        assert torch.isfinite(torch.tensor(r["aavae.recon"])) and r["aavae.recon"] > 0
        assert r["loss"] == pytest.approx(r["aavae.recon"], rel=1e-5)


@pytest.mark.parametrize("name", ["aavae_fashionmnist", "aavae_cifar10", "aavae_stl10"])
def test_recipes_validate(name):
    recipe, _ = load_recipe(RECIPES / f"{name}.yaml", check_data=False)
    online_probe = {"probe"} if name.endswith("fashionmnist") else set()  # from _fashionmnist.yaml
    assert set(recipe.plugins) == {"backbones", "aavae"} | online_probe
    assert recipe.plugins["backbones"].latent_dim is not None and recipe.plugins["backbones"].decoder


def test_aavae_fashionmnist_matches_the_vae_recipe():
    """Same encoder, latent size and length as the VAE, so the two are comparable."""
    vae, _ = load_recipe(RECIPES / "vae_fashionmnist.yaml", check_data=False)
    aa, _ = load_recipe(RECIPES / "aavae_fashionmnist.yaml", check_data=False)
    assert aa.plugins["backbones"] == vae.plugins["backbones"]
    assert aa.train == vae.train and aa.data == vae.data
