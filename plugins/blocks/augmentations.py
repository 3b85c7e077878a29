"""View builders and augmentation presets: SimCLR's views, multi-crop, CR-VAE's affine `t(x)`, the affine head's warp.

Each view is a picklable class instance (a torchvision ``v2.Compose`` of these steps, or
`AffineWithParams`) built from the public pieces of `framework` (`ToMode` first,
`tensor_steps` last), so the framework itself knows no method's augmentation.

* Base views (`simclr_view`, `crvae_affine_view`) take a PIL image and return a normalised
  float32 tensor (C, H, W).
* Derived views (`AffineWithParams`) take another view's tensor and return
  ``(tensor, params)``, ``params`` a 1-D float32 tensor.
* `two_views` is the pair of SimCLR views of the joint-embedding methods (SimCLR, BYOL,
  Barlow Twins), whose sections derive from `TwoViewsConfig`; `infer_strength` picks its preset from the data.
  `crop_views` is the same pair, or with the section's `crops` set a multi-crop set of N global and M local
  crops (`MultiCrop`; docs/methods.md#multi-crop), named by `crop_names`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor
from torch.nn import functional as tnf
from torchvision import transforms as v1
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from framework import (
    Encoding,
    OnDevice,
    PluginConfig,
    Recipe,
    StepContext,
    ToMode,
    View,
    check_stats,
    tensor_steps,
)
from plugins.blocks.capabilities import CropSizes
from plugins.blocks.photometric import BLUR_SIGMA, Photometric, ViewSpec, blur_kernel_size

Strength = Literal["cifar", "stl", "mnist", "solo_symmetric", "solo_asymmetric", "byol_asymmetric", "dino"]

# CR-VAE RandomAffine presets, docs/methods.md#cr-vae.
CRVAE_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "simple": {"degrees": (-15.0, 15.0), "translate": (0.05, 0.05), "scale": (0.9, 1.1)},
    "large": {"degrees": (-30.0, 30.0), "translate": (0.1, 0.1), "scale": (0.75, 1.25)},
}


_SOLO_ASYMMETRIC = ViewSpec((0.4, 0.4, 0.2, 0.1), bicubic=True)
_BYOL_ASYMMETRIC = _SOLO_ASYMMETRIC._replace(blur="pil", blur_p=1.0)

# The two views of each preset (docs/methods.md#simclr):
# cifar / stl: AAVAE's src/transforms.py LocalTransform (Lightning-Universe/paper-AAVAE) with jitter_strength 0.5 and
#   no blur for CIFAR-10, strength 1 and a kernel of int(0.1 * size) (odd) for STL-10, as its src/vae.py sets them;
# solo_symmetric / solo_asymmetric: solo-learn's scripts/pretrain/cifar/augmentations/symmetric.yaml (SimCLR) and
#   asymmetric.yaml (BYOL, Barlow Twins: solarisation on the second view only), its solo/data/pretrain_dataloader.py
#   steps (bicubic crop, PIL GaussianBlur of radius 0.1-2, ImageOps.solarize);
# byol_asymmetric: the BYOL paper's Table 6 (arXiv 2006.07733): blur p = 1.0 / 0.1 and solarisation p = 0 / 0.2 on the
#   first / second view, as solo-learn's scripts/pretrain/imagenet-100/augmentations/asymmetric.yaml (its CIFAR
#   asymmetric.yaml, solo_asymmetric, drops the blur);
# dino: DINO's DataAugmentationDINO (facebookresearch/dino main_dino.py; iBOT's and DINOv2's alike): its two global
#   crops are byol_asymmetric's (bicubic crop, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grey p 0.2, PIL blur p 1.0 / 0.1,
#   solarisation p 0 / 0.2), its local crops `LOCAL_VIEWS["dino"]`: the same with blur p 0.5 and no solarisation;
# mnist: ours for grey 28-px images (no paper gives one): crop 0.2-1, brightness/contrast only.
VIEW_PRESETS: dict[str, tuple[ViewSpec, ViewSpec]] = {
    "cifar": (ViewSpec((0.4, 0.4, 0.4, 0.1)),) * 2,
    "stl": (ViewSpec((0.8, 0.8, 0.8, 0.2), blur="kernel", blur_p=0.5),) * 2,
    "mnist": (ViewSpec((0.4, 0.4, 0.0, 0.0), crop_scale=(0.2, 1.0), grayscale_p=0.0),) * 2,
    "solo_symmetric": (ViewSpec((0.8, 0.8, 0.8, 0.2), blur="pil", blur_p=0.5, bicubic=True),) * 2,
    "solo_asymmetric": (_SOLO_ASYMMETRIC, _SOLO_ASYMMETRIC._replace(solarize_p=0.2)),
    "byol_asymmetric": (_BYOL_ASYMMETRIC, _BYOL_ASYMMETRIC._replace(blur_p=0.1, solarize_p=0.2)),
    "dino": (_BYOL_ASYMMETRIC, _BYOL_ASYMMETRIC._replace(blur_p=0.1, solarize_p=0.2)),
}
# The view of a multi-crop set's local crops where a preset has its own (else the preset's first view).
LOCAL_VIEWS: dict[str, ViewSpec] = {"dino": _BYOL_ASYMMETRIC._replace(blur_p=0.5)}


class PILGaussianBlur:
    """PIL's GaussianBlur with a radius drawn uniformly from `sigma` (by torch's RNG), as solo-learn's GaussianBlur."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        lo, hi = self.sigma
        radius = lo + (hi - lo) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def view_spec(
    strength: Strength, second: bool = False, scale: tuple[float, float] | None = None, local: bool = False
) -> ViewSpec:
    """The first (or, `second`, the second) view of the preset `strength` (see `VIEW_PRESETS`), or with `local` the
    view of its local crops (`LOCAL_VIEWS`, else its first view); `scale`, when given, replaces its crop scale (a
    multi-crop spec's global or local `scale`)."""
    if strength not in VIEW_PRESETS:
        raise ValueError(f"unknown strength {strength!r}; choose from {sorted(VIEW_PRESETS)}")
    spec = LOCAL_VIEWS.get(strength, VIEW_PRESETS[strength][0]) if local else VIEW_PRESETS[strength][int(second)]
    return spec if scale is None else spec._replace(crop_scale=(scale[0], scale[1]))


