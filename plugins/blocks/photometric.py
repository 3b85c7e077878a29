"""Photometric augmentation batched on the training device, each sample with its own random parameters.

The functional ops take float images in [0, 1] (B, C, H, W) and per-sample factors (B,) and follow torchvision's
tensor kernels (`torchvision.transforms.v2.functional`: `adjust_brightness`, `adjust_contrast`,
`adjust_saturation`, `adjust_hue`, `rgb_to_grayscale`, `gaussian_blur`, `solarize`), computed in float32 without
torchvision's rounding to uint8 between steps. `pil_gaussian_blur` is PIL's `GaussianBlur(radius)` (three passes of
an extended box blur, edges repeated), the blur of solo-learn's presets. On grey (1-channel) images saturation,
hue and grayscale leave the image as it is, as torchvision's do.

`Photometric` is the photometric part of a `ViewSpec` view (`plugins.blocks.augmentations`) as a
`framework.types.DeviceStep`: it draws every random parameter from an explicit generator, as torchvision's
transforms draw them (docs/methods.md#augmentations-on-the-device), and normalises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as tnf

from framework import check_stats, normalize


class ViewSpec(NamedTuple):
    """One SimCLR-style view, as `simclr_view` builds it. Every step but the crop and the flip is optional."""

    jitter: tuple[float, float, float, float]  # ColorJitter brightness, contrast, saturation, hue
    blur: Literal["none", "kernel", "pil"] = "none"  # kernel: torchvision, ~10 % of the size; pil: PIL's radius
    blur_p: float = 0.0
    solarize_p: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    bicubic: bool = False  # RandomResizedCrop's interpolation: bicubic, else bilinear (torchvision's default)


BLUR_SIGMA = (0.1, 2.0)  # the presets' Gaussian blur sigma (kernel) or PIL radius, drawn uniformly
SOLARIZE_THRESHOLD = 128 / 255  # RandomSolarize(threshold=128) on [0, 1]
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def blur_kernel_size(size: int) -> int:
    """The presets' torchvision GaussianBlur kernel for `size`-px views: about 10 % of the size, odd, at least 3."""
    return max(3, int(0.1 * size)) | 1


def _rows(values: Tensor) -> Tensor:
    """Per-sample values (B,) as (B, 1, 1, 1), to broadcast over images."""
    return values.view(-1, 1, 1, 1)


def luminance(images: Tensor) -> Tensor:
    """(B, 1, H, W): torchvision's grey level of RGB images (0.2989 R + 0.587 G + 0.114 B); grey images as they are."""
    if images.shape[-3] == 1:
        return images
    r, g, b = images.unbind(dim=-3)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(-3)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """The grey level of every pixel, keeping the image's channels (torchvision's `num_output_channels=C`)."""
    return luminance(images).expand_as(images)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's `_blend`: `factor * images + (1 - factor) * other`, clamped to [0, 1], per sample."""
    f = _rows(factor)
    return (images * f + other * (1 - f)).clamp_(0.0, 1.0)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Scale every pixel by the sample's factor (0 black, 1 the image)."""
    return images.mul(_rows(factor)).clamp_(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its mean grey level (0 a flat grey image, 1 the image)."""
    return _blend(images, luminance(images).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each RGB image with its grey levels (0 grey, 1 the image); grey images unchanged."""
    if images.shape[-3] == 1:
        return images
    return _blend(images, luminance(images), factor)


def _rgb_to_hsv(image: Tensor) -> Tensor:
    """torchvision's `_rgb_to_hsv` (after Pillow's): (..., 3, H, W) RGB -> HSV, hue in [0, 1)."""
    r, g, _ = image.unbind(dim=-3)
    minc, maxc = torch.aminmax(image, dim=-3)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, channels_range).unsqueeze(dim=-3)
    rc, gc, bc = ((maxc.unsqueeze(dim=-3) - image) / divisor).unbind(dim=-3)
    maxc_neq_r = maxc != r
    maxc_eq_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(maxc_eq_g & maxc_neq_r)
    hr = bc.sub(gc).mul_(~maxc_neq_r)
    hb = gc.add(4.0).sub_(rc).mul_(maxc_neq_r & ~maxc_eq_g)
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    """HSV -> RGB (B, 3, H, W), channel n = `v - v s clamp(min(k, 4 - k), 0, 1)` with `k = (n' + 6 h) mod 6`,
    n' = 5, 3, 1 for R, G, B: torchvision's `_hsv_to_rgb` (the p, q, t of each sixth of the wheel) in closed
    form, equal to float rounding, without its index table (a host-to-device copy per call)."""
    h, s, v = (c.unsqueeze(-3) for c in hsv.unbind(dim=-3))
    offsets = torch.arange(5.0, 0.0, -2.0, device=hsv.device).view(3, 1, 1)
    k = (h * 6 + offsets).remainder_(6)
    return v - v * s * torch.minimum(k, 4 - k).clamp_(0.0, 1.0)


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Shift each RGB image's hue by its factor (in [-0.5, 0.5], a fraction of the colour wheel) through HSV, as
    torchvision does; grey images unchanged."""
    if images.shape[-3] == 1:
        return images
    h, s, v = _rgb_to_hsv(images).unbind(dim=-3)
    h = (h + factor.view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def solarize(images: Tensor, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    """Invert every pixel at or above `threshold` (torchvision's and PIL's `solarize`)."""
    return torch.where(images >= threshold, 1.0 - images, images)


def _separable(images: Tensor, kernels: Tensor, padding_mode: str, passes: int = 1) -> Tensor:
    """Convolve each image (B, C, H, W) `passes` times with its own symmetric 1-D kernel (B, K) along the rows, then
    as often along the columns: grouped (depthwise) convolutions over the B * C planes, each pass padding the
    border by `padding_mode`."""
    b, c, height, width = images.shape
    k = kernels.shape[-1]
    weight = kernels.to(images.dtype).repeat_interleave(c, dim=0)  # one kernel per plane
    planes = images.reshape(1, b * c, height, width)
    for padding, shape in (([k // 2, k // 2, 0, 0], (1, k)), ([0, 0, k // 2, k // 2], (k, 1))):
        for _ in range(passes):
            planes = tnf.conv2d(
                tnf.pad(planes, padding, mode=padding_mode), weight.view(b * c, 1, *shape), groups=b * c
            )
    return planes.view(b, c, height, width)


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """(B, kernel_size): torchvision's 1-D Gaussian kernel of each sample's sigma (`_get_gaussian_kernel1d`)."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32, device=sigma.device)
    return torch.softmax(x.div(sigma.view(-1, 1).float()).pow(2).neg(), dim=-1)


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """torchvision's `gaussian_blur(kernel_size, sigma)` with each sample's sigma; the border reflected."""
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    return _separable(images, gaussian_kernels(sigma, kernel_size), "reflect")


