"""Plugin `backbones`: the encoder (the one `encode` provider), the VAE head and the decoder.

Encoders: torchvision ResNet-18/50 with the CIFAR stem (3x3 conv, stride 1, no
max-pool) for 32 px or the STL stem (7x7 conv, stride 2, no max-pool) for 96 px
(docs/methods.md#backbones), `conv28`, a small conv net for 28-px grey images, and any
pytorch-image-models (timm) model as `timm/<model name>` (`timm/vit_small_patch16_224`,
`timm/resnet50`, `timm/convnext_tiny`), built without its classifier (`num_classes=0`) and
with `img_size` set to the data's where the model takes one (ViTs); no weights are downloaded,
`pretrained` names a local file. `h` is the pooled encoder output (512 / 2048 / 256-d for the
built-in ones, the model's own width for timm's; the encoder's `num_features`): what the linear
probe sees and what every head sizes itself by.

VAE head (when `latent_dim` is set; unset, a 128-d one only when a plugin of the recipe `needs` a "vae_head"
(kl, aavae, consistency) or a decoder decodes its z, none otherwise): Linear(h,h)+BN+ReLU, then two bias-free Linear
layers for `mu` and `logvar`; `logvar` is soft-bounded to `logvar_range` by a scaled tanh
(`soft_bound`: without a KL term nothing bounds it, solo-learn issue 111 hit an inf loss; unlike
a clamp it keeps a gradient past the bound), `std = exp(logvar/2) + 1e-6`.

Decoders: the inverted ResNets of AAVAE's `src/models/decoder.py` (Lightning-Universe/paper-AAVAE,
commit 1fc158d: no BatchNorm, nearest upsampling, planes 256/128/64/32; basic blocks [2,2,2,2]
for ResNet-18, bottlenecks [3,6,4,3] for ResNet-50), and `conv28`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from framework import (
    Encoding,
    PluginConfig,
    Recipe,
    at_least_float32,
    full_precision,
    hookimpl,
    needed_by,
    num_features,
)
from plugins.blocks import PATCH_TOKENS, VAE_HEAD, image_sizes, posterior_std

BUILT_IN = ("resnet18", "resnet50", "conv28")
TIMM = "timm/"
DEFAULT_LATENT_DIM = 128  # AAVAE's


class BackbonesConfig(PluginConfig):
    # resnet18 | resnet50 | conv28 | timm/<any timm model name, optionally with its .tag>
    encoder: str
    # the built-in ResNets' stem (cifar: 3x3/1 conv; stl: 7x7/2; no max-pool), which the ResNet decoder inverts;
    # a timm model keeps its own stem (its options go in timm_kwargs), and only the decoder reads this
    stem: Literal["cifar", "stl"] = "cifar"
    # timm only: the input size of models that take one (ViTs' patch grid); None: data.image_size
    img_size: int | None = Field(None, gt=0)
    timm_kwargs: dict[str, Any] = {}  # timm only: more create_model arguments (drop_path_rate, stem_type, ...)
    # a local weights file loaded into the encoder at build (timm: through timm's own loader, which adapts
    # the first conv to the data's channels; built-in: strictly); nothing is ever downloaded
    pretrained: str | None = None
    # the VAE head's width; None: no head (encodings carry only h). Unset: DEFAULT_LATENT_DIM when a plugin of
    # the recipe needs the head (`needs` "vae_head") or `decoder` is set, else None (`_head_when_needed`)
    latent_dim: int | None = None
    logvar_range: tuple[float, float] = (-10.0, 10.0)  # soft bound of logvar (see `soft_bound`)
    decoder: Literal["resnet18", "resnet50", "conv28"] | None = None
    decoder_widen: int = Field(1, ge=1)  # the ResNet decoder's stage widths x this (the official `widen`)
    # token-level encodings (Encoding.patches) and a learned mask token (timm ViTs only); unset: whether a
    # plugin of the recipe needs them (`needs` "patch_tokens": ibot)
    patch_tokens: bool = False

    @model_validator(mode="before")
    @classmethod
    def _tokens_when_needed(cls, data: Any, info: ValidationInfo) -> Any:
        """Fill an unset `patch_tokens` from what the recipe needs; refuse `patch_tokens: false` where a plugin
        needs them, naming the plugin."""
        if not isinstance(data, dict):
            return data
        needing = needed_by(info, PATCH_TOKENS)
        if needing and data.get("patch_tokens") is False:
            raise ValueError(f"patch_tokens: false, and plugins {', '.join(needing)} need patch tokens")
        return {**data, "patch_tokens": True} if needing and "patch_tokens" not in data else data

    @model_validator(mode="before")
    @classmethod
    def _head_when_needed(cls, data: Any, info: ValidationInfo) -> Any:
        """Fill an unset `latent_dim` from what the recipe needs; refuse `latent_dim: null` where a plugin
        needs the head, naming the plugin (it would fail at its first step)."""
        if not isinstance(data, dict):
            return data
        needing = needed_by(info, VAE_HEAD)
        if "latent_dim" not in data:
            wanted = bool(needing) or data.get("decoder") is not None
            return {**data, "latent_dim": DEFAULT_LATENT_DIM if wanted else None}
        if data["latent_dim"] is None and needing:
            raise ValueError(
                f"latent_dim: null builds no VAE head, and plugins {', '.join(needing)} need one: "
                "give latent_dim a size or leave it out"
            )
        return data

    @field_validator("logvar_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"logvar_range must be (low, high) with low < high, got {list(value)}")
        return value

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        if value.startswith(TIMM):
            import timm

            if not timm.is_model(value[len(TIMM) :]):
                raise ValueError(f"timm {timm.__version__} has no model {value[len(TIMM) :]!r}")
        elif value not in BUILT_IN:
            raise ValueError(f"expected one of {', '.join(BUILT_IN)} or timm/<model name>")
        return value

    @field_validator("pretrained")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """Absolute, so that a run rebuilt from its saved recipe (eval, export, resume) finds it from any folder."""
        return None if value is None else str(Path(value).expanduser().resolve())

    @model_validator(mode="after")
    def _options_fit_encoder(self) -> BackbonesConfig:
        timm_model = self.encoder.startswith(TIMM)
        if not timm_model and (self.img_size is not None or self.timm_kwargs):
            raise ValueError(f"img_size and timm_kwargs apply to timm/ encoders, not {self.encoder}")
        if self.patch_tokens and self.patch_size() is None:
            raise ValueError(
                f"patch_tokens: {self.encoder} gives no patch tokens (a plugin of the recipe needs them): "
                "use a timm Vision Transformer, e.g. timm/vit_small_patch16_224"
            )
        return self

    def patch_size(self) -> int | None:
        """The patch side of the encoder's token-level encodings (capability `PatchGrid`): a timm Vision
        Transformer's patch, None for any other encoder."""
        if not self.encoder.startswith(TIMM):
            return None
        kwargs = {**({"img_size": self.img_size} if self.img_size else {}), **self.timm_kwargs}
        return vit_patch_size(self.encoder[len(TIMM) :], json.dumps(kwargs, sort_keys=True, default=str))


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


