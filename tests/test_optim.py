"""The optimisation: LARS against its formula by hand, biases and normalisation weights kept out of weight
decay, per-plugin lr groups through the split, the weight-decay schedule, `Scheduled` plugin values, and
real runs (LARS, the exclusion flag, a LARS resume equal to an uninterrupted run)."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from framework import PluginConfig, Scheduled, checkpoint, hookimpl
from framework.distributed import deepspeed_config
from framework.logging import read_metrics
from framework.model import Model
from framework.optim import LARS, build_optimizer
from framework.preemption import Preempted
from framework.recipe import OptimConfig
from framework.recipe.loading import RecipeError
from framework.schedules import scheduled_values, set_weight_decay, weight_decay_schedule
from framework.startup import validate
from framework.testing import CONV28, run_steps, tiny_recipe
from tests.helpers import final_weights

NO_SHARDS = {"train": "/nonexistent/train-{000000..000001}.tar", "test": "/nonexistent/test.tar"}
PLUGINS = {"backbones": CONV28, "kl": {}, "probe": {"lr": 1e-4}}


def model_and_recipe(tmp_path, steps=2, **optim):
    recipe = tiny_recipe(tmp_path, NO_SHARDS, plugins=PLUGINS, train={"steps": steps}, optim=optim)
    cfg, hooks = validate(recipe, check_data=False)
    return Model(hooks, cfg), cfg


# --- LARS, by hand ------------------------------------------------------------------------------


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def lars_by_hand(w, grads, lr, wd, m, eta, clip, adapt, eps=1e-8):
    """The LARS update of one flattened parameter over len(grads) steps, in Python floats."""
    buf = None
    for g in grads:
        d, r = list(g), 1.0
        if adapt:
            d = [gi + wd * wi for gi, wi in zip(g, w, strict=True)]
            if norm(w) > 0 and norm(g) > 0:
                r = eta * norm(w) / (norm(g) + wd * norm(w) + eps)
                r = min(r / lr, 1.0) if clip else r
        d = [r * di for di in d]
        buf = d if buf is None else [m * bi + di for bi, di in zip(buf, d, strict=True)]
        w = [wi - lr * bi for wi, bi in zip(w, buf, strict=True)]
    return w


@pytest.mark.parametrize("clip", [False, True])
def test_lars_steps_are_the_formula_by_hand(clip):
    """Three steps of a decaying weight, a weight whose gradient is 0, and an excluded bias."""
    torch.manual_seed(0)
    weight, idle, bias = (
        torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64)) for shape in ((3, 2), (2, 2), (3,))
    )
    grads = {
        name: [torch.randn(*p.shape, dtype=torch.float64) for _ in range(3)]
        for name, p in (("weight", weight), ("bias", bias))
    }
    grads["idle"] = [torch.zeros(2, 2, dtype=torch.float64)] * 3
    lr, wd, m, eta = 0.5, 0.1, 0.9, 0.02
    start = {name: p.detach().flatten().tolist() for name, p in (("weight", weight), ("idle", idle), ("bias", bias))}
    opt = LARS(
        [{"params": [weight, idle]}, {"params": [bias], "weight_decay": 0.0, "no_decay": True}],
        lr=lr,
        momentum=m,
        weight_decay=wd,
        eta=eta,
        clip=clip,
    )
    for k in range(3):
        for name, p in (("weight", weight), ("idle", idle), ("bias", bias)):
            p.grad = grads[name][k].clone()
        opt.step()
    for name, p in (("weight", weight), ("idle", idle), ("bias", bias)):
        hand = lars_by_hand(
            start[name], [g.flatten().tolist() for g in grads[name]], lr, wd, m, eta, clip, adapt=name != "bias"
        )
        assert p.detach().flatten().tolist() == pytest.approx(hand, rel=1e-12, abs=1e-14), name
    ratio = eta * norm(start["weight"]) / (norm(grads["weight"][0].flatten().tolist()) + wd * norm(start["weight"]))
    assert (ratio / lr < 1) if clip else ratio < 1, "the trust ratio changed the step (not plain SGD)"
    assert idle.detach().flatten().tolist() != pytest.approx(start["idle"]), "a zero gradient still decays"


def test_lars_state_round_trips_and_refuses_bad_settings():
    p = torch.nn.Parameter(torch.ones(2, 2))
    opt = LARS([p], lr=0.1, weight_decay=1e-4)
    p.grad = torch.full((2, 2), 0.5)
    opt.step()
    again = LARS([q := torch.nn.Parameter(p.detach().clone())], lr=0.3)
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    assert again.param_groups[0]["weight_decay"] == 1e-4 and again.param_groups[0]["lr"] == 0.1
    with pytest.raises(ValueError, match="LARS: lr 0.1, momentum 1.5"):
        LARS([p], lr=0.1, momentum=1.5)


def test_lars_is_refused_under_deepspeed_in_one_line(tmp_path):
    _, cfg = model_and_recipe(tmp_path, optimizer="lars")
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    with pytest.raises(ValueError, match=r"^distributed: DeepSpeed ZeRO would step LARS on flat shards: .*DDP$"):
        deepspeed_config(cfg.distributed, cfg.data, cfg.optim, env)


# --- the param groups ---------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adam", "lars"])
def test_biases_and_norm_weights_get_no_weight_decay(tmp_path, optimizer):
    """With every gradient 0 only weight decay moves a parameter: the 1-D ones must stay put."""
    model, cfg = model_and_recipe(tmp_path, optimizer=optimizer, weight_decay=0.1, exclude_norm_bias_from_wd=True)
    opt = build_optimizer(model, cfg.optim, cfg.plugins)
    params = [p for g in opt.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, params, strict=True)]
    assert all(moved[i] for i, p in enumerate(params) if p.ndim > 1), "weights decay"
    assert not any(moved[i] for i, p in enumerate(params) if p.ndim <= 1), "biases and norm weights do not"
    assert sum(p.ndim <= 1 for p in params) >= 10, "the conv28 encoder's BatchNorm weights and biases"


def test_a_vits_position_embedding_and_class_token_get_no_weight_decay(tmp_path):
    """Parameters a module names in `no_weight_decay()` (timm's convention) join the biases and norms."""
    plugins = {"backbones": {"encoder": "timm/vit_tiny_patch16_224", "latent_dim": None}, "simclr": {}}
    recipe = tiny_recipe(tmp_path, NO_SHARDS, plugins=plugins, size=32, channels=3)
    recipe["optim"].update(optimizer="adamw", weight_decay=0.05, exclude_norm_bias_from_wd=True)
    cfg, hooks = validate(recipe, check_data=False)
    model = Model(hooks, cfg)
    vit = model.encoder
    groups = build_optimizer(model, cfg.optim, cfg.plugins).param_groups
    no_decay = {id(p) for g in groups if g["no_decay"] for p in g["params"]}
    assert {id(vit.pos_embed), id(vit.cls_token)} <= no_decay and vit.pos_embed.ndim == 3
    assert id(vit.patch_embed.proj.weight) not in no_decay and id(vit.blocks[0].attn.qkv.weight) not in no_decay
    assert all(g["weight_decay"] == (0.0 if g["no_decay"] else 0.05) for g in groups)


def test_each_plugin_keeps_its_lr_through_the_split(tmp_path):
    model, cfg = model_and_recipe(tmp_path, lr=0.01, exclude_norm_bias_from_wd=True, weight_decay=1e-4)
    groups = build_optimizer(model, cfg.optim, cfg.plugins, lr=0.02).param_groups
    summary = [(g["plugin"], g["no_decay"], g["weight_decay"]) for g in groups]
    assert summary == [
        ("backbones", False, 1e-4),
        ("backbones", True, 0.0),
        ("probe", False, 1e-4),
        ("probe", True, 0.0),
    ]
    # the probe's lr 1e-4, scaled by 0.02 / 0.01 like optim.lr, in both its groups
    assert [g["lr"] for g in groups] == pytest.approx([0.02, 0.02, 2e-4, 2e-4])
    other, other_cfg = model_and_recipe(tmp_path, lr=0.01)
    unsplit = build_optimizer(other, other_cfg.optim, other_cfg.plugins).param_groups
    assert [(g["plugin"], g["no_decay"]) for g in unsplit] == [("backbones", False), ("probe", False)]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(trainable), "every parameter, once"


# --- schedules ----------------------------------------------------------------------------------


def test_the_weight_decay_cosine_and_only_the_decay_groups_follow_it(tmp_path):
    cfg = OptimConfig(lr=1.0, weight_decay=0.04, weight_decay_end=0.4)
    schedule = weight_decay_schedule(cfg)
    assert schedule is not None
    assert [schedule.at(s, 10) for s in (0, 5, 10, 20)] == pytest.approx([0.04, 0.22, 0.4, 0.4])
    assert weight_decay_schedule(OptimConfig(lr=1.0, weight_decay=0.04)) is None
    model, recipe = model_and_recipe(tmp_path, optimizer="lars", weight_decay=0.04, weight_decay_end=0.4, steps=10)
    opt = build_optimizer(model, recipe.optim, recipe.plugins)
    set_weight_decay(opt, recipe.optim, 5, recipe.train.steps)
    assert [(g["no_decay"], g["weight_decay"]) for g in opt.param_groups] == [(False, 0.22), (True, 0.0)] * 2
    assert scheduled_values(recipe.optim, recipe.plugins, 5, recipe.train.steps) == {"wd": pytest.approx(0.22)}


def test_scheduled_takes_a_number_or_a_mapping_and_byols_formula():
    assert Scheduled.model_validate(0.5) == Scheduled(start=0.5, shape="constant")
    assert [Scheduled.model_validate(0.5).at(s, 10) for s in (0, 10)] == [0.5, 0.5]
    linear = Scheduled.model_validate({"start": 1.0, "end": 3.0, "shape": "linear", "warmup_steps": 2})
    assert [linear.at(s, 12) for s in (0, 1, 2, 7, 12, 99)] == pytest.approx([0.5, 1.0, 1.0, 2.0, 3.0, 3.0])
    base, steps = 0.996, 50
    momentum = Scheduled.model_validate({"start": base, "end": 1.0, "shape": "cosine"})
    byol = [1 - (1 - base) * (math.cos(math.pi * k / steps) + 1) / 2 for k in range(steps + 1)]
    assert [momentum.at(k, steps) for k in range(steps + 1)] == byol, "exactly the BYOL paper's expression"
    assert not Scheduled(start=0.5, shape="constant").varies and momentum.varies


def test_a_scheduled_path_may_end_early_and_hold():
    """DINO's teacher temperature: 0.04 -> 0.07 linearly over its warm-up epochs, then held to the last step."""
    temp = Scheduled.model_validate({"start": 0.04, "end": 0.07, "shape": "linear", "steps": 30})
    assert [temp.at(s, 100) for s in (0, 15, 30, 31, 99, 100)] == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07, 0.07])
    assert temp.varies
    cosine = Scheduled(start=0.0, end=1.0, shape="cosine", warmup_steps=2, steps=12)
    assert [cosine.at(s, 50) for s in (0, 1, 2, 7, 12, 40)] == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0, 1.0])
    assert cosine.at(0, 50) == 0.0 and Scheduled(start=1.0, end=3.0, shape="linear", steps=4).at(2, 50) == 2.0