def _geometry(spec: ViewSpec, size: int, channels: int) -> list:
    """The per-sample geometry of a view: mode, RandomResizedCrop(size, crop_scale), hflip p=0.5."""
    interpolation = InterpolationMode.BICUBIC if spec.bicubic else InterpolationMode.BILINEAR
    return [
        ToMode(channels),
        v2.RandomResizedCrop(size, scale=spec.crop_scale, interpolation=interpolation),
        v2.RandomHorizontalFlip(p=0.5),
    ]


class CropFlip:
    """A view's geometry in one step, for the data workers of a split view: mode, RandomResizedCrop(size,
    `spec.crop_scale`, 3/4-4/3) and a horizontal flip with p = 0.5, to a uint8 tensor (C, H, W).

    The same distributions as `_geometry`'s torchvision transforms (the crop box is drawn by torchvision's
    `RandomResizedCrop.get_params`, the flip by `torch.rand`, both on torch's RNG); the crop is resized by
    torch's uint8 antialiased interpolation (torchvision's tensor path, within 1 of PIL's), about 4x cheaper
    than PIL's resize and than the `v2.Compose` of the same steps, which a worker feeding a device runs for
    every crop (benchmarks/augment_throughput.py)."""

    ratio = (3 / 4, 4 / 3)

    def __init__(self, spec: ViewSpec, size: int, channels: int) -> None:
        self.size, self.scale, self.mode = size, spec.crop_scale, ToMode(channels)
        self.interpolation = "bicubic" if spec.bicubic else "bilinear"

    def __call__(self, image: Image.Image) -> Tensor:
        image = self.mode(image)
        top, left, height, width = v1.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        region = image.crop((left, top, left + width, top + height))  # only the box's pixels are copied out
        pixels = torch.from_numpy(np.array(region)).view(height, width, -1)  # (h, w, C) uint8
        crop = pixels.permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w), channels-last strides
        out = tnf.interpolate(crop, size=(self.size, self.size), mode=self.interpolation, antialias=True)[0]
        return (out.flip(-1) if torch.rand(1) < 0.5 else out).contiguous()