def timm_encoder(
    name: str, channels: int, image_size: int, kwargs: dict[str, Any], pretrained: str | None
) -> tuple[nn.Module, dict[str, Any]]:
    """timm's `name` without its classifier (forward gives the pooled, pre-logits features), and the
    `create_model` arguments that rebuild it (`num_classes=0` aside).

    `img_size` is passed to models that take one (a ViT's position embeddings are sized by it) unless
    `kwargs` sets it. With `pretrained`, timm's own loader reads that local file (never the network) as it
    reads its ImageNet weights: a classifier in the file is dropped, the first conv adapted to `channels`,
    a ViT's position embedding resampled to the patch grid.
    """
    import timm

    created: dict[str, Any] = {"in_chans": channels, **kwargs}
    loading: dict[str, Any] = {}
    file_keys: set[str] = set()
    if pretrained is not None:  # read once: timm loads from the state dict, the check below reads its keys
        state = read_weights(pretrained, timm.models.load_state_dict)
        file_keys = set(state)  # before timm drops a classifier from it
        loading = {"pretrained": True, "pretrained_cfg_overlay": {"state_dict": state}}
    try:
        try:
            net = timm.create_model(name, num_classes=0, **{"img_size": image_size, **created}, **loading)
            created.setdefault("img_size", image_size)
        except TypeError as exc:  # a model without an input size (CNNs): timm's constructors refuse the keyword
            if "img_size" not in str(exc) or "img_size" in kwargs:
                raise
            net = timm.create_model(name, num_classes=0, **created, **loading)
    except TypeError as exc:  # a keyword of timm_kwargs the model's constructor does not take
        raise ValueError(f"plugins.backbones.timm_kwargs: timm/{name} refuses {sorted(created)}: {exc}") from None
    except RuntimeError as exc:  # the file's tensors do not fit the model
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"plugins.backbones.pretrained: {pretrained} does not fit timm/{name}: {first}") from None
    if pretrained is not None:  # timm loads non-strictly once it drops a classifier: every tensor must be the file's
        missing = sorted(set(net.state_dict()) - file_keys)
        if missing:
            raise ValueError(
                f"plugins.backbones.pretrained: {pretrained} does not fit timm/{name}: "
                f"{len(missing)} of its tensors are not in the file (first: {missing[0]})"
            )
    net.num_features = getattr(net, "head_hidden_size", None) or net.num_features  # num_classes=0 returns this width
    return net, created