class ToyConfig(PluginConfig):
    momentum: Scheduled = Scheduled(start=0.9, end=1.0, shape="cosine")
    scale: Scheduled = Scheduled(start=2.0, shape="constant")


class Toy:
    """A plugin whose section has `Scheduled` fields; records the momentum it reads after each step."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    @hookimpl
    def config_schema(self):
        return ToyConfig

    @hookimpl
    def on_train_step_end(self, step, config, cfg):
        self.seen.append(cfg.momentum.at(step - 1, config.train.steps))


@pytest.mark.parametrize(
    ("section", "error"),
    [
        (
            {"momentum": {"start": 0.9, "shape": "cosine"}},
            "plugins.toy.momentum: Value error, a cosine schedule needs an end",
        ),
        ({"momentum": {"start": 0.9, "end": 1.0, "shape": "exp"}}, "plugins.toy.momentum.shape: Input should be"),
        (
            {"momentum": {"start": 0.9, "end": 1.0, "step": 5}},
            "plugins.toy.momentum.step: Extra inputs are not permitted",
        ),
        (
            {"scale": {"start": 0.9, "shape": "constant", "steps": 5}},
            "plugins.toy.scale: Value error, a constant schedule has no steps",
        ),
        (
            {"momentum": {"start": 0.9, "end": 1.0, "warmup_steps": 5, "steps": 5}},
            "plugins.toy.momentum: Value error, steps 5 must be after the warm-up",
        ),
        (
            {"momentum": {"start": 0.9, "end": 1.0, "shape": "constant"}},
            "plugins.toy.momentum: Value error, a constant",
        ),
        ({"momentum": "cosine"}, "plugins.toy.momentum: Input should be a valid dictionary or instance of Scheduled"),
        (
            {"scale": {"start": 1, "warmup_steps": -1, "shape": "constant"}},
            "plugins.toy.scale.warmup_steps: Input should",
        ),
    ],
)
def test_a_bad_schedule_is_one_line_naming_the_key(tmp_path, section, error):
    recipe = tiny_recipe(tmp_path, NO_SHARDS, plugins={**PLUGINS, "toy": section})
    with pytest.raises(RecipeError) as info:
        validate(recipe, check_data=False, extra_plugins={"toy": Toy()})
    assert str(info.value).startswith(error) and "\n" not in str(info.value)


# --- real runs ----------------------------------------------------------------------------------


def test_a_plugins_scheduled_values_and_the_weight_decay_are_logged(tmp_path, fmnist_shards):
    toy = Toy()
    section = {"momentum": {"start": 0.9, "end": 1.0}, "scale": 3.0}
    optim = {"optimizer": "adamw", "weight_decay": 0.05, "weight_decay_end": 0.5}
    out = run_steps(
        tiny_recipe(tmp_path, fmnist_shards, plugins={**PLUGINS, "toy": section}, optim=optim),
        steps=3,
        extra_plugins={"toy": toy},
    )
    records = read_metrics(out)
    momentum = Scheduled(start=0.9, end=1.0)
    assert [r["toy.momentum"] for r in records] == pytest.approx([momentum.at(s, 3) for s in (1, 2, 3)])
    assert toy.seen == pytest.approx([momentum.at(s, 3) for s in (0, 1, 2)]), "the plugin reads it per step"
    assert [r["wd"] for r in records] == pytest.approx(
        [0.05 + (0.5 - 0.05) * (1 - math.cos(math.pi * s / 3)) / 2 for s in (1, 2, 3)]
    )
    assert not any("toy.scale" in r for r in records), "a constant is not logged"


@pytest.mark.parametrize(
    "optim",
    [
        {"optimizer": "lars", "lr": 1e-3, "lars_eta": 0.02, "lars_clip": True},
        {"optimizer": "sgd", "lr": 1e-3, "exclude_norm_bias_from_wd": True},
    ],
)
def test_a_few_real_steps_with_lars_or_the_exclusion(tmp_path, fmnist_shards, optim):
    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins=PLUGINS, optim={"weight_decay": 1e-4, **optim})
    records = read_metrics(run_steps(recipe, steps=3))
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    assert {k for k in records[-1] if k.startswith("lr/")} == {"lr/probe"}, "one lr per plugin, not per group"
    assert records[-1]["lr/probe"] == pytest.approx(1e-4) and records[-1]["lr"] == pytest.approx(optim["lr"])


class StopAfter:
    """Sends this process SIGUSR1 after step `step`: the run checkpoints the step after it and stops."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_train_step_end(self, step):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_a_lars_run_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(tmp_path, fmnist_shards):
    """Stopped by a signal after step 2 (checkpointed there, of the same train.steps: the lr and weight
    decay cosines depend on it), resumed to step 4: the weights and LARS' momentum are the uninterrupted run's."""
    optim = {"optimizer": "lars", "lr": 1e-3, "weight_decay": 1e-2, "weight_decay_end": 1e-1, "schedule": "cosine"}
    runs = {}
    for name, stop in (("whole", 99), ("split", 1)):
        recipe = tiny_recipe(tmp_path / name, fmnist_shards, plugins=PLUGINS, optim=optim, log={"trackers": []})
        if name == "split":
            with pytest.raises(Preempted, match="after step 2"):
                run_steps(recipe, steps=4, extra_plugins={"stop": StopAfter(stop)})
        runs[name] = run_steps(recipe, steps=4, extra_plugins={"stop": StopAfter(stop)})
    whole, split = runs["whole"], runs["split"]
    assert [r["step"] for r in read_metrics(split)] == [1, 2, 3, 4]
    a, b = final_weights(whole), final_weights(split)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    states = [
        torch.load(checkpoint.complete_checkpoints(out)[-1] / "optimizer.bin", weights_only=False)
        for out in runs.values()
    ]
    buffers = [[s["momentum_buffer"] for _, s in sorted(st["state"].items())] for st in states]
    assert len(buffers[0]) == len(buffers[1]) > 0 and all(map(torch.equal, *buffers)), "momentum restored"
    assert [g["no_decay"] for g in states[1]["param_groups"]] == [False, True, False, True]