def simclr_view(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int,
    strength: Strength = "cifar",
    second: bool = False,
    scale: tuple[float, float] | None = None,
    local: bool = False,
) -> v2.Compose:
    """A SimCLR-style augmented view (docs/methods.md#aavae, #simclr): the first (or, `second`, the second; `local`,
    the local crops') view of the preset `strength` (see `VIEW_PRESETS`, `LOCAL_VIEWS`), then normalise. `scale`,
    when given, replaces the preset's crop scale (a multi-crop spec's global or local `scale`).

    RandomResizedCrop(size, crop_scale), hflip p=0.5, ColorJitter with p=jitter_p, grayscale, Gaussian blur,
    solarisation (threshold 128), each with its probability. For 1-channel images saturation, hue and grayscale
    are meaningless and skipped.
    """
    check_stats(mean, std, channels)
    spec = view_spec(strength, second, scale, local)
    b, c, s, h = spec.jitter
    colour = channels == 3
    ops: list = _geometry(spec, size, channels)
    ops.append(
        v2.RandomApply([v2.ColorJitter(b, c, s if colour and s else None, h if colour and h else None)], spec.jitter_p)
    )
    if colour and spec.grayscale_p:
        ops.append(v2.RandomGrayscale(p=spec.grayscale_p))
    if spec.blur == "kernel":
        ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=BLUR_SIGMA)], p=spec.blur_p))
    elif spec.blur == "pil":
        ops.append(v2.RandomApply([PILGaussianBlur(BLUR_SIGMA)], p=spec.blur_p))
    if spec.solarize_p:
        ops.append(v2.RandomSolarize(threshold=128, p=spec.solarize_p))
    return v2.Compose(ops + tensor_steps(mean, std))


def simclr_split_view(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int,
    strength: Strength = "cifar",
    second: bool = False,
    scale: tuple[float, float] | None = None,
    local: bool = False,
) -> View:
    """`simclr_view` (same arguments) as a `View` whose photometric steps may run on the training device
    (docs/methods.md#augmentations-on-the-device): `transform` is `simclr_view` itself (run whole in the data
    workers), `on_device` its geometry in the workers (mode, crop, flip, to a uint8 tensor) and `Photometric`,
    the rest and normalisation, batched on the device."""
    spec = view_spec(strength, second, scale, local)
    worker = CropFlip(spec, size, channels)
    return View(
        simclr_view(size, mean, std, channels, strength, second, scale, local),
        on_device=OnDevice(worker, Photometric(spec, size, mean, std, channels)),
    )


