"""The clean view, normalisation, and the building blocks of every plugin's views.

The engine knows one view: the clean image `x` (`clean_view`). Every augmentation belongs
to the plugin that uses it (the built-in ones are in `plugins/blocks/augmentations.py`) and is
built from the pieces here: `ToMode` first, `tensor_steps` last.

A view is a picklable callable applied per sample inside DataLoader workers, so a view is
a class instance (a torchvision ``v2.Compose`` of these pieces), never a lambda or
closure. Randomness comes from torch's RNG only: ``torch.manual_seed`` makes views
reproducible. A base view takes a PIL image and returns a normalised float32 tensor
(C, H, W); its last step, `Normalize`, is deferred by the streaming pipeline to the
training device (uint8 crosses processes).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

Stats = tuple[tuple[float, ...], tuple[float, ...]]

# Per-channel (mean, std) of each dataset's training images in [0, 1].
FASHION_MNIST_STATS: Stats = ((0.2860,), (0.3530,))
CIFAR10_STATS: Stats = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
STL10_STATS: Stats = ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))


class ToMode:
    """Convert a PIL image to mode "L" (channels=1) or "RGB" (channels=3)."""

    def __init__(self, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def check_stats(mean: Sequence[float], std: Sequence[float], channels: int) -> None:
    """ValueError unless `mean` and `std` have one value per channel."""
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} values, got {len(mean)}/{len(std)}")


@functools.lru_cache(maxsize=64)
def _per_channel(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Constants (C, 1, 1) on `device`, made once: a host-to-device copy per step would sync the stream."""
    return torch.tensor(values, dtype=dtype).view(-1, 1, 1).to(device)


def _stats(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    key = (images.device, images.dtype)
    return _per_channel(tuple(map(float, mean)), *key), _per_channel(tuple(map(float, std)), *key)


def normalize(images01: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Images (..., C, H, W) on the [0, 1] scale -> normalised `(x - mean) / std`, per channel."""
    m, s = _stats(images01, mean, std)
    return (images01 - m) / s


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised images (..., C, H, W) -> the [0, 1] scale `x * std + mean` (not clamped)."""
    m, s = _stats(images, mean, std)
    return images * s + m


class Normalize:
    """uint8 image tensor (..., C, H, W) -> float32 `(x / 255 - mean) / std`.

    The last step of every base view. The streaming pipeline runs everything before it in
    the data workers and applies it to the whole batch on the training device
    (`framework.data.pipeline.batch_to_device`): a uint8 batch crosses processes and the host-device
    link at a quarter of the float32 size, and the arithmetic runs where it is cheapest.
    Called directly, a view still returns the normalised float32 tensor.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"Normalize expects uint8 images, got {images.dtype}")
        return normalize(images.float().div_(255), self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={list(self.mean)}, std={list(self.std)})"


def without_normalize(transform: Any) -> tuple[Any, Normalize] | None:
    """`transform` without its last step, `Normalize`, and that step; None if it does not end in one. A
    `v2.Compose` ends in one when its last transform is; a wrapper of a transform (a masked view) says it by
    its `without_normalize()` method, returning the same pair or None."""
    if isinstance(transform, v2.Compose) and transform.transforms and isinstance(transform.transforms[-1], Normalize):
        return v2.Compose(transform.transforms[:-1]), transform.transforms[-1]
    method = getattr(transform, "without_normalize", None)
    return method() if callable(method) else None


def tensor_steps(mean: Sequence[float], std: Sequence[float]) -> list:
    """The last steps of every base view: PIL -> uint8 tensor (C, H, W) -> normalised float32
    (`Normalize`, which the pipeline defers to the training device)."""
    return [v2.ToImage(), v2.ToPureTensor(), Normalize(mean, std)]


def clean_view(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int,
    resize: int | None = None,
) -> v2.Compose:
    """The clean image `x`: optional Resize(resize), CenterCrop(size), normalise.

    Use ``resize`` for 96-px data; the centre crop is always applied (a no-op when the
    image already is ``size`` px) so the output is always (channels, size, size).
    """
    check_stats(mean, std, channels)
    ops: list = [ToMode(channels)]
    if resize is not None:
        ops.append(v2.Resize(resize))
    ops.append(v2.CenterCrop(size))
    return v2.Compose(ops + tensor_steps(mean, std))
