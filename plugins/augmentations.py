"""The augmentations of the built-in methods: SimCLR's, CR-VAE's affine `t(x)`, the affine head's warp.

Each view is a picklable class instance (a torchvision ``v2.Compose`` of these steps, or
`AffineWithParams`) built from the public pieces of `framework` (`ToMode` first,
`tensor_steps` last), so the framework itself knows no method's augmentation.

* Base views (`simclr_view`, `crvae_affine_view`) take a PIL image and return a normalised
  float32 tensor (C, H, W).
* Derived views (`AffineWithParams`) take another view's tensor and return
  ``(tensor, params)``, ``params`` a 1-D float32 tensor.
* `two_views` is the pair of SimCLR views of the joint-embedding methods (SimCLR, BYOL,
  Barlow Twins); `infer_strength` picks its preset from the data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from framework import Recipe, ToMode, View, check_stats, tensor_steps

Strength = Literal["cifar", "stl", "mnist"]

# CR-VAE RandomAffine presets, docs/methods.md#cr-vae.
CRVAE_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "simple": {"degrees": (-15.0, 15.0), "translate": (0.05, 0.05), "scale": (0.9, 1.1)},
    "large": {"degrees": (-30.0, 30.0), "translate": (0.1, 0.1), "scale": (0.75, 1.25)},
}


def simclr_view(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int,
    strength: Strength = "cifar",
) -> v2.Compose:
    """SimCLR-style augmentation of docs/methods.md#aavae (AAVAE's `t(x)`).

    RandomResizedCrop(size, scale=(0.08, 1)), hflip p=0.5, ColorJitter with p=0.8
    ("cifar" 0.4,0.4,0.4,0.1; "stl" 0.8,0.8,0.8,0.2), grayscale p=0.2, and for "stl"
    only a Gaussian blur p=0.5, kernel ~10 % of size (odd), sigma 0.1-2; then normalise.
    For 1-channel images saturation, hue and grayscale are meaningless and skipped.
    "mnist" is our grey preset (not from the papers): crop scale (0.2, 1), hflip, and
    brightness/contrast jitter 0.4 with p=0.8 only.
    """
    check_stats(mean, std, channels)
    jitter = {"cifar": (0.4, 0.4, 0.4, 0.1), "stl": (0.8, 0.8, 0.8, 0.2), "mnist": (0.4, 0.4, 0, 0)}
    if strength not in jitter:
        raise ValueError(f"unknown strength {strength!r}")
    b, c, s, h = jitter[strength]
    colour = channels == 3 and strength != "mnist"
    ops: list = [
        ToMode(channels),
        v2.RandomResizedCrop(size, scale=(0.2 if strength == "mnist" else 0.08, 1.0)),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(b, c, s if colour else None, h if colour else None)], p=0.8),
    ]
    if colour:
        ops.append(v2.RandomGrayscale(p=0.2))
    if strength == "stl":
        kernel = max(3, int(0.1 * size)) | 1  # ~10 % of size, odd
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    return v2.Compose(ops + tensor_steps(mean, std))


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
    """Derived view of docs/methods.md#affine-head: a random affine `A` on a normalised tensor.

    Rotation +-90 deg, translation +-25 % of the size, scale 0.7-1.3, shear +-25 deg on
    x and y, black fill (pixel value 0, i.e. -mean/std per channel after normalising),
    bilinear interpolation. Returns ``(A(img), params)``, ``params`` = `AffineParams.normalized`.
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
            translate_x=u[1] * self.MAX_TRANSLATE * width,
            translate_y=u[2] * self.MAX_TRANSLATE * height,
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
            interpolation=InterpolationMode.BILINEAR,
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


def two_views(config: Recipe, strength: Strength | None) -> dict[str, View]:
    """Two independent SimCLR-augmented views of each image, `v1` and `v2`."""
    d = config.data
    view = View(simclr_view(d.image_size, d.mean, d.std, d.channels, infer_strength(config, strength)))
    return {"v1": view, "v2": view}