@functools.lru_cache(maxsize=32)
def vit_patch_size(name: str, kwargs: str) -> int | None:
    """The patch side of timm's `name` built with the JSON `kwargs` if it is a Vision Transformer (built on the
    meta device: no memory, no weights), else None."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    try:
        with torch.device("meta"):
            net = timm.create_model(name, num_classes=0, **json.loads(kwargs))
    except TypeError:  # a CNN refuses img_size: no patches
        return None
    return int(net.patch_embed.patch_size[0]) if isinstance(net, VisionTransformer) else None


class TokenViT(nn.Module):
    """Token-level encodings of a timm VisionTransformer (mixed into its class by `with_tokens`): called with
    `tokens=True`, its forward returns `(h, patches)`, the pooled features as timm's forward gives them and the
    patch tokens after the last norm; with `mask` (B, N) bool the masked patch embeddings are replaced by
    `mask_token` (1, D) before the position embedding (iBOT, DINOv2). Otherwise timm's forward, unchanged.

    The steps are timm's `VisionTransformer.forward_features` (timm 1.0) with the mask inserted after the patch
    embedding; the state dict is timm's own (the mask token is the plugin's module `mask_token`)."""

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        tokens: bool = False,
    ) -> Any:
        vit: Any = self
        if not tokens:
            return super().forward(x)
        x = vit.patch_embed(x)  # (B, N, D), or (B, H, W, D) with dynamic_img_size
        if mask is not None:
            assert mask_token is not None, "a mask needs the mask token"
            x = torch.where(mask.view(*x.shape[:-1], 1), mask_token.to(x.dtype), x)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        if vit.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models import checkpoint_seq

            x = checkpoint_seq(vit.blocks, x)
        else:
            x = vit.blocks(x)
        x = vit.norm(x)
        return vit.forward_head(x, pre_logits=True), x[:, vit.num_prefix_tokens :]


_TOKEN_CLASSES: dict[type, type] = {}


def with_tokens(net: nn.Module) -> nn.Module:
    """`net`, a timm VisionTransformer, with `TokenViT`'s forward (its class extended in place, one class per
    timm class: copies and FSDP2's own class extension keep working)."""
    cls = type(net)
    if cls not in _TOKEN_CLASSES:
        _TOKEN_CLASSES[cls] = type(cls.__name__, (TokenViT, cls), {"__module__": cls.__module__})
    net.__class__ = _TOKEN_CLASSES[cls]
    return net