def _box_radius(radius: Tensor, passes: int = 3) -> tuple[Tensor, Tensor]:
    """Pillow's `_gaussian_blur_radius`: the whole part `l` and the fraction `a` of the box whose `passes`-fold
    repetition has the variance of a Gaussian of standard deviation `radius`."""
    sigma2 = radius.float() ** 2 / passes
    whole = torch.floor((torch.sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)
    fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2) / (6 * (sigma2 - (whole + 1) ** 2))
    return whole, fraction


def pil_kernels(radius: Tensor, max_radius: float) -> Tensor:
    """(B, K): the extended box of PIL's `GaussianBlur(radius)` for each sample (weight 1 within `l` of the centre,
    `a` at `l + 1`, normalised), K fixed by `max_radius`; PIL blurs with it three times along each axis."""
    whole, fraction = _box_radius(radius)
    half = math.floor((math.sqrt(4.0 * max_radius**2 + 1.0) - 1.0) / 2.0) + 1  # l at max_radius (12 r^2 / 3), + 1
    x = torch.arange(-half, half + 1, device=radius.device, dtype=torch.float32).abs()
    w, a = whole.view(-1, 1), fraction.view(-1, 1)
    return torch.where(x <= w, 1.0, torch.where(x == w + 1, a, 0.0)) / (2 * (w + a) + 1)


def pil_gaussian_blur(images: Tensor, radius: Tensor, max_radius: float = BLUR_SIGMA[1]) -> Tensor:
    """PIL's `ImageFilter.GaussianBlur(radius)` with each sample's radius (at most `max_radius`): three passes of
    the box `pil_kernels` along the rows and three along the columns, each repeating the edge pixels, as PIL's."""
    return _separable(images, pil_kernels(radius, max_radius), "replicate", passes=3)


class PhotometricParams(NamedTuple):
    """The random parameters of a batch, one row per sample (torchvision's names)."""

    jitter: Tensor  # bool: ColorJitter applied (RandomApply p = jitter_p)
    factors: Tensor  # (N, 4) brightness, contrast, saturation, hue; identity (1, 1, 1, 0) where an op is off
    order: Tensor  # (N, 4) int64: ColorJitter's fn_idx, the ops' order (0 brightness ... 3 hue)
    grayscale: Tensor  # bool
    blur: Tensor  # bool
    sigma: Tensor  # blur sigma (kernel) or radius (PIL)
    solarize: Tensor  # bool

    def rows(self, first: int, count: int) -> PhotometricParams:
        """Rows `first`..`first + count - 1`."""
        return PhotometricParams(*(t[first : first + count] for t in self))


