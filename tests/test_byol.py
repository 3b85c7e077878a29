"""Plugin `byol`: the loss, the momentum schedule, and the target network (the run's shared EMA teacher) - frozen
for the optimizer, initialised from the online network once, an exact EMA of it, and checkpointed; and bit for bit
the training of BYOL's own target network before it moved onto the teacher (tests/legacy_byol.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint import complete_checkpoints, model_weights_file
from framework.logging import read_metrics
from framework.model import Model
from framework.optim import build_optimizer
from framework.recipe.loading import RecipeError
from framework.startup import validate
from framework.testing import run_steps, tiny_recipe
from plugins.blocks import byol_loss, multi_crop_byol_loss


def momentum_at(step: int, steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """The BYOL paper's tau after `step` of `steps` optimizer steps, written out: `base` at 0, cosine-increased
    to `final` at `steps` (the oracle the plugin's `Scheduled` momentum is checked against)."""
    return final - (final - base) * (math.cos(math.pi * min(step, steps) / steps) + 1) / 2


SMALL = {"proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 32}
PLUGINS = {"backbones": {"encoder": "conv28", "latent_dim": None}, "byol": SMALL}
# (target prefix, online prefix) in the root module's state dict
PAIRS = [
    ("teacher.plugins.backbones.encoder.", "plugins.backbones.encoder."),
    ("teacher.plugins.byol.projector.", "plugins.byol.projector."),
]

ROOT = Path(__file__).resolve().parents[1]
NAME = "byol"


# --- the loss and the schedule -------------------------------------------------------


def byol_by_loops(p: torch.Tensor, z: torch.Tensor) -> float:
    total = 0.0
    for pi, zi in zip(p.double(), z.double(), strict=True):
        cos = float(pi @ zi) / math.sqrt(float(pi @ pi) * float(zi @ zi))
        total += 2 - 2 * cos
    return total / len(p)


def test_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    assert byol_loss(p, z).item() == pytest.approx(byol_by_loops(p, z), rel=1e-6)
    # = || p/|p| - z/|z| ||^2, the BYOL paper's form
    unit = torch.nn.functional.normalize
    assert byol_loss(p, z).item() == pytest.approx((unit(p) - unit(z)).pow(2).sum(1).mean().item(), rel=1e-5)
    assert byol_loss(3 * z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(-z, z).item() == pytest.approx(4.0, rel=1e-6)


def test_momentum_schedule():
    assert momentum_at(0, 100) == pytest.approx(0.996)
    assert momentum_at(50, 100) == pytest.approx(0.998)
    assert momentum_at(100, 100) == pytest.approx(1.0)
    taus = [momentum_at(s, 100) for s in range(101)]
    assert taus == sorted(taus)  # increasing
    assert momentum_at(0, 10, base=0.9, final=0.99) == pytest.approx(0.9)


def test_multi_crop_loss_is_solo_learns_loop():
    """solo-learn's solo/methods/byol.py: for v1 in range(num_large_crops): for v2 in np.delete(range(num_crops), v1):
    loss += byol_loss_func(P[v2], Z_momentum[v1]), written out with the per-pair formula."""
    g = torch.Generator().manual_seed(3)
    p = [torch.randn(6, 5, generator=g) for _ in range(5)]  # 2 global + 3 local crops
    z = [torch.randn(6, 5, generator=g) for _ in range(2)]
    want = sum(byol_by_loops(p[c], z[g]) for g in range(2) for c in range(5) if c != g)
    assert multi_crop_byol_loss(p, z).item() == pytest.approx(want, rel=1e-6)
    assert multi_crop_byol_loss(p[:2], z).item() == pytest.approx(
        (byol_loss(p[0], z[1]) + byol_loss(p[1], z[0])).item(), rel=1e-7
    )  # two crops: the two-direction sum
    assert multi_crop_byol_loss(p[:3], z[:1]).item() == pytest.approx(
        byol_by_loops(p[1], z[0]) + byol_by_loops(p[2], z[0])
    )
    with pytest.raises(ValueError, match="len"):
        multi_crop_byol_loss(p[:1], z[:1])


class Recorder:
    """Records every tensor BYOL's target is called on, and the online encoder's calls."""

    def __init__(self) -> None:
        self.target: list[tuple[int, ...]] = []
        self.online: list[tuple[int, ...]] = []


def test_multi_crop_step_encodes_by_size_and_the_target_sees_only_global_crops(tmp_path, fmnist_shards):
    crops = {"global": {"count": 2}, "local": {"count": 3, "size": 16}}
    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins={**PLUGINS, "byol": {**SMALL, "crops": crops}})
    cfg, hooks = validate(recipe, check_data=False)
    model = Model(hooks, cfg).train()
    seen = Recorder()
    teacher = model.teacher.plugins["backbones"]["encoder"]
    teacher.register_forward_pre_hook(lambda m, args: seen.target.append(tuple(args[0].shape)))
    model.plugins["backbones"]["encoder"].register_forward_pre_hook(
        lambda m, args: seen.online.append(tuple(args[0].shape))
    )
    views = {name: torch.randn(4, 1, 28, 28) for name in ("x", "byol.v1", "byol.v2")}
    views |= {f"byol.l{i}": torch.randn(4, 1, 16, 16) for i in (1, 2, 3)}
    terms, metrics = model(views, {}, step=0)
    assert seen.online == [(8, 1, 28, 28), (12, 1, 16, 16)]  # one call per crop size
    assert seen.target == [(8, 1, 28, 28)]  # the two global crops, at once
    # 2 globals x 4 other crops = 8 terms of [0, 4]
    assert 0 < terms["byol.loss"].item() <= 32
    out = run_steps(recipe, steps=2)
    assert all(0 < r["byol.loss"] <= 32 for r in read_metrics(out))


@pytest.mark.parametrize(
    ("section", "base", "final"),
    [({}, 0.996, 1.0), ({"momentum": {"start": 0.99, "end": 1.0}}, 0.99, 1.0)],
)
def test_momentum_is_a_scheduled_value_with_the_formulas_values(tmp_path, fmnist_shards, section, base, final):
    """The teacher's `momentum` (framework.Scheduled) gives the BYOL formula's values bit for bit."""
    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins=PLUGINS, teacher=section)
    cfg = validate(recipe, check_data=False)[0].teacher
    assert (cfg.momentum.start, cfg.momentum.end, cfg.momentum.shape) == (base, final, "cosine")
    for steps in (1, 7, 195_000):
        for step in sorted({0, 1, steps // 3, steps // 2, steps - 1, steps, steps + 5}):
            assert cfg.momentum.at(step, steps) == momentum_at(step, steps, base, final), (steps, step)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"momentum": {"start": 0.9, "end": 1.5}}, "must stay in"),
        ({"momentum": -0.1}, "must stay in"),
        ({"momentum": {"start": 0.9}}, "needs an end"),
    ],
)
def test_bad_momentum_is_refused_in_one_line(tmp_path, fmnist_shards, section, message):
    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins=PLUGINS, teacher=section)
    with pytest.raises(RecipeError, match=message) as err:
        validate(recipe, check_data=False)
    assert str(err.value).startswith("teacher.momentum") and "\n" not in str(err.value)


