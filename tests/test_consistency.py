"""Tests for plugins/consistency.py (docs/methods.md#cr-vae) and the KLs it uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.distributions import Normal, kl_divergence

from framework import Encoding
from framework.logging import read_metrics
from framework.recipe.loading import RecipeError
from framework.startup import load_recipe, validate
from framework.testing import CONV28, run_steps, step_context, tiny_recipe
from plugins import consistency
from plugins.blocks import kl_gaussians, kl_standard_normal
from plugins.kl import beta_at

RECIPES = Path(__file__).parents[1] / "recipes"
NO_SHARDS = {"train": "none.tar", "test": "none.tar"}
B, LATENT = 8, 5


def _std(logvar: torch.Tensor) -> torch.Tensor:
    return torch.exp(logvar / 2) + 1e-6  # as plugins.blocks.vae and the backbone


def _posterior(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, LATENT, generator=g), torch.randn(B, LATENT, generator=g)


# ---------------------------------------------------------------------------
# The analytic KLs against torch.distributions
# ---------------------------------------------------------------------------


def test_kl_standard_normal_matches_torch_distributions():
    mu, logvar = _posterior(0)
    expected = kl_divergence(Normal(mu, _std(logvar)), Normal(0.0, 1.0)).sum(1).mean()
    torch.testing.assert_close(kl_standard_normal(mu, logvar), expected)
    assert kl_standard_normal(torch.zeros(B, LATENT), torch.zeros(B, LATENT)).abs() < 1e-4


def test_kl_gaussians_matches_torch_distributions_and_is_directed():
    (mu_q, lv_q), (mu_p, lv_p) = _posterior(1), _posterior(2)
    expected = kl_divergence(Normal(mu_q, _std(lv_q)), Normal(mu_p, _std(lv_p))).sum(1).mean()
    torch.testing.assert_close(kl_gaussians(mu_q, lv_q, mu_p, lv_p), expected)
    assert not torch.allclose(kl_gaussians(mu_p, lv_p, mu_q, lv_q), expected)  # KL is not symmetric


# ---------------------------------------------------------------------------
# The plugin's terms, with a stub encoder/decoder
# ---------------------------------------------------------------------------


class StubAE:
    """Posteriors given per view (by tensor identity); the decoder always returns zeros.

    With a zero reconstruction, a Gaussian reconstruction term is 0.5 * ||target||^2, so
    it tells which image was the target.
    """

    def __init__(self, posteriors: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.posteriors = posteriors

    def encode(self, view):
        mu, logvar = self.posteriors[id(view)]
        return Encoding(h=view.flatten(1), mu=mu, logvar=logvar, z=mu)

    def decode(self, encoding):
        return torch.zeros(encoding.z.shape[0], 1, 28, 28)


def _recipe(tmp_path, others=(), **cfg):
    plugins = {
        "backbones": CONV28,
        **{name: {} for name in others},
        "consistency": {"lambda": 0.5, **cfg},
    }
    return validate(tiny_recipe(tmp_path, NO_SHARDS, plugins=plugins), check_data=False)[0]


def _terms(recipe, post_x, post_t, step=0):
    g = torch.Generator().manual_seed(3)
    views = {
        "x": torch.randn(B, 1, 28, 28, generator=g),
        "consistency.t": torch.randn(B, 1, 28, 28, generator=g),
    }
    stub = StubAE({id(views["x"]): post_x, id(views["consistency.t"]): post_t})
    ctx = step_context(recipe, views, encode=stub.encode, decode=stub.decode, step=step, plugin="consistency")
    return consistency.regularize(ctx=ctx, cfg=recipe.plugins["consistency"]), views, ctx


def _half_sq(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * t.pow(2).flatten(1).sum(1).mean()


def test_consistency_is_zero_for_identical_posteriors(tmp_path):
    post = _posterior(4)
    terms, _, _ = _terms(_recipe(tmp_path), post, post)
    assert terms["consistency"].abs() < 1e-5


def test_consistency_is_lambda_times_kl_of_t_given_x(tmp_path):
    (mu_x, lv_x), (mu_t, lv_t) = _posterior(5), _posterior(6)
    terms, _, ctx = _terms(_recipe(tmp_path, **{"lambda": 0.25}), (mu_x, lv_x), (mu_t, lv_t))
    kl = kl_divergence(Normal(mu_t, _std(lv_t)), Normal(mu_x, _std(lv_x))).sum(1).mean()
    torch.testing.assert_close(terms["consistency"], 0.25 * kl)
    torch.testing.assert_close(ctx.metrics["kl_unweighted"], kl)
    reverse = kl_divergence(Normal(mu_x, _std(lv_x)), Normal(mu_t, _std(lv_t))).sum(1).mean()
    assert not torch.allclose(terms["consistency"], 0.25 * reverse)


def test_alone_it_returns_both_elbos_with_their_betas(tmp_path):
    (mu_x, lv_x), (mu_t, lv_t) = _posterior(7), _posterior(8)
    terms, views, _ = _terms(_recipe(tmp_path, beta1=0.5, beta2=2.0), (mu_x, lv_x), (mu_t, lv_t))
    assert set(terms) == {"recon_x", "kl_x", "recon_t", "kl_t", "consistency"}
    torch.testing.assert_close(terms["recon_x"], _half_sq(views["x"]))
    torch.testing.assert_close(terms["recon_t"], _half_sq(views["consistency.t"]))
    torch.testing.assert_close(terms["kl_x"], 0.5 * kl_standard_normal(mu_x, lv_x))
    torch.testing.assert_close(terms["kl_t"], 2.0 * kl_standard_normal(mu_t, lv_t))


@pytest.mark.parametrize("others", [("kl",), ("aavae",), ("kl", "aavae")])
def test_with_kl_or_aavae_it_does_not_add_the_elbo_of_x_twice(tmp_path, others):
    terms, _, _ = _terms(_recipe(tmp_path, others), _posterior(9), _posterior(10))
    assert set(terms) == {"recon_t", "kl_t", "consistency"}


@pytest.mark.parametrize(("others", "elbo_x", "has_x"), [(("kl",), True, True), ((), False, False)])
def test_elbo_x_overrides_the_detection(tmp_path, others, elbo_x, has_x):
    terms, _, _ = _terms(_recipe(tmp_path, others, elbo_x=elbo_x), _posterior(9), _posterior(10))
    assert ("recon_x" in terms) is has_x and ("kl_x" in terms) is has_x


@pytest.mark.parametrize("elbo_x", [None, True])
def test_the_prior_kls_follow_kls_warmup_and_cycles(tmp_path, elbo_x):
    (mu_x, lv_x), (mu_t, lv_t) = _posterior(11), _posterior(12)
    plugins = {
        "backbones": CONV28,
        "kl": {"beta": 2.0, "warmup_steps": 4, "cycle_steps": 8},
        "consistency": {"lambda": 0.5, "beta1": 0.5, "beta2": 3.0, "elbo_x": elbo_x},
    }
    recipe = validate(tiny_recipe(tmp_path, NO_SHARDS, plugins=plugins), check_data=False)[0]
    full_t, full_x = 3.0 * kl_standard_normal(mu_t, lv_t), 0.5 * kl_standard_normal(mu_x, lv_x)
    kl_cfg = recipe.plugins["kl"]
    for step, factor in [(0, 0.0), (2, 0.5), (4, 1.0), (7, 1.0), (8, 0.0), (10, 0.5)]:
        terms, _, _ = _terms(recipe, (mu_x, lv_x), (mu_t, lv_t), step)
        assert (
            consistency.kl_factor(recipe.plugins["consistency"], recipe, step)
            == factor
            == beta_at(step, kl_cfg) / kl_cfg.beta
        )  # one schedule
        torch.testing.assert_close(terms["kl_t"], factor * full_t)
        if elbo_x:
            torch.testing.assert_close(terms["kl_x"], factor * full_x)
        consistency_kl = kl_divergence(Normal(mu_t, _std(lv_t)), Normal(mu_x, _std(lv_x))).sum(1).mean()
        torch.testing.assert_close(terms["consistency"], 0.5 * consistency_kl)  # never scheduled


@pytest.mark.parametrize("others", [(), ("aavae",)])
def test_without_a_scheduled_provider_the_prior_kls_are_constant(tmp_path, others):
    recipe = _recipe(tmp_path, others, beta2=2.0)
    (mu_x, lv_x), (mu_t, lv_t) = _posterior(13), _posterior(14)
    terms, _, _ = _terms(recipe, (mu_x, lv_x), (mu_t, lv_t))
    assert consistency.kl_factor(recipe.plugins["consistency"], recipe, 0) == 1.0
    torch.testing.assert_close(terms["kl_t"], 2.0 * kl_standard_normal(mu_t, lv_t))


def test_likelihood_follows_kl_unless_set(tmp_path):
    plugins = {
        "backbones": CONV28,
        "kl": {"likelihood": "bernoulli"},
        "consistency": {"lambda": 1.0},
    }
    recipe = validate(tiny_recipe(tmp_path, NO_SHARDS, plugins=plugins), check_data=False)[0]
    assert consistency.likelihood_of(recipe.plugins["consistency"], recipe) == "bernoulli"
    recipe.plugins["consistency"].likelihood = "gaussian"
    assert consistency.likelihood_of(recipe.plugins["consistency"], recipe) == "gaussian"
    alone = _recipe(tmp_path)
    assert consistency.likelihood_of(alone.plugins["consistency"], alone) == "gaussian"


def test_needs_a_vae_head(tmp_path):
    class NoHead(StubAE):
        def encode(self, view):
            return Encoding(h=view.flatten(1))

    views = {"x": torch.zeros(B, 1, 28, 28), "consistency.t": torch.zeros(B, 1, 28, 28)}
    with pytest.raises(ValueError, match="latent_dim"):
        recipe = _recipe(tmp_path)
        ctx = step_context(recipe, views, encode=NoHead({}).encode, plugin="consistency")
        consistency.regularize(ctx=ctx, cfg=recipe.plugins["consistency"])


# ---------------------------------------------------------------------------
# Recipe section and view
# ---------------------------------------------------------------------------


def test_lambda_is_a_required_recipe_key_that_round_trips(tmp_path):
    plugins = {"backbones": CONV28, "consistency": {}}
    with pytest.raises(RecipeError, match=r"plugins\.consistency\.lambda"):
        validate(tiny_recipe(tmp_path, NO_SHARDS, plugins=plugins), check_data=False)
    recipe = _recipe(tmp_path, **{"lambda": 0.1})
    assert recipe.plugins["consistency"].lam == 0.1
    resolved = recipe.resolved()["plugins"]["consistency"]
    assert resolved["lambda"] == 0.1 and "lam" not in resolved
    again = validate(recipe.resolved(), check_data=False)[0]
    assert again.plugins["consistency"] == recipe.plugins["consistency"]


def test_view_is_the_crvae_affine_of_the_clean_pixels(tmp_path):
    torch.manual_seed(0)
    recipe = _recipe(tmp_path, preset="large", vertical_flip=True)
    view = consistency.augment(config=recipe, cfg=recipe.plugins["consistency"])["t"]
    assert view.source is None
    out = view.transform(Image.new("L", (28, 28), 255))
    assert out.shape == (1, 28, 28)
    assert (out == out.max()).float().mean() > 0.5  # mostly the image, black fill at most at the borders
    # with data.resize, t(x) transforms the same resized centre crop as x
    data = tiny_recipe(tmp_path, NO_SHARDS, size=28, plugins={"backbones": CONV28, "consistency": {"lambda": 1}})
    data["data"]["resize"] = 28
    resized = validate(data, check_data=False)[0]
    assert consistency.augment(config=resized, cfg=resized.plugins["consistency"])["t"].transform(
        Image.new("L", (56, 40), 255)
    ).shape == (1, 28, 28)


# ---------------------------------------------------------------------------
# Through the engine
# ---------------------------------------------------------------------------


def test_trains_with_kl_and_logs_each_term(tmp_path, fmnist_shards):
    plugins = {"backbones": CONV28, "kl": {}, "consistency": {"lambda": 0.5, "weight": 2.0}}
    records = read_metrics(run_steps(tiny_recipe(tmp_path, fmnist_shards, plugins=plugins), steps=2))
    terms = (
        "kl.recon",
        "kl.kl",
        "consistency.recon_t",
        "consistency.kl_t",
        "consistency.consistency",
    )
    for r in records:
        assert set(terms) <= set(r) and "consistency.recon_x" not in r
        assert all(torch.isfinite(torch.tensor(r[t])) for t in terms)
        total = r["kl.recon"] + r["kl.kl"] + 2.0 * sum(r[t] for t in terms[2:])
        assert r["loss"] == pytest.approx(total, rel=1e-5)
        assert r["consistency.consistency"] == pytest.approx(0.5 * r["consistency.kl_unweighted"], rel=1e-5)


def test_trains_alone_as_a_full_crvae(tmp_path, fmnist_shards):
    plugins = {"backbones": CONV28, "consistency": {"lambda": 1.0}}
    records = read_metrics(run_steps(tiny_recipe(tmp_path, fmnist_shards, plugins=plugins), steps=1))
    names = {k for k in records[-1] if k.startswith("consistency.")}
    assert names == {f"consistency.{t}" for t in ("recon_x", "kl_x", "recon_t", "kl_t", "consistency", "kl_unweighted")}


@pytest.mark.parametrize("name", ["crvae_fashionmnist", "crvae_cifar10", "crvae_stl10"])
def test_recipes_validate_and_extend_their_vae(name):
    recipe, _ = load_recipe(RECIPES / f"{name}.yaml", check_data=False)
    vae, _ = load_recipe(RECIPES / f"{name.replace('crvae', 'vae')}.yaml", check_data=False)
    online_probe = {"probe"} if name.endswith("fashionmnist") else set()  # from _fashionmnist.yaml
    assert set(recipe.plugins) == {"backbones", "kl", "consistency"} | online_probe
    assert recipe.plugins["backbones"] == vae.plugins["backbones"] and recipe.plugins["kl"] == vae.plugins["kl"]
    assert recipe.train == vae.train and recipe.data == vae.data
    d = recipe.data  # lambda = the authors' gamma 1e-3 rescaled to a reconstruction summed over pixels
    assert recipe.plugins["consistency"].lam == pytest.approx(1e-3 * d.channels * d.image_size**2)


@pytest.mark.parametrize("dataset", ["cifar10", "stl10"])
def test_vae_and_aavae_recipes_share_backbone_and_optimiser(dataset):
    vae, _ = load_recipe(RECIPES / f"vae_{dataset}.yaml", check_data=False)
    aa, _ = load_recipe(RECIPES / f"aavae_{dataset}.yaml", check_data=False)
    assert aa.plugins["backbones"] == vae.plugins["backbones"] and aa.train == vae.train and aa.data == vae.data
