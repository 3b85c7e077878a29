"""Plugin `backbones`: the encoder (the one `encode` provider), the VAE head and the decoder.

Encoders: torchvision ResNet-18/50 with the CIFAR stem (3x3 conv, stride 1, no
max-pool) for 32 px or the STL stem (7x7 conv, stride 2, no max-pool) for 96 px
(METHODS.md section 2), and `conv28`, a small conv net for 28-px grey images.
`h` is the pooled encoder output (512 / 2048 / 256-d, the encoder's `num_features`): what
the linear probe sees and what every head sizes itself by.

VAE head (when `latent_dim` is set): Linear(h,h)+BN+ReLU, then two bias-free Linear
layers for `mu` and `logvar`; `logvar` is clamped to `logvar_range` (without a KL
term nothing bounds it: solo-learn issue 111 hit an inf loss), `std = exp(logvar/2) + 1e-6`.

Decoders: the inverted ResNets of AAVAE (no BatchNorm, nearest upsampling; basic
blocks [2,2,2,2] for ResNet-18, bottlenecks [3,6,4,3] for ResNet-50), and `conv28`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torchvision
from torch import nn

from framework import Encoding, PluginConfig, Recipe, at_least_float32, full_precision, hookimpl, num_features

NAME = "backbones"


class BackbonesConfig(PluginConfig):
    encoder: Literal["resnet18", "resnet50", "conv28"]
    stem: Literal["cifar", "stl"] = "cifar"  # cifar: 3x3/1 conv; stl: 7x7/2 conv; never a max-pool
    latent_dim: int | None = 128  # None: no VAE head (encodings carry only h)
    logvar_range: tuple[float, float] = (-10.0, 10.0)
    decoder: Literal["resnet18", "resnet50", "conv28"] | None = None


# ---------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------


def resnet_encoder(arch: str, stem: str, channels: int) -> nn.Module:
    """A torchvision ResNet whose forward returns the pooled features (fc removed).

    Its state dict has torchvision's own keys, so an exported file loads strictly into
    `resnet_encoder(arch, stem, channels)` or into torchvision's ResNet with the same stem.
    """
    net = getattr(torchvision.models, arch)(weights=None)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    else:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.num_features = net.fc.in_features
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def conv28_encoder(channels: int) -> nn.Module:
    """A small conv net for 28-px images: 28 -> 14 -> 7, a 1x1 conv to 256, global average pooling."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    net = nn.Sequential(
        *block(channels, 32, 1),
        *block(32, 64, 2),
        *block(64, 128, 2),
        nn.Conv2d(128, 256, 1, bias=False),
        nn.BatchNorm2d(256),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    net.num_features = 256  # type: ignore[assignment]  # torch types Module.__setattr__ for tensors and modules only
    return net


def build_encoder(cfg: BackbonesConfig, channels: int) -> nn.Module:
    """The recipe's encoder, with `num_features` and the `export_metadata` of `augssl export`."""
    resnet = cfg.encoder.startswith("resnet")
    encoder = resnet_encoder(cfg.encoder, cfg.stem, channels) if resnet else conv28_encoder(channels)
    encoder.export_metadata = {  # type: ignore[assignment]  # torch types Module.__setattr__ for tensors and modules only
        "arch": cfg.encoder,
        "stem": cfg.stem if resnet else "conv28",
        "key_names": "torchvision" if resnet else "augssl conv28",
    }
    return encoder


class VAEHead(nn.Module):
    """h -> (mu, logvar): Linear(h,h) + BatchNorm1d + ReLU, then two bias-free Linear layers."""

    def __init__(self, in_dim: int, latent_dim: int, logvar_range: tuple[float, float]) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, in_dim), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True))
        self.mu = nn.Linear(in_dim, latent_dim, bias=False)
        self.logvar = nn.Linear(in_dim, latent_dim, bias=False)
        self.logvar_range = logvar_range

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) in float32 even under autocast: the whole head runs in full precision (the
        consistency KL between near-equal posteriors is a difference of near-equal numbers)."""
        with full_precision(h.device):
            body = self.body(at_least_float32(h))
            return self.mu(body), self.logvar(body).clamp(*self.logvar_range)


def posterior_std(logvar: torch.Tensor) -> torch.Tensor:
    """The posterior's standard deviation, as METHODS.md defines it."""
    return torch.exp(logvar / 2) + 1e-6


# ---------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------


class _Up(nn.Module):
    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest") if self.scale > 1 else x