def crvae_affine_view(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int,
    preset: Literal["simple", "large"] = "simple",
    vertical_flip: bool = False,
    color_jitter: bool = False,
) -> v2.Compose:
    """CR-VAE's `t(x)` (docs/methods.md#cr-vae), as the authors' `CRVAE/augmentations.py` (sinhasam/CRVAE):
    [RandomVerticalFlip p=0.5], RandomAffine preset (see `CRVAE_PRESETS`; nearest interpolation, black fill),
    [ColorJitter(brightness=0.2, contrast=0.5, hue=0.2), always applied], then normalise.

    ``vertical_flip`` and ``color_jitter`` select the authors' `*_vertical_flip*` / `*_jitter` variants (hue is
    a no-op on grey images). Expects ``size`` px images (no resize); a final CenterCrop(size) fixes the shape.
    """
    check_stats(mean, std, channels)
    if preset not in CRVAE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}")
    p = CRVAE_PRESETS[preset]
    ops: list = [ToMode(channels)]
    if vertical_flip:
        ops.append(v2.RandomVerticalFlip(p=0.5))
    affine = v2.RandomAffine(p["degrees"], p["translate"], p["scale"], interpolation=InterpolationMode.NEAREST, fill=0)
    ops.append(affine)  # nearest and black: torchvision's defaults, which the authors' code keeps
    if color_jitter:
        ops.append(v2.ColorJitter(brightness=0.2, contrast=0.5, hue=0.2))
    ops.append(v2.CenterCrop(size))
    return v2.Compose(ops + tensor_steps(mean, std))


AFFINE_COMPONENTS: tuple[str, ...] = (
    "angle",
    "translate_x",
    "translate_y",
    "scale",
    "shear_x",
    "shear_y",
)


class AffineParams(NamedTuple):
    """Raw affine parameters: degrees, pixels, factor, degrees (torchvision's conventions)."""

    angle: float = 0.0
    translate_x: float = 0.0
    translate_y: float = 0.0
    scale: float = 1.0
    shear_x: float = 0.0
    shear_y: float = 0.0

    def normalized(self, height: int, width: int) -> Tensor:
        """The 6-vector target of docs/methods.md#affine-head (float32):
        ``[angle/360, tx/size, ty/size, scale, shear_x/25, shear_y/25]``, size = W for tx, H for ty.
        """
        return torch.tensor(
            [
                self.angle / 360.0,
                self.translate_x / width,
                self.translate_y / height,
                self.scale,
                self.shear_x / 25.0,
                self.shear_y / 25.0,
            ],
            dtype=torch.float32,
        )


IDENTITY_AFFINE = AffineParams()


class AffineWithParams:
    """Derived view of docs/methods.md#affine-head: a random affine `A` on a view's image tensor.

    As the paper's code (DavidTorpey/homography-estimation-v0, he/data/dataset.py and the RandomAffine of
    he/data/new_transforms.py): rotation uniform in +-90 deg, translation a whole number of pixels (a uniform
    draw in +-25 % of the width / height, rounded half to even), scale uniform in 0.7-1.3, shear uniform in
    +-25 deg on x and y, nearest-neighbour interpolation, black fill (pixel value 0, i.e. -mean/std per channel
    after normalising). Returns ``(A(img), params)``, ``params`` = `AffineParams.normalized`.
    Components not in ``components`` are held at identity (angle 0, t 0, scale 1, shear 0).
    """

    accepts_uint8 = True  # also works on the pipeline's un-normalised uint8 images (black = 0)
    MAX_ANGLE = 90.0
    MAX_TRANSLATE = 0.25
    SCALE_RANGE = (0.7, 1.3)
    MAX_SHEAR = 25.0

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        components: Iterable[str] = AFFINE_COMPONENTS,
    ) -> None:
        if len(mean) != len(std):
            raise ValueError("mean and std must have the same length")
        self.components = frozenset(components)
        unknown = self.components - set(AFFINE_COMPONENTS)
        if unknown:
            raise ValueError(f"unknown affine components {sorted(unknown)}; use {AFFINE_COMPONENTS}")
        self.fill = [-m / s for m, s in zip(mean, std, strict=True)]

    def sample_params(self, height: int, width: int) -> AffineParams:
        """Draw parameters with torch's RNG (always 6 draws, so the stream does not depend
        on ``components``); disabled components are set to their identity value."""
        u = (torch.rand(6, dtype=torch.float64) * 2 - 1).tolist()  # uniform in [-1, 1)
        lo, hi = self.SCALE_RANGE
        drawn = AffineParams(
            angle=u[0] * self.MAX_ANGLE,
            translate_x=float(round(u[1] * self.MAX_TRANSLATE * width)),  # whole pixels, as the paper's code
            translate_y=float(round(u[2] * self.MAX_TRANSLATE * height)),
            scale=lo + (hi - lo) * (u[3] + 1) / 2,
            shear_x=u[4] * self.MAX_SHEAR,
            shear_y=u[5] * self.MAX_SHEAR,
        )
        return AffineParams(
            *(
                v if name in self.components else ident
                for name, v, ident in zip(AFFINE_COMPONENTS, drawn, IDENTITY_AFFINE, strict=True)
            )
        )

    def apply(self, img: Tensor, params: Sequence[float]) -> tuple[Tensor, Tensor]:
        """Apply exactly ``params`` (an `AffineParams` or 6 raw values, whatever ``components``
        says) to ``img`` (..., C, H, W). The identity is returned unchanged (a copy, no
        interpolation)."""
        params = AffineParams(*params)
        height, width = img.shape[-2:]
        target = params.normalized(height, width)
        if params == IDENTITY_AFFINE:
            return img.clone(), target
        out = F.affine(
            img,
            angle=params.angle,
            translate=[params.translate_x, params.translate_y],
            scale=params.scale,
            shear=[params.shear_x, params.shear_y],
            interpolation=InterpolationMode.NEAREST,
            fill=0 if img.dtype == torch.uint8 else self.fill,  # black either way
        )
        return out, target

    def __call__(self, img: Tensor) -> tuple[Tensor, Tensor]:
        return self.apply(img, self.sample_params(*img.shape[-2:]))

    def __repr__(self) -> str:
        comps = [c for c in AFFINE_COMPONENTS if c in self.components]
        return f"{type(self).__name__}(components={comps}, fill={self.fill})"


