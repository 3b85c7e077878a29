"""Per-sample block masks of image patches (iBOT, DINOv2), drawn in the data workers as part of a view.

* `block_mask`: BEiT's block-wise masking of a grid of patches (arXiv 2106.08254, Algorithm 1; iBOT and DINOv2
  use the same generator): random rectangles until the requested number of patches is masked.
* `PatchMasks`: how many images get a mask and how much of each (a plugin's section holds one).
* `MaskedView` / `masked_view`: a view whose transform also returns the image's flattened patch mask as its
  params, `(image, mask)`, so the pipeline batches the masks as `ctx.params[view]` (B, N); `patch_mask` reads them
  back as a bool (B, N) mask (True: masked).

Every random number comes from torch's global RNG, which the pipeline seeds per sample: a sample's mask is a
function of its seed alone, the same after a resume and in any number of processes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor

from framework import View, without_normalize

# BEiT's aspect range of a block (masking_generator.py: min_aspect 0.3, max_aspect 1 / min_aspect), iBOT's and
# DINOv2's default too.
BLOCK_ASPECT = (0.3, 1 / 0.3)


def block_mask(
    height: int,
    width: int,
    num_masked: int,
    min_patches: int = 4,
    aspect: tuple[float, float] = BLOCK_ASPECT,
    max_attempts: int = 10,
) -> Tensor:
    """A bool (height, width) mask of about `num_masked` patches in rectangular blocks (True: masked), BEiT's
    algorithm: while fewer than `num_masked` are masked, try up to `max_attempts` times to place a block of area
    uniform in [`min_patches`, remaining] (between the two when fewer than `min_patches` remain), aspect ratio
    log-uniform in `aspect`, rounded to whole patches, strictly smaller than the grid on each side, at a uniform
    position; a block is kept when it masks at least one new patch and no more than remain, and masks its cells
    that were not masked yet. The first attempt kept ends the round; a round without one ends the mask.

    So it never masks more than `num_masked`, but it can stop short of it when the last few patches find no
    block that fits (e.g. one patch left and every attempt's block covers two new ones), as BEiT's, iBOT's and
    DINOv2's do: on a 14 x 14 grid with 19..98 patches asked, 6 to 10 masks in 100 end 1 to 3 patches short
    (tests/test_masks.py). Each attempt draws 4 numbers from torch's global RNG (`torch.rand`), so a seed
    fixes the mask.
    """
    if height < 1 or width < 1:
        raise ValueError(f"block_mask needs a grid of at least 1 x 1 patches, got {height} x {width}")
    if not 0 <= num_masked <= height * width:
        raise ValueError(f"num_masked must be in 0..{height * width} for a {height} x {width} grid, got {num_masked}")
    if min_patches < 1 or max_attempts < 1:
        raise ValueError(f"min_patches and max_attempts must be >= 1, got {min_patches} and {max_attempts}")
    if not 0 < aspect[0] <= aspect[1]:
        raise ValueError(f"aspect must be (low, high) with 0 < low <= high, got {list(aspect)}")
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])
    mask = torch.zeros(height, width, dtype=torch.bool)
    count = 0
    while count < num_masked:
        remaining = num_masked - count
        added = 0
        for _ in range(max_attempts):
            u_area, u_aspect, u_top, u_left = torch.rand(4, dtype=torch.float64).tolist()
            area = min_patches + (remaining - min_patches) * u_area  # uniform between the two, whichever is larger
            ratio = math.exp(log_low + (log_high - log_low) * u_aspect)
            h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if not (h < height and w < width):
                continue
            top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))  # uniform in 0..height - h
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= remaining:
                block.fill_(True)  # a view of `mask`: its unmasked cells become masked
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


class PatchMasks(BaseModel):
    """Which images of a view get a block mask and how much of each: an image is masked with `probability`, its
    masked share of patches uniform in `ratio`, in blocks of at least `min_patches` (`block_mask`).

    DINOv2's collate masks exactly int(B * probability) images of each batch, their ratios spread over a linspace
    of `ratio` across the batch; here every image draws its own coin and ratio, so that a sample's mask is a
    function of its seed alone: a resumed run and any number of processes or workers draw the same masks. Over
    many images the share masked and the ratios have the same distribution as DINOv2's.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # as every recipe section's

    # DINOv2's dinov2/configs/ssl_default_config.yaml: ibot.mask_sample_probability 0.5.
    probability: float = 0.5
    # DINOv2's ssl_default_config.yaml: ibot.mask_ratio_min_max [0.1, 0.5]; iBOT's pred_ratio 0.3 with
    # pred_ratio_var 0.2 (its README's ViT runs) is the same range, 0.3 +- 0.2.
    ratio: tuple[float, float] = (0.1, 0.5)
    min_patches: int = 4  # BEiT's min_num_patches of DINOv2's MaskingGenerator

    @field_validator("probability")
    @classmethod
    def _probability(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError(f"probability must be in [0, 1], got {value}")
        return value

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] <= value[1] < 1:
            raise ValueError(f"ratio must be (low, high) with 0 <= low <= high < 1, got {list(value)}")
        return value

    @field_validator("min_patches")
    @classmethod
    def _min_patches(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"min_patches must be >= 1, got {value}")
        return value


class MaskedView:
    """A view's per-sample transform `inner` that also returns the image's patch mask: `(image, mask)`, `mask` the
    flattened (grid * grid,) `block_mask` of a `grid` x `grid` patch grid as float (1: masked), drawn by `spec`.

    The mask is drawn before `inner` runs, so it is the same whether the whole view runs in the data workers or
    only its geometry (`OnDevice.worker`, the photometric steps on the device): the two draw different numbers
    of random values after the crop, never before it.
    """

    def __init__(self, inner: Callable[[Any], Any], grid: int, spec: PatchMasks) -> None:
        if grid < 1:
            raise ValueError(f"grid must be >= 1 patches a side, got {grid}")
        self.inner, self.grid, self.spec = inner, grid, spec

    def draw(self) -> Tensor:
        """The next image's (grid, grid) bool mask, from torch's global RNG (2 numbers, then `block_mask`'s)."""
        coin, share = torch.rand(2, dtype=torch.float64).tolist()
        if coin >= self.spec.probability:
            return torch.zeros(self.grid, self.grid, dtype=torch.bool)
        low, high = self.spec.ratio
        # Rounded down, as DINOv2's int(N * ratio): below N for every ratio < 1, so a patch always stays visible.
        num_masked = int((low + (high - low) * share) * self.grid * self.grid)
        return block_mask(self.grid, self.grid, num_masked, self.spec.min_patches)

    def __call__(self, image: Any) -> tuple[Tensor, Tensor]:
        mask = self.draw()
        out = self.inner(image)
        if isinstance(out, tuple):
            raise TypeError(f"a masked view's transform must return an image only, {self.inner!r} returned a tuple")
        return out, mask.flatten().float()

    def without_normalize(self) -> tuple[MaskedView, Any] | None:
        """This view without its inner transform's last step, `Normalize`, and that step (None if the inner
        transform does not end in one): the data pipeline then normalises the batch on the device, as it does
        an unmasked view's (uint8 crosses processes)."""
        split = without_normalize(self.inner)
        return None if split is None else (MaskedView(split[0], self.grid, self.spec), split[1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r}, grid={self.grid}, spec={self.spec!r})"


def masked_view(view: View, grid: int, spec: PatchMasks) -> View:
    """`view` with a patch mask drawn by `spec` on a `grid` x `grid` patch grid: its `transform` and, when it
    splits, its `on_device.worker` wrapped in `MaskedView` (its `on_device.batch` unchanged), so that
    `ctx.params[name]` is the batch's (B, grid * grid) masks (`patch_mask`). Only a view of the decoded image
    (`source` None) can be masked.

    With the augmentation in the workers (`data.augment_on`), the view runs there but its last step, `Normalize`,
    is deferred to the device as an unmasked view's (`MaskedView.without_normalize`): uint8 crosses processes."""
    if view.source is not None:
        raise ValueError(f"only a view of the decoded image can be masked, not one derived from {view.source!r}")
    on_device = view.on_device
    if on_device is not None:
        on_device = dataclasses.replace(on_device, worker=MaskedView(on_device.worker, grid, spec))
    return dataclasses.replace(view, transform=MaskedView(view.transform, grid, spec), on_device=on_device)


def patch_mask(params: Tensor) -> Tensor:
    """A masked view's batched params (`ctx.params[name]`, float (B, N)) as the bool (B, N) mask, True: masked."""
    return params > 0.5