class DecoderBlock(nn.Module):
    """Residual block without BatchNorm; optionally upsamples first. Basic (2 convs) or bottleneck (1-3-1)."""

    def __init__(self, cin: int, cout: int, scale: int, bottleneck: bool) -> None:
        super().__init__()
        self.up = _Up(scale)
        if bottleneck:
            width = cout // 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, cout, 1),
            )
        else:
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1)
            )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return torch.relu(self.body(x) + self.skip(x))


def upsampling_plan(size: int) -> tuple[int, list[int]]:
    """Start resolution and the scale of each of the four stages: 32 -> (4, [1,2,2,2]), 96 -> (6, [2,2,2,2])."""
    k = max(k for k in range(5) if size % 2**k == 0 and size // 2**k >= 4)
    return size // 2**k, [1] * (4 - k) + [2] * k


class ResNetDecoder(nn.Module):
    """AAVAE's inverted ResNet: Linear(latent,2048)+ReLU, Linear(2048,128*s*s)+ReLU, 1x1 conv, four up-stages,
    conv3x3 to 64, ReLU, conv3x3 to the image channels."""

    def __init__(self, arch: str, latent_dim: int, size: int, channels: int) -> None:
        super().__init__()
        bottleneck = arch == "resnet50"
        blocks = [3, 6, 4, 3] if bottleneck else [2, 2, 2, 2]
        widths = [2048, 1024, 512, 256] if bottleneck else [512, 256, 128, 64]
        self.start, scales = upsampling_plan(size)
        self.linear = nn.Sequential(
            nn.Linear(latent_dim, 2048),
            nn.ReLU(inplace=True),
            nn.Linear(2048, 128 * self.start**2),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = [nn.Conv2d(128, widths[0], 1)]
        cin = widths[0]
        for width, n, scale in zip(widths, blocks, scales, strict=True):
            for i in range(n):
                layers.append(DecoderBlock(cin, width, scale if i == 0 else 1, bottleneck))
                cin = width
        layers += [nn.Conv2d(cin, 64, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(64, channels, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.linear(z).view(-1, 128, self.start, self.start))


class Conv28Decoder(nn.Module):
    """Mirror of `conv28`: Linear to 128x(s/4)^2, two transposed convs (x2 each), a 3x3 conv to the channels."""

    def __init__(self, latent_dim: int, size: int, channels: int) -> None:
        super().__init__()
        if size % 4:
            raise ValueError(f"conv28 decoder needs an image size divisible by 4, got {size}")
        self.start = size // 4
        self.linear = nn.Sequential(nn.Linear(latent_dim, 128 * self.start**2), nn.ReLU(inplace=True))
        self.body = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, 2, 1),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(64, 32, 4, 2, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, channels, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.linear(z).view(-1, 128, self.start, self.start))


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------


@hookimpl
def config_schema() -> type[PluginConfig]:
    return BackbonesConfig


@hookimpl
def build_modules(config: Recipe, cfg: BackbonesConfig) -> dict[str, nn.Module]:
    channels, size = config.data.channels, config.data.image_size
    encoder = build_encoder(cfg, channels)
    modules: dict[str, nn.Module] = {"encoder": encoder}
    if cfg.latent_dim is not None:
        modules["head"] = VAEHead(num_features(encoder), cfg.latent_dim, cfg.logvar_range)  # build_encoder sets it
    if cfg.decoder is not None:
        if cfg.latent_dim is None:
            raise ValueError("plugins.backbones.decoder needs plugins.backbones.latent_dim")
        if cfg.decoder == "conv28":
            modules["decoder"] = Conv28Decoder(cfg.latent_dim, size, channels)
        else:
            modules["decoder"] = ResNetDecoder(cfg.decoder, cfg.latent_dim, size, channels)
    return modules


@hookimpl
def encode(own: nn.ModuleDict, view: torch.Tensor) -> Encoding:
    h = own["encoder"](view)
    if "head" not in own:
        return Encoding(h=h)
    mu, logvar = own["head"](h)
    z = mu + posterior_std(logvar) * torch.randn_like(mu) if own.training else mu
    return Encoding(h=h, mu=mu, logvar=logvar, z=z)


@hookimpl
def decode(own: nn.ModuleDict, encoding: Encoding) -> torch.Tensor:
    if "decoder" not in own:
        raise ValueError("no decoder configured: set plugins.backbones.decoder")
    if encoding.z is None:
        raise ValueError("the encoding has no latent z: set plugins.backbones.latent_dim")
    return own["decoder"](encoding.z)