class MaskToken(nn.Module):
    """The learned embedding (1, D) that replaces a masked patch's (zeros at start, as DINOv2's `mask_token`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, dim))


def build_encoder(cfg: BackbonesConfig, channels: int, image_size: int) -> nn.Module:
    """The recipe's encoder, with `num_features` and the `export_metadata` of `augssl export`."""
    if cfg.encoder.startswith(TIMM):
        name = cfg.encoder[len(TIMM) :]
        kwargs = {**({"img_size": cfg.img_size} if cfg.img_size else {}), **cfg.timm_kwargs}
        encoder, created = timm_encoder(name, channels, image_size, kwargs, cfg.pretrained)
        metadata: dict[str, Any] = {
            "arch": cfg.encoder,
            "key_names": "timm",
            "timm_model": name,
            "timm_kwargs": created,
        }
    else:
        resnet = cfg.encoder.startswith("resnet")
        encoder = resnet_encoder(cfg.encoder, cfg.stem, channels) if resnet else conv28_encoder(channels)
        if cfg.pretrained is not None:
            load_weights(encoder, cfg.pretrained)
        metadata = {
            "arch": cfg.encoder,
            "stem": cfg.stem if resnet else "conv28",
            "key_names": "torchvision" if resnet else "augssl conv28",
        }
    encoder.export_metadata = metadata  # type: ignore[assignment]  # torch types Module.__setattr__ for tensors and modules only
    return encoder


def check_input_sizes(encoder: nn.Module, name: str, sizes: list[int]) -> None:
    """ValueError, naming the fix, unless a patch-embedding encoder (timm's ViTs) takes every image size in
    `sizes`: without `dynamic_img_size` it takes its `img_size` only (timm asserts so at the first step), and
    with it sizes that are multiples of its patch (unless `dynamic_img_pad`)."""
    embed = getattr(encoder, "patch_embed", None)
    if embed is None or getattr(embed, "img_size", None) is None:
        return
    fixed, patch = embed.img_size[0], embed.patch_size[0]
    if embed.strict_img_size and (other := [s for s in sizes if s != fixed]):
        raise ValueError(
            f"plugins.backbones: {name} takes {fixed} px images only and the recipe's views are also {other} px "
            "(multi-crop): set plugins.backbones.timm_kwargs: {dynamic_img_size: true}"
        )
    if not embed.strict_img_size and not embed.dynamic_img_pad and (odd := [s for s in sizes if s % patch]):
        raise ValueError(
            f"plugins.backbones: {name} needs image sizes that are multiples of its {patch} px patch, got {odd} px: "
            "change the crop sizes or add dynamic_img_pad: true to plugins.backbones.timm_kwargs"
        )


def read_weights(path: str, reader: Callable[[str], Any]) -> dict[str, torch.Tensor]:
    """The state dict `reader` reads from the local file `path`: a one-line FileNotFoundError naming the recipe
    key when there is no such file, and a one-line ValueError when it holds no state dict (not safetensors, not
    a torch file of tensors: the reader's own error would be a traceback)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"plugins.backbones.pretrained: no file {path}")
    refused = f"plugins.backbones.pretrained: {path} is not a weights file (.safetensors, or a torch state dict)"
    try:
        state = reader(path)
    except OSError:  # unreadable (permissions, I/O): already one line, and not the content's fault
        raise
    except Exception as exc:  # safetensors' header errors, unpickling errors, timm's checks: the content's fault
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"{refused}: {type(exc).__name__}: {first}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{refused}: it holds a {type(state).__name__}")
    return state


def _state_dict(path: str) -> Any:
    """A `.safetensors` file's tensors (e.g. `augssl export`'s), or what a torch file holds."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(encoder: nn.Module, path: str) -> None:
    """A built-in encoder's weights from a local `.safetensors` or torch file, strictly."""
    state = read_weights(path, _state_dict)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"plugins.backbones.pretrained: {path} does not fit the encoder: {str(exc).splitlines()[0]}"
        ) from None


class VAEHead(nn.Module):
    """h -> (mu, logvar): Linear(h,h) + BatchNorm1d + ReLU, then two bias-free Linear layers; logvar soft-bounded."""

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
            return self.mu(body), soft_bound(self.logvar(body), *self.logvar_range)