def test_a_resume_may_change_the_weight_decay_and_add_its_cosine(tmp_path, fmnist_shards):
    """The decay groups take the recipe's weight decay every step, not the restored optimizer's: resumed with a
    new optim.weight_decay, then with an optim.weight_decay_end, the saved groups follow the recipe."""
    optim = {"optimizer": "adamw", "weight_decay": 0.05, "exclude_norm_bias_from_wd": True}
    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins=PLUGINS, optim=optim, log={"trackers": []})

    def saved_decays(out) -> list[tuple[bool, float]]:
        state = torch.load(checkpoint.complete_checkpoints(out)[-1] / "optimizer.bin", weights_only=False)
        return sorted({(g["no_decay"], g["weight_decay"]) for g in state["param_groups"]})

    out = run_steps(recipe, steps=2)
    assert saved_decays(out) == [(False, 0.05), (True, 0.0)]
    run_steps(recipe, steps=3, overrides=["optim.weight_decay=0.2"])
    assert saved_decays(out) == [(False, 0.2), (True, 0.0)]
    run_steps(recipe, steps=5, overrides=["optim.weight_decay=0.2", "optim.weight_decay_end=0.4"])
    last = Scheduled(start=0.2, end=0.4, shape="cosine").at(4, 5)  # the decay of the optimizer step after step 4
    assert saved_decays(out) == [(False, pytest.approx(last)), (True, 0.0)]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