class Photometric(nn.Module):
    """The photometric part of a `ViewSpec` view and normalisation, batched (a `framework.types.DeviceStep`):
    RandomApply(ColorJitter, jitter_p) in a random order per sample, RandomGrayscale(grayscale_p), Gaussian blur
    (torchvision's with `blur_kernel_size(size)` or PIL's) with blur_p, solarisation (threshold 128) with
    solarize_p, then `(x - mean) / std`. Computed in float32 (also under autocast); returns float32."""

    def __init__(self, spec: ViewSpec, size: int, mean: Sequence[float], std: Sequence[float], channels: int) -> None:
        super().__init__()
        check_stats(mean, std, channels)
        colour = channels == 3
        b, c, s, h = spec.jitter
        s, h = (s, h) if colour else (0.0, 0.0)  # as simclr_view: meaningless on grey images
        self.ranges = ((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h))
        self.hue = colour and h > 0
        self.jitter_p = spec.jitter_p
        self.grayscale_p = spec.grayscale_p if colour else 0.0
        self.blur, self.blur_p, self.solarize_p = spec.blur, spec.blur_p, spec.solarize_p
        self.kernel_size = blur_kernel_size(size)
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))

    def extra_repr(self) -> str:
        return (
            f"ranges={self.ranges}, jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p}, blur={self.blur!r}, "
            f"blur_p={self.blur_p}, kernel_size={self.kernel_size}, solarize_p={self.solarize_p}"
        )

    @torch.compiler.disable
    def sample(self, generator: torch.Generator, total: int) -> PhotometricParams:
        """Every random parameter of a global batch of `total` samples, one draw of uniforms from `generator`:
        apply flags `u < p` (torchvision's RandomApply), factors uniform in their ranges, the order a uniform
        random permutation (argsort of 4 uniforms), sigma uniform in `BLUR_SIGMA`."""
        u = torch.rand(total, 13, generator=generator, device=generator.device)
        jitter = u[:, 0] < self.jitter_p
        identity = (1.0, 1.0, 1.0, 0.0)  # Python numbers, not tensors: no host-to-device copy
        factors = torch.stack(
            [torch.where(jitter, lo + (hi - lo) * u[:, 1 + i], identity[i]) for i, (lo, hi) in enumerate(self.ranges)],
            dim=1,
        )
        sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 11]
        return PhotometricParams(
            jitter=jitter,
            factors=factors,
            order=u[:, 5:9].argsort(dim=1),
            grayscale=u[:, 9] < self.grayscale_p,
            blur=u[:, 10] < (self.blur_p if self.blur != "none" else 0.0),
            sigma=sigma,
            solarize=u[:, 12] < self.solarize_p,
        )

    def color_jitter(self, images: Tensor, params: PhotometricParams) -> Tensor:
        """ColorJitter with each sample's factors in its own order (`params.order`): brightness, contrast and
        saturation are blends, so the three are applied in order as masked blend slots before and after the hue
        shift, which is computed once (6 cheap slots + 1 hue, not 4 slots of all four ops)."""
        position = params.order.argsort(dim=1)  # position of op j in the sample's order
        blend_order = position[:, :3].argsort(dim=1)  # the blend ops, in the sample's order
        before_hue = position[:, :3].gather(1, blend_order) < position[:, 3:]
        if not self.hue:
            before_hue = torch.ones_like(before_hue)  # one phase: the blends in the sample's order
        x = images
        for phase in (True, False) if self.hue else (True,):
            for slot in range(3):
                op = blend_order[:, slot]
                factor = torch.where(
                    before_hue[:, slot] == phase, params.factors.gather(1, op.unsqueeze(1)).squeeze(1), 1.0
                )
                grey = luminance(x)
                mean = grey.mean(dim=(-3, -2, -1), keepdim=True)
                other = torch.where(_rows(op == 0), 0.0, torch.where(_rows(op == 1), mean, grey))
                x = _blend(x, other, factor)  # factor 1: x exactly
            if phase and self.hue:
                x = torch.where(_rows(params.jitter), adjust_hue(x, params.factors[:, 3]), x)
        return x

    def augment(self, images: Tensor, params: PhotometricParams) -> Tensor:
        """The view's photometric steps on float images in [0, 1] with the given parameters (one row each)."""
        x = self.color_jitter(images, params)
        if self.grayscale_p:
            x = torch.where(_rows(params.grayscale), rgb_to_grayscale(x), x)
        if self.blur == "kernel" and self.blur_p:
            x = torch.where(_rows(params.blur), gaussian_blur(x, params.sigma, self.kernel_size), x)
        elif self.blur == "pil" and self.blur_p:
            x = torch.where(_rows(params.blur), pil_gaussian_blur(x, params.sigma), x)
        if self.solarize_p:
            x = torch.where(_rows(params.solarize), solarize(x), x)
        return x

    def forward(self, images: Tensor, generator: torch.Generator, first: int, total: int) -> Tensor:
        """Rows `first`..`first + B - 1` of a global batch of `total` uint8 images (B, C, H, W), augmented with
        the parameters `sample` draws for all `total` rows and normalised (float32)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"Photometric expects uint8 images, got {images.dtype}")
        if not 0 <= first <= first + images.shape[0] <= total:
            raise ValueError(f"rows {first}..{first + images.shape[0] - 1} are not in a batch of {total}")
        params = PhotometricParams(*(t.to(images.device) for t in self.sample(generator, total)))
        with torch.autocast(images.device.type, enabled=False):
            x = self.augment(images.float().div_(255), params.rows(first, images.shape[0]))
            return normalize(x, self.mean, self.std)