def soft_bound(v: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """`v` squashed into (low, high) by a scaled tanh, `mid + half * tanh((v - mid) / half)`: slope 1 at the
    middle (within +-20 % of the half-range the value moves by under 1.4 %), a gradient everywhere (a hard clamp
    has none past the bound, so only a prior KL could bring logvar back; the consistency KL alone could not)."""
    mid, half = (low + high) / 2, (high - low) / 2
    return mid + half * torch.tanh((v - mid) / half)


# ---------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------


class Interpolate(nn.Module):
    """Nearest-neighbour resize to `size` x `size`, or by the factor `scale`."""

    def __init__(self, size: int | None = None, scale: int | None = None) -> None:
        super().__init__()
        if (size is None) == (scale is None):
            raise ValueError("Interpolate takes exactly one of size and scale")
        self.size, self.scale = size, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            return nn.functional.interpolate(x, size=(self.size, self.size), mode="nearest")
        return nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest")


def conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1)


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class DecoderBlock(nn.Module):
    """A residual block without BatchNorm (convolutions with biases), AAVAE's `BasicBlock` / `Bottleneck`.

    Basic: [upscale], conv3x3(cin, planes), ReLU, conv3x3(planes, planes); bottleneck (x4 expansion):
    conv1x1(cin, planes), ReLU, [upscale], conv3x3(planes, planes), ReLU, conv1x1(planes, 4 planes). The
    first block of a stage upscales; its skip is then [upscale] + conv1x1(cin, out), else the identity.
    Output: ReLU(body + skip).
    """

    def __init__(self, cin: int, planes: int, bottleneck: bool, upscale: Interpolate | None = None) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        out = planes * (4 if bottleneck else 1)
        if bottleneck:
            self.conv1, self.conv2, self.conv3 = conv1x1(cin, planes), conv3x3(planes, planes), conv1x1(planes, out)
        else:
            self.conv1, self.conv2 = conv3x3(cin, planes), conv3x3(planes, planes)
        self.upscale = upscale
        self.skip: nn.Module | None = None
        if upscale is not None or cin != out:
            self.skip = nn.Sequential(*([upscale] if upscale is not None else []), conv1x1(cin, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.upscale if self.upscale is not None else nn.Identity()
        if self.bottleneck:
            out = self.conv3(torch.relu(self.conv2(up(torch.relu(self.conv1(x))))))
        else:
            out = self.conv2(torch.relu(self.conv1(up(x))))
        return torch.relu(out + (self.skip(x) if self.skip is not None else x))


# The decoder's hidden width, by decoder type whatever the encoder: the official code passes the encoder's h_dim
# (512 / 2048) and always pairs a decoder with its own encoder type, so only a mixed pair differs
# (docs/methods.md#deviations).
DECODER_HIDDEN = {"resnet18": 512, "resnet50": 2048}


class ResNetDecoder(nn.Module):
    """AAVAE's inverted ResNet (`src/models/decoder.py` of Lightning-Universe/paper-AAVAE, commit 1fc158d):
    no BatchNorm, nearest-neighbour upsampling, biases on every layer.

    Linear(latent, h) + ReLU, Linear(h, h) + ReLU (h = 512 for ResNet-18, 2048 for ResNet-50), reshape to
    (h/16, 4, 4), conv1x1 to h + ReLU, four stages of planes 256/128/64/32 (x `widen`; x4 out for
    bottlenecks) with [2,2,2,2] basic blocks (ResNet-18) or [3,6,4,3] bottlenecks (ResNet-50), conv3x3 to 64
    + ReLU, and conv3x3 to the image channels. The first stage resizes 4x4 to size/8 (CIFAR stem) or size/16
    (STL stem), each later stage doubles; the STL stem's decoder doubles once more before the last conv (it
    inverts the stem's stride 2). 32 px: 4 -> 4 -> 8 -> 16 -> 32; 96 px (STL stem): 4 -> 6 -> 12 -> 24 -> 48 -> 96.
    """

    def __init__(
        self, arch: str, latent_dim: int, size: int, channels: int, stem: str = "cifar", widen: int = 1
    ) -> None:
        super().__init__()
        bottleneck = arch == "resnet50"
        blocks = [3, 6, 4, 3] if bottleneck else [2, 2, 2, 2]
        expansion = 4 if bottleneck else 1
        factor = 8 if stem == "cifar" else 16  # the encoder's downsampling: 3 strided stages, and the stem's
        if size % factor:
            raise ValueError(
                f"the {arch} decoder with the {stem} stem needs an image size divisible by {factor}, got {size}"
            )
        self.hidden = DECODER_HIDDEN[arch]
        self.linear = nn.Sequential(
            nn.Linear(latent_dim, self.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(self.hidden, self.hidden),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = [conv1x1(self.hidden // 16, self.hidden), nn.ReLU(inplace=True)]
        cin, planes = self.hidden, 256 * widen
        for i, n in enumerate(blocks):
            upscale = Interpolate(size=size // factor) if i == 0 else Interpolate(scale=2)
            stage = [DecoderBlock(cin, planes, bottleneck, upscale)]
            stage += [DecoderBlock(planes * expansion, planes, bottleneck) for _ in range(n - 1)]
            layers.append(nn.Sequential(*stage))
            cin, planes = planes * expansion, planes // 2
        layers += [conv3x3(cin, 64), nn.ReLU(inplace=True)]
        if stem != "cifar":
            layers.append(Interpolate(scale=2))
        layers.append(conv3x3(64, channels))
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.linear(z).view(-1, self.hidden // 16, 4, 4))


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
    encoder = build_encoder(cfg, channels, size)
    check_input_sizes(encoder, cfg.encoder, image_sizes(config))
    modules: dict[str, nn.Module] = {"encoder": encoder}
    if cfg.patch_tokens:  # token-level encodings: the ViT's forward gives its patch tokens, a mask token replaces some
        with_tokens(encoder)
        modules["mask_token"] = MaskToken(int(getattr(encoder, "embed_dim")))  # noqa: B009
    if cfg.latent_dim is not None:
        modules["head"] = VAEHead(num_features(encoder), cfg.latent_dim, cfg.logvar_range)  # build_encoder sets it
    if cfg.decoder is not None:
        if cfg.latent_dim is None:
            raise ValueError("plugins.backbones.decoder needs plugins.backbones.latent_dim")
        if cfg.decoder == "conv28":
            modules["decoder"] = Conv28Decoder(cfg.latent_dim, size, channels)
        else:
            modules["decoder"] = ResNetDecoder(cfg.decoder, cfg.latent_dim, size, channels, cfg.stem, cfg.decoder_widen)
    return modules


def encoder_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an encoder, in forward order: a torchvision ResNet's four stages; a timm
    model's `blocks` (ViTs, DeiT, EVA), else its `stages` (ConvNeXt, RegNet, timm's ResNets) or `layers`
    (Swin); none for the conv28 net, which is sharded whole."""
    if all(hasattr(encoder, f"layer{i}") for i in range(1, 5)):
        return [encoder.get_submodule(f"layer{i}") for i in range(1, 5)]
    for name in ("blocks", "stages", "layers"):
        container = getattr(encoder, name, None)
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container):
            return list(container)
    return []


@hookimpl
def shard_blocks(own: nn.ModuleDict) -> list[nn.Module]:
    return encoder_blocks(own["encoder"])


@hookimpl
def encode(own: nn.ModuleDict, view: torch.Tensor, mask: torch.Tensor | None, cfg: BackbonesConfig) -> Encoding:
    patches = None
    if cfg.patch_tokens:  # the teacher's `own` holds its encoder only: it is never masked
        token = own["mask_token"].weight if mask is not None else None
        h, patches = own["encoder"](view, mask=mask, mask_token=token, tokens=True)
    elif mask is not None:
        raise ValueError("a masked view needs patch tokens: plugins.backbones.patch_tokens is false")
    else:
        h = own["encoder"](view)
    if "head" not in own:
        return Encoding(h=h, patches=patches)
    mu, logvar = own["head"](h)
    z = mu + posterior_std(logvar) * torch.randn_like(mu) if own.training else mu
    return Encoding(h=h, mu=mu, logvar=logvar, z=z, patches=patches)


@hookimpl
def decode(own: nn.ModuleDict, encoding: Encoding) -> torch.Tensor:
    if "decoder" not in own:
        raise ValueError("no decoder configured: set plugins.backbones.decoder")
    if encoding.z is None:
        raise ValueError("the encoding has no latent z: set plugins.backbones.latent_dim")
    return own["decoder"](encoding.z)
