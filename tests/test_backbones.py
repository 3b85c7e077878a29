"""Encoders, stems, VAE head and decoders of the `backbones` plugin (docs/methods.md#backbones)."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from framework import PluginConfig, hookimpl
from framework.recipe.loading import RecipeError
from framework.startup import validate
from framework.testing import tiny_recipe
from plugins import backbones
from plugins.backbones import (
    DEFAULT_LATENT_DIM,
    BackbonesConfig,
    Conv28Decoder,
    DecoderBlock,
    Interpolate,
    ResNetDecoder,
    VAEHead,
    conv28_encoder,
    resnet_encoder,
    soft_bound,
)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("stem, size", [("cifar", 32), ("stl", 96)])
def test_resnet_encoders_pool_features(arch, stem, size):
    net = resnet_encoder(arch, stem, channels=3).eval()
    assert isinstance(net.maxpool, nn.Identity) and isinstance(net.fc, nn.Identity)
    assert net.conv1.kernel_size == ((3, 3) if stem == "cifar" else (7, 7))
    assert net.conv1.stride == ((1, 1) if stem == "cifar" else (2, 2))
    with torch.no_grad():
        assert net(torch.randn(2, 3, size, size)).shape == (2, net.num_features)
    assert net.num_features == {"resnet18": 512, "resnet50": 2048}[arch]  # the encoder declares its width


def test_conv28_encoder_and_decoder():
    enc = conv28_encoder(1).eval()
    assert enc.num_features == 256 and enc(torch.randn(2, 1, 28, 28)).shape == (2, 256)
    assert Conv28Decoder(16, 28, 1)(torch.randn(2, 16)).shape == (2, 1, 28, 28)


# Parameters of the official decoders (Lightning-Universe/paper-AAVAE src/models/decoder.py @ 1fc158d,
# decoder18(h_dim=512) / decoder50(h_dim=2048), latent 128, 3 channels): the same at every image size.
OFFICIAL_PARAMS = {"resnet18": 4_459_107, "resnet50": 13_291_203}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("stem, size", [("cifar", 32), ("stl", 96)])
def test_resnet_decoders_match_the_official_structure(arch, stem, size):
    dec = ResNetDecoder(arch, latent_dim=128, size=size, channels=3, stem=stem)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in dec.modules())
    assert sum(p.numel() for p in dec.parameters()) == OFFICIAL_PARAMS[arch]
    assert all(c.bias is not None for c in dec.modules() if isinstance(c, (nn.Conv2d, nn.Linear)))
    hidden = {"resnet18": 512, "resnet50": 2048}[arch]
    assert [m.out_features for m in dec.linear if isinstance(m, nn.Linear)] == [hidden, hidden]
    first = dec.body[0]
    assert (first.in_channels, first.out_channels, first.kernel_size) == (hidden // 16, hidden, (1, 1))
    assert isinstance(dec.body[1], nn.ReLU)  # the official ReLU after the first 1x1 conv
    stages = [m for m in dec.body if isinstance(m, nn.Sequential)]
    expansion = 4 if arch == "resnet50" else 1
    assert [len(s) for s in stages] == ([3, 6, 4, 3] if arch == "resnet50" else [2, 2, 2, 2])
    assert [s[-1].conv2.out_channels for s in stages] == [256, 128, 64, 32]  # planes halve from 256
    assert [s[0].skip[-1].out_channels for s in stages] == [p * expansion for p in (256, 128, 64, 32)]
    assert all(b.skip is None and b.upscale is None for s in stages for b in s[1:])

    sizes: list[int] = []
    hooks = [s.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for s in stages]
    with torch.no_grad():
        assert dec(torch.randn(2, 128)).shape == (2, 3, size, size)
    for h in hooks:
        h.remove()
    assert sizes == ([4, 8, 16, 32] if stem == "cifar" else [6, 12, 24, 48])  # the STL decoder doubles once more


def test_decoder_blocks_upscale_where_the_official_ones_do():
    """Basic blocks upscale before their first conv, bottlenecks between the 1x1 and the 3x3 conv."""
    basic = DecoderBlock(8, 4, bottleneck=False, upscale=Interpolate(scale=2))
    bottleneck = DecoderBlock(8, 4, bottleneck=True, upscale=Interpolate(scale=2))
    seen: dict[str, int] = {}

    def record(name: str, conv: nn.Module) -> None:
        conv.register_forward_pre_hook(lambda m, i: seen.update({name: i[0].shape[-1]}))

    record("basic.conv1", basic.conv1)
    record("bottleneck.conv1", bottleneck.conv1)
    record("bottleneck.conv2", bottleneck.conv2)
    x = torch.randn(1, 8, 5, 5)
    assert basic(x).shape == (1, 4, 10, 10) and bottleneck(x).shape == (1, 16, 10, 10)
    assert seen == {"basic.conv1": 10, "bottleneck.conv1": 5, "bottleneck.conv2": 10}


def test_decoder_widen_and_sizes():
    wide = ResNetDecoder("resnet50", 128, 32, 3, widen=2)
    assert [s[-1].conv2.out_channels for s in wide.body if isinstance(s, nn.Sequential)] == [512, 256, 128, 64]
    assert ResNetDecoder("resnet18", 16, 64, 1)(torch.randn(2, 16)).shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="divisible by 16, got 40"):
        ResNetDecoder("resnet18", 16, 40, 3, stem="stl")


def test_vae_head_soft_bounds_logvar_with_a_gradient_past_the_bound():
    head = VAEHead(8, 4, (-2.0, 2.0)).eval()
    with torch.no_grad():
        head.logvar.weight.fill_(100.0)
        mu, logvar = head(torch.ones(3, 8))
    assert mu.shape == logvar.shape == (3, 4) and logvar.max() <= 2.0
    assert head.mu.bias is None and head.logvar.bias is None

    v = torch.tensor([-30.0, -12.0, 0.0, 1.0, 12.0, 30.0], dtype=torch.float64, requires_grad=True)
    out = soft_bound(v, -10.0, 10.0)
    assert ((out > -10) & (out < 10)).all()
    out.sum().backward()
    assert (v.grad > 0).all()  # a clamp's gradient is 0 at +-12 and +-30
    assert v.grad[2] == 1.0 and abs(out[3].item() - 1.0) < 4e-3  # identity-like in the middle
    assert soft_bound(torch.tensor([5.0]), 0.0, 10.0).item() == 5.0  # the middle of any range is fixed


def test_logvar_range_must_be_ordered():
    with pytest.raises(ValueError, match="low < high"):
        BackbonesConfig(encoder="conv28", logvar_range=(3.0, -3.0))


NO_SHARDS = {"train": "none.tar", "test": "none.tar"}


class NeedsHeadConfig(PluginConfig):
    needs: ClassVar[frozenset[str]] = frozenset({"vae_head"})


class NeedsHead:
    """A third-party plugin that reads the encodings' mu/logvar and says so in its section's class."""

    @hookimpl
    def config_schema(self) -> type[PluginConfig]:
        return NeedsHeadConfig


def _backbone(tmp_path, backbone: dict, plugins: dict, extra: dict | None = None) -> tuple[int | None, set[str]]:
    """The validated `latent_dim` of a recipe with these plugins, and the modules backbones builds for it."""
    data = tiny_recipe(tmp_path, NO_SHARDS, plugins={"backbones": {"encoder": "conv28", **backbone}, **plugins})
    recipe = validate(data, check_data=False, extra_plugins=extra)[0]
    cfg = recipe.plugins["backbones"]
    assert recipe.resolved()["plugins"]["backbones"]["latent_dim"] == cfg.latent_dim  # written to runs as built
    return cfg.latent_dim, set(backbones.build_modules(config=recipe, cfg=cfg))


@pytest.mark.parametrize(
    ("plugins", "latent_dim"),
    [({"simclr": {}}, None), ({"byol": {}, "probe": {}}, None), ({"kl": {}}, DEFAULT_LATENT_DIM)]
    + [({"aavae": {}}, DEFAULT_LATENT_DIM), ({"consistency": {"lambda": 1.0}}, DEFAULT_LATENT_DIM)],
)
def test_the_vae_head_is_built_only_when_a_plugin_of_the_recipe_needs_it(tmp_path, plugins, latent_dim):
    """Unset, `latent_dim` was 128 for every recipe: the contrastive ones had to say `latent_dim: null` or train
    (and checkpoint) a head nothing read."""
    built, modules = _backbone(tmp_path, {}, plugins)
    assert built == latent_dim and ("head" in modules) == (latent_dim is not None)


def test_a_third_party_plugin_gets_the_head_by_declaring_it(tmp_path):
    assert _backbone(tmp_path, {}, {"simclr": {}}, extra={"needs_head": NeedsHead()})[0] == DEFAULT_LATENT_DIM


def test_a_decoder_or_an_explicit_latent_dim_builds_the_head(tmp_path):
    assert _backbone(tmp_path, {"latent_dim": 32}, {"simclr": {}}) == (32, {"encoder", "head"})
    assert _backbone(tmp_path, {"decoder": "conv28"}, {"simclr": {}}) == (
        DEFAULT_LATENT_DIM,
        {"encoder", "head", "decoder"},
    )
    assert BackbonesConfig(encoder="conv28").latent_dim is None  # a section validated outside a recipe


def test_no_head_where_a_plugin_needs_one_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError) as err:
        _backbone(
            tmp_path, {"latent_dim": None}, {"simclr": {}, "kl": {}, "needs_head": {}}, {"needs_head": NeedsHead()}
        )
    assert str(err.value) == (
        "plugins.backbones: Value error, latent_dim: null builds no VAE head, and plugins kl, needs_head need one: "
        "give latent_dim a size or leave it out (got {'encoder': 'conv28', 'latent_dim': None})"
    )
