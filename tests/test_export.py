"""`augssl export`: the encoder loads strictly into a plain torchvision ResNet and gives the same features."""

from __future__ import annotations

import json

import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from framework.checkpoint import load_run
from framework.cli import main
from framework.testing import run_steps, tiny_recipe, tiny_shards


def test_exported_resnet18_loads_into_torchvision_strictly(tmp_path, capsys):
    shards = tiny_shards(tmp_path, n_train=48, n_test=24, size=32, channels=3)
    plugins = {"backbones": {"encoder": "resnet18", "decoder": "conv28", "latent_dim": 16}, "kl": {}}
    recipe = tiny_recipe(tmp_path, shards, plugins=plugins, size=32, channels=3)
    out = run_steps(recipe, steps=2)
    weights = tmp_path / "encoder.safetensors"
    capsys.readouterr()
    main(["export", str(out), "--out", str(weights)])
    assert json.loads(capsys.readouterr().out)["arch"] == "resnet18"
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()  # the encoder's own export_metadata, and what the run knows
        assert (meta["stem"], meta["key_names"], meta["num_features"], meta["channels"]) == (
            "cifar",
            "torchvision",
            "512",
            "3",
        )

    # the README's recipe, written out by hand (no augssl import involved in building the net)
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    net.load_state_dict(load_file(str(weights)), strict=True)

    model, _, _ = load_run(out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model.encode(x).h)