def infer_strength(config: Recipe, explicit: Strength | None = None) -> Strength:
    """The `simclr_view` preset: `explicit`, else mnist (grey), stl (>= 64 px) or cifar."""
    if explicit is not None:
        return explicit
    if config.data.channels == 1:
        return "mnist"
    return "stl" if config.data.image_size >= 64 else "cifar"


LOCAL_SCALE = (0.05, 0.14)  # SwAV's (and solo-learn's) local crop scale, the default of `crops.local.scale`


class CropGroup(BaseModel):
    """`count` crops of `size` px and RandomResizedCrop `scale`. Unset, a global crop's size is `data.image_size`
    and its scale the preset's; a local crop's size is required and its scale `LOCAL_SCALE`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # as every recipe section's

    count: int = Field(ge=0)
    size: int | None = Field(None, gt=0)
    scale: tuple[float, float] | None = None

    @field_validator("scale")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {list(value)}")
        return value


class MultiCrop(BaseModel):
    """A multi-crop spec (docs/methods.md#multi-crop): `global` crops (views `v1`, `v2`, ...) at the global size
    (default `data.image_size`) and `local` crops (`l1`, `l2`, ...) at their own, required, size.

    solo-learn's names for these: `num_large_crops` / `num_small_crops`, each augmentation pipeline's `crop_size`,
    `num_crops` and `rrc.crop_min_scale` / `crop_max_scale` (SwAV's ImageNet defaults: 2 x 224 at 0.14-1, 6 x 96
    at 0.05-0.14).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    global_: CropGroup = Field(default_factory=lambda: CropGroup(count=2), alias="global")
    local: CropGroup = Field(default_factory=lambda: CropGroup(count=0))

    @model_validator(mode="after")
    def _consistent(self) -> MultiCrop:
        if self.global_.count < 1:
            raise ValueError(f"at least one global crop is needed, got global.count {self.global_.count}")
        if self.global_.count + self.local.count < 2:
            raise ValueError("at least two crops of each image are needed (global.count + local.count >= 2)")
        if self.local.count and self.local.size is None:
            raise ValueError(f"local.size is required with local.count {self.local.count}")
        return self


class TwoViewsConfig(PluginConfig):
    """The section of a joint-embedding plugin (SimCLR, BYOL, Barlow Twins): `two_views`' preset, the multi-crop
    spec `crops` (None: the two views `v1`, `v2`), and the capability `AugmentedViews` with `v1`, the view the
    affine head transforms by default."""

    augmented_view: ClassVar[str] = "v1"

    def crop_sizes(self, image_size: int) -> list[int]:
        """The image sizes of the section's views (capability `CropSizes`): `image_size` without `crops`."""
        if self.crops is None:
            return [image_size]
        sizes = [self.crops.global_.size or image_size]
        if self.crops.local.count and self.crops.local.size is not None:  # validation requires the size then
            sizes.append(self.crops.local.size)
        return sizes

    strength: Strength | None = None  # simclr_view preset; None: inferred from data.channels / image_size
    crops: MultiCrop | None = None  # None: the two views v1, v2 of today, each encoded on its own


def two_views(config: Recipe, strength: Strength | None) -> dict[str, View]:
    """Two independent SimCLR-augmented views of each image, `v1` and `v2` (the preset's first and second)."""
    d = config.data
    preset = infer_strength(config, strength)
    return {
        name: simclr_split_view(d.image_size, d.mean, d.std, d.channels, preset, second=name == "v2")
        for name in ("v1", "v2")
    }


def image_sizes(config: Recipe) -> list[int]:
    """Every image size the recipe's views give the encoder: `data.image_size` and the sizes of every plugin
    whose section has the capability `CropSizes` (a multi-crop section), sorted."""
    sizes = {config.data.image_size}
    for cfg in config.providers(CropSizes).values():
        sizes.update(cfg.crop_sizes(config.data.image_size))
    return sorted(sizes)


def crop_names(cfg: TwoViewsConfig) -> tuple[list[str], list[str]]:
    """The view names (without the plugin's prefix) of the global crops, `v1`..`vN`, and the local ones, `l1`..`lM`."""
    n, m = (2, 0) if cfg.crops is None else (cfg.crops.global_.count, cfg.crops.local.count)
    return [f"v{i}" for i in range(1, n + 1)], [f"l{i}" for i in range(1, m + 1)]


def crop_views(config: Recipe, cfg: TwoViewsConfig) -> dict[str, View]:
    """The section's views: `two_views` without `crops`; else every global crop `v<i>` is the preset's first view
    (odd i) or second (even i) at the global size and scale, and every local crop the preset's local view
    (`LOCAL_VIEWS`: DINO's blur p 0.5) or else its first view, at the local size and scale (solo-learn: the same
    augmentations, a smaller crop)."""
    if cfg.crops is None:
        return two_views(config, cfg.strength)
    d, g, loc = config.data, cfg.crops.global_, cfg.crops.local
    preset = infer_strength(config, cfg.strength)
    globals_, locals_ = crop_names(cfg)
    views = {
        name: simclr_split_view(g.size or d.image_size, d.mean, d.std, d.channels, preset, i % 2 == 1, g.scale)
        for i, name in enumerate(globals_)
    }
    local_size = loc.size or d.image_size  # set whenever there are local crops (MultiCrop checks it)
    local_scale = loc.scale or LOCAL_SCALE
    views |= {
        name: simclr_split_view(local_size, d.mean, d.std, d.channels, preset, False, local_scale, local=True)
        for name in locals_
    }
    return views


def encode_crops(ctx: StepContext, cfg: TwoViewsConfig, names: Sequence[str]) -> list[Encoding]:
    """The encodings of the views `names` (short names, as `crop_names` gives them): one `ctx.encode` each without
    `crops` (as before multi-crop), else `ctx.encode_grouped` (one encoder call per crop size, DINO's
    MultiCropWrapper)."""
    if cfg.crops is None:
        return [ctx.encode(name) for name in names]
    return ctx.encode_grouped(names)
