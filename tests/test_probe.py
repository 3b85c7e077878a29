"""The online linear probe: learns from labels, never trains the encoder, ignores unlabelled samples."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from framework import Encoding
from framework.logging import read_metrics
from framework.model import Model
from framework.startup import validate
from framework.testing import CONV28, run_steps, step_context, tiny_recipe
from plugins import probe


def FakeCtx(config, features, labels):
    """The probe's step context with fixed features (whatever the view) and labels."""
    return step_context(config, {"x": features}, encode=lambda _: Encoding(h=features), labels=labels, plugin="probe")


def _config(tmp_path, fmnist_shards, **probe_cfg):
    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins={"backbones": CONV28, "kl": {}, "probe": probe_cfg})
    return validate(recipe)


def _probe(cfg, width):
    """The probe's own modules for an encoder of `width` features."""
    return torch.nn.ModuleDict(
        probe.build_modules(cfg=cfg.plugins["probe"], encoder=SimpleNamespace(num_features=width))
    )


def _ce(cfg, own, ctx):
    return probe.auxiliary_head(ctx=ctx, cfg=cfg.plugins["probe"], own=own)["ce"]


def test_probe_learns_separable_features(tmp_path, fmnist_shards):
    cfg, _ = _config(tmp_path, fmnist_shards, num_classes=4)
    own = _probe(cfg, 16)
    opt = torch.optim.Adam(own.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(4, 16, generator=g)
    for _ in range(100):
        y = torch.randint(0, 4, (64,), generator=g)
        ctx = FakeCtx(cfg, centers[y] + torch.randn(64, 16, generator=g), y)
        loss = _ce(cfg, own, ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ctx.metrics["acc"].item() > 0.95 and loss.item() < 0.2


def test_probe_ignores_unlabelled_samples(tmp_path, fmnist_shards):
    cfg, _ = _config(tmp_path, fmnist_shards, num_classes=3)
    own = _probe(cfg, 8)
    h = torch.randn(6, 8)
    unlabelled = _ce(cfg, own, FakeCtx(cfg, h, torch.full((6,), -1)))
    assert unlabelled.item() == 0
    unlabelled.backward()  # still connected to the probe's weights (DDP needs every parameter used)
    assert own["linear"].weight.grad is not None
    mixed = _ce(cfg, own, FakeCtx(cfg, h, torch.tensor([0, 1, -1, 2, -1, -1])))
    only = _ce(cfg, own, FakeCtx(cfg, h[[0, 1, 3]], torch.tensor([0, 1, 2])))
    torch.testing.assert_close(mixed, only)


def test_probe_term_never_reaches_the_encoder(tmp_path, fmnist_shards):
    cfg, hooks = _config(tmp_path, fmnist_shards)
    model = Model(hooks, cfg).train()
    x = torch.randn(8, 1, 28, 28)
    terms, metrics = model({"x": x}, {}, torch.randint(0, 10, (8,)))
    assert {"probe.ce", "kl.recon", "kl.kl"} <= set(terms) and "probe.acc" in metrics
    encoder = list(model.plugins["backbones"]["encoder"].parameters())
    grads = torch.autograd.grad(terms["probe.ce"], encoder, allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads)
    probe_grad = torch.autograd.grad(terms["probe.ce"], model.plugins["probe"]["linear"].weight)[0]
    assert probe_grad.abs().sum() > 0


@pytest.mark.slow
def test_probe_above_chance_on_fashion_mnist(tmp_path, real_fmnist_shards):
    recipe = tiny_recipe(
        tmp_path,
        real_fmnist_shards,
        plugins={"backbones": CONV28, "kl": {}, "probe": {}},
        data={"batch_size": 32},
        optim={"lr": 3e-3},
        log={"every": 10},
    )
    records = read_metrics(run_steps(recipe, steps=40))
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert all("probe.ce" in r and "probe.acc" in r for r in records)
    assert records[-1]["probe.acc"] > 0.3  # 10 classes: chance is 0.1
    assert records[-1]["probe.ce"] < records[0]["probe.ce"]


def test_a_plugin_lr_gives_its_modules_their_own_param_group(tmp_path, fmnist_shards):
    from framework.optim import build_optimizer

    cfg, hooks = _config(tmp_path, fmnist_shards, lr=1e-4)
    model = Model(hooks, cfg)
    groups = {g["plugin"]: g for g in build_optimizer(model, cfg.optim, cfg.plugins, lr=2 * cfg.optim.lr).param_groups}
    assert groups["probe"]["lr"] == 2e-4, "scaled like optim.lr (here x2)"
    assert groups["backbones"]["lr"] == 2 * cfg.optim.lr
    assert {id(p) for p in groups["probe"]["params"]} == {id(p) for p in model.plugins["probe"].parameters()}
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards, plugins={"backbones": CONV28, "probe": {"lr": 1e-4}}), steps=2)
    assert "probe.acc" in read_metrics(out)[-1]