def test_byols_own_momentum_key_says_where_it_moved(tmp_path, fmnist_shards):
    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins={**PLUGINS, "byol": {**SMALL, "momentum": 0.99}})
    with pytest.raises(RecipeError, match="move it to the recipe's `teacher: {momentum: ...}`") as err:
        validate(recipe, check_data=False)
    assert str(err.value).startswith("plugins.byol") and "\n" not in str(err.value)


def test_a_constant_momentum(tmp_path, fmnist_shards):
    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins=PLUGINS, teacher={"momentum": 0.5})
    cfg = validate(recipe, check_data=False)[0].teacher
    assert [cfg.momentum.at(k, 10) for k in (0, 5, 10)] == [0.5, 0.5, 0.5] and not cfg.momentum.varies


# --- the target network ---------------------------------------------------------------


def _recipe(tmp_path, shards, **sections):
    return tiny_recipe(tmp_path, shards, plugins=PLUGINS, **sections)


def test_target_is_a_frozen_separate_copy_excluded_from_the_optimizer(tmp_path, fmnist_shards):
    cfg, hooks = validate(_recipe(tmp_path, fmnist_shards), check_data=False)
    model = Model(hooks, cfg)
    target, online = model.teacher, model.plugins["backbones"]["encoder"]
    assert sorted((p, list(m)) for p, m in target.plugins.items()) == [
        ("backbones", ["encoder"]),
        ("byol", ["projector"]),
    ]
    assert all(not p.requires_grad for p in target.parameters())
    assert target.plugins["backbones"]["encoder"] is not online and {id(p) for p in target.parameters()}.isdisjoint(
        id(p) for p in online.parameters()
    )
    optimized = {
        id(p) for group in build_optimizer(model, cfg.optim, cfg.plugins).param_groups for p in group["params"]
    }
    assert optimized.isdisjoint(id(p) for p in target.parameters())
    assert {id(p) for p in model.plugins["byol"]["predictor"].parameters()} <= optimized


