"""Encoders, stems, VAE head and decoders of the `backbones` plugin (METHODS.md section 2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plugins.backbones import (
    Conv28Decoder,
    ResNetDecoder,
    VAEHead,
    conv28_encoder,
    resnet_encoder,
    upsampling_plan,
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


@pytest.mark.parametrize("size, plan", [(32, (4, [1, 2, 2, 2])), (96, (6, [2, 2, 2, 2])), (28, (7, [1, 1, 2, 2]))])
def test_upsampling_plan(size, plan):
    assert upsampling_plan(size) == plan


@pytest.mark.parametrize("arch, size", [("resnet18", 32), ("resnet18", 96), ("resnet50", 32)])
def test_resnet_decoders_have_no_batchnorm_and_reach_the_image_size(arch, size):
    dec = ResNetDecoder(arch, latent_dim=128, size=size, channels=3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dec.modules())
    with torch.no_grad():
        assert dec(torch.randn(2, 128)).shape == (2, 3, size, size)
    blocks = [m for m in dec.body if m.__class__.__name__ == "DecoderBlock"]
    assert len(blocks) == (16 if arch == "resnet50" else 8)  # [3,6,4,3] bottlenecks / [2,2,2,2] basic


def test_vae_head_clamps_logvar():
    head = VAEHead(8, 4, (-2.0, 2.0)).eval()
    with torch.no_grad():
        head.logvar.weight.fill_(100.0)
        mu, logvar = head(torch.ones(3, 8))
    assert mu.shape == logvar.shape == (3, 4) and logvar.max() <= 2.0
    assert head.mu.bias is None and head.logvar.bias is None