def test_target_initialised_from_online_once(tmp_path, fmnist_shards):
    cfg, hooks = validate(_recipe(tmp_path, fmnist_shards), check_data=False)
    model = Model(hooks, cfg).train()
    target, online = model.teacher, model.plugins["backbones"]["encoder"]
    copy = target.plugins["backbones"]["encoder"]
    views = {name: torch.randn(8, 1, 28, 28) for name in ("x", "byol.v1", "byol.v2")}

    with torch.no_grad():  # the target is a copy of the encoder: make it differ, e.g. as a loaded one would
        copy[0].weight.add_(1.0)
    model(views, {}, step=0)  # a forward never copies (under FSDP2 it would write a gathered copy)
    assert not target.initialised and not torch.equal(copy[0].weight, online[0].weight)

    target.initialise(model.plugins)  # what the engine does before the first step
    assert target.initialised
    for plugin, name in (("backbones", "encoder"), ("byol", "projector")):
        got = target.plugins[plugin][name].state_dict()
        for key, value in model.plugins[plugin][name].state_dict().items():
            assert torch.equal(got[key], value), f"{plugin}.{name}.{key}"

    with torch.no_grad():
        online[0].weight.add_(1.0)
    target.initialise(model.plugins)  # a resumed run: its target was loaded, no copy
    assert not torch.equal(copy[0].weight, online[0].weight)


def _weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(model_weights_file(checkpoint)))


def _assert_ema(before: dict, after: dict, tau: float) -> None:
    """after's target == tau * before's target + (1 - tau) * after's online, bit for bit."""
    checked = 0
    for target_prefix, online_prefix in PAIRS:
        for key, xi in before.items():
            if key.startswith(target_prefix) and xi.is_floating_point() and "running" not in key:
                theta = after[online_prefix + key.removeprefix(target_prefix)]
                expected = xi.clone().mul_(tau).add_(theta, alpha=1 - tau)
                assert torch.equal(after[key], expected), key
                assert not torch.equal(after[key], xi) and not torch.equal(after[key], theta), key
                checked += 1
    assert checked >= 10


def test_target_follows_the_ema_and_survives_a_checkpoint_round_trip(tmp_path, fmnist_shards):
    recipe = _recipe(tmp_path, fmnist_shards, checkpoint={"every": 1})
    out = run_steps(recipe, steps=2)
    records = read_metrics(out)
    # logged: the momentum of the step about to be taken (as the lr), so after step k the EMA of step k + 1's
    assert [r["teacher.momentum"] for r in records] == pytest.approx([momentum_at(1, 2), momentum_at(2, 2)])
    assert all(0 <= r["byol.loss"] <= 8 for r in records)
    step1, step2 = (_weights(c) for c in complete_checkpoints(out))
    assert bool(step2["teacher.initialised"])
    # optimizer step 2 then the EMA with tau(1): the optimizer did not touch the target
    _assert_ema(step1, step2, momentum_at(1, 2))

    run_steps(recipe, steps=3, overrides=["train.resume=auto"])
    step3 = _weights(complete_checkpoints(out)[-1])
    # the resumed run's target was the saved one, not re-initialised from the online network: step 3's is its EMA
    _assert_ema(step2, step3, momentum_at(2, 3))


@pytest.mark.parametrize("crops", [None, {"global": {"count": 2}, "local": {"count": 2, "size": 16}}])
def test_byol_on_the_teacher_trains_bit_for_bit_as_its_own_target_did(tmp_path, fmnist_shards, crops):
    """BYOL before the shared teacher (its own `Target` of a deep copy of the encoder and a projector, initialised
    in `on_train_start`, updated in `on_train_step_end`; kept as tests/legacy_byol.py) and BYOL on the teacher:
    three steps of the same recipe give the same online and target weights, bit for bit."""
    from tests import legacy_byol

    section = {**SMALL, **({"crops": crops} if crops else {})}
    teacher = {"momentum": {"start": 0.9, "end": 1.0}}  # a fast EMA: the target moves visibly in 3 steps
    new = run_steps(
        tiny_recipe(tmp_path / "new", fmnist_shards, plugins={**PLUGINS, "byol": section}, teacher=teacher), steps=3
    )
    legacy = {**section, "momentum": teacher["momentum"]}
    old = run_steps(
        tiny_recipe(tmp_path / "old", fmnist_shards, plugins={**PLUGINS, "byol": legacy}),
        steps=3,
        extra_plugins={"byol": legacy_byol},
    )
    ours, theirs = _weights(complete_checkpoints(new)[-1]), _weights(complete_checkpoints(old)[-1])
    renamed = {
        "teacher.plugins.backbones.encoder.": "plugins.byol.target.encoder.",
        "teacher.plugins.byol.projector.": "plugins.byol.target.projector.",
    }
    compared = 0
    for key, value in ours.items():
        if key == "teacher.initialised":
            continue
        prefix = next((p for p in renamed if key.startswith(p)), None)
        other = theirs[renamed[prefix] + key.removeprefix(prefix) if prefix else key]
        assert torch.equal(value, other), key
        compared += 1
    assert compared == len(theirs) - 1 and [r["byol.loss"] for r in read_metrics(new)] == [
        r["byol.loss"] for r in read_metrics(old)
    ]
