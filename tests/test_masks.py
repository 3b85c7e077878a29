"""Tests for the per-sample patch masks of iBOT / DINOv2 (plugins/blocks/masks.py): BEiT's block masks, `PatchMasks`,
the masked view in the data workers and through the data pipeline."""

from __future__ import annotations

import pickle
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from framework.data import make_loader, write_shards
from framework.testing import data_section
from framework.types import View
from framework.views import CIFAR10_STATS, FASHION_MNIST_STATS, clean_view
from plugins.blocks import (
    BLOCK_ASPECT,
    MaskedView,
    PatchMasks,
    block_mask,
    masked_view,
    patch_mask,
    simclr_split_view,
)
from tests.helpers import asset_samples

GRID = 14  # a ViT-S/16 on 224 px, iBOT's and DINOv2's setting
ASKED = [int(r * GRID * GRID) for r in (0.1, 0.2, 0.3, 0.4, 0.5)]  # 19, 39, 58, 78, 98
RGB32 = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8), mode="RGB")


def _mask(seed: int, num_masked: int, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)
    return block_mask(GRID, GRID, num_masked, **kwargs)


# ---------------------------------------------------------------- block_mask


@pytest.mark.parametrize("num_masked", ASKED)
def test_block_mask_never_masks_more_than_asked_and_mostly_exactly_that(num_masked):
    """BEiT's algorithm keeps a block only if it adds no more than remain, so it never overshoots; it stops short
    when the last few patches find no block in 10 attempts: 1 to 3 patches, in about 6 to 10 masks of 100
    (2000 draws: 5.9 % short, at most 3), as BEiT's, iBOT's and DINOv2's generators."""
    counts = [int(_mask(seed, num_masked).sum()) for seed in range(100)]
    assert max(counts) <= num_masked
    assert sum(c == num_masked for c in counts) >= 80, "the common case is exact"
    assert min(counts) >= num_masked - 4


def test_block_mask_is_a_bool_grid_of_its_shape_and_zero_asks_for_nothing():
    torch.manual_seed(0)
    mask = block_mask(7, 5, 12)
    assert mask.dtype == torch.bool and mask.shape == (7, 5) and int(mask.sum()) <= 12
    assert not block_mask(GRID, GRID, 0).any()


@pytest.mark.parametrize(("num_masked", "aspect", "shape"), [(9, 1.0, (3, 3)), (12, 3.0, (6, 2)), (12, 1 / 3, (2, 6))])
def test_a_single_block_is_a_rectangle_of_the_drawn_shape_anywhere_on_the_grid(num_masked, aspect, shape):
    """With `min_patches` equal to the number asked and one aspect, the area and the aspect are fixed: the mask is
    one block, the rectangle sqrt(area * aspect) x sqrt(area / aspect), at a uniform position (edges included)."""
    tops, lefts = set(), set()
    for seed in range(300):
        mask = _mask(seed, num_masked, min_patches=num_masked, aspect=(aspect, aspect))
        rows, cols = mask.any(1).nonzero().flatten().tolist(), mask.any(0).nonzero().flatten().tolist()
        assert (len(rows), len(cols)) == shape and int(mask.sum()) == num_masked
        assert mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
        tops.add(rows[0])
        lefts.add(cols[0])
    assert tops == set(range(GRID - shape[0] + 1)) and lefts == set(range(GRID - shape[1] + 1))


def test_block_mask_blocks_are_rectangles_of_at_least_two_rows_and_columns_mostly():
    """Every masked patch has a masked neighbour (blocks of >= 4 patches at aspect <= 3.3 are at least 2 x 2)."""
    mask = _mask(1, 58)
    padded = torch.nn.functional.pad(mask.float()[None, None], (1, 1, 1, 1))[0, 0]
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    assert (neighbours[mask] > 0).all()


def test_block_mask_is_fixed_by_the_seed_of_torchs_global_rng():
    assert torch.equal(_mask(3, 58), _mask(3, 58))
    assert len({tuple(_mask(seed, 58).flatten().tolist()) for seed in range(20)}) == 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 4, 1), "grid of at least 1 x 1"),
        ((4, 4, 17), "num_masked must be in 0..16"),
        ((4, 4, -1), "num_masked must be in 0..16"),
        ((4, 4, 3, 0), "min_patches and max_attempts must be >= 1"),
        ((4, 4, 3, 4, (2.0, 1.0)), "aspect must be"),
    ],
)
def test_block_mask_refuses_bad_arguments_in_one_line(args, message):
    with pytest.raises(ValueError, match=message) as err:
        block_mask(*args)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- PatchMasks and MaskedView


def _masks(spec: PatchMasks, count: int, grid: int = GRID) -> torch.Tensor:
    """`count` masks (count, grid * grid) of a MaskedView, each sample seeded as the pipeline seeds it."""
    view = MaskedView(torch.zeros_like, grid, spec)
    out = []
    for seed in range(count):
        torch.manual_seed(seed)
        out.append(view(torch.zeros(1))[1])
    return torch.stack(out)


def test_patch_masks_defaults_are_dinov2s():
    spec = PatchMasks()
    assert (spec.probability, spec.ratio, spec.min_patches) == (0.5, (0.1, 0.5), 4)
    assert BLOCK_ASPECT == (0.3, 1 / 0.3)


def test_probability_zero_masks_no_image_and_one_masks_every_image():
    assert not _masks(PatchMasks(probability=0.0), 50).any()
    every = _masks(PatchMasks(probability=1.0), 50)
    assert (every.sum(1) > 0).all()


def test_the_masked_share_and_the_masked_images_are_about_what_the_spec_says():
    """Over 400 images: about half masked (probability 0.5), and the masked ones' share of patches about the
    mean of `ratio` (0.3; a little lower: ratio * N is rounded down and a mask can end a patch or two short)."""
    masks = _masks(PatchMasks(), 400)
    masked = masks.sum(1) > 0
    assert 0.42 < masked.float().mean() < 0.58
    share = masks[masked].mean(1)
    assert 0.27 < share.mean() < 0.31
    assert share.min() >= 0.08 and share.max() < 0.5
    assert set(masks.unique().tolist()) == {0.0, 1.0} and masks.dtype == torch.float32


def test_a_masked_view_returns_the_image_and_its_flattened_float_mask():
    view = MaskedView(torch.neg, 4, PatchMasks(probability=1.0))
    torch.manual_seed(0)
    image, mask = view(torch.ones(3, 32, 32))
    assert torch.equal(image, -torch.ones(3, 32, 32)) and mask.shape == (16,) and mask.dtype == torch.float32
    assert patch_mask(mask[None]).dtype == torch.bool and torch.equal(patch_mask(mask[None])[0], mask == 1)


def test_the_mask_is_the_same_whether_the_view_runs_whole_or_split_for_the_device():
    """The workers run `transform` whole (augmentation in the workers) or only `on_device.worker` (crop and
    flip): they draw a different number of random values, after the mask, which therefore stays the sample's."""
    view = masked_view(simclr_split_view(32, *CIFAR10_STATS, 3, "cifar"), 4, PatchMasks(probability=0.7))
    assert isinstance(view.transform, MaskedView) and isinstance(view.on_device.worker, MaskedView)
    masks = []
    for seed in range(20):
        torch.manual_seed(seed)
        whole, mask = view.transform(RGB32)
        after_whole = torch.rand(())
        torch.manual_seed(seed)
        part, same = view.on_device.worker(RGB32)
        assert torch.equal(mask, same) and mask.shape == (16,)
        assert whole.dtype == torch.float32 and part.dtype == torch.uint8 and part.shape == whole.shape == (3, 32, 32)
        assert not torch.equal(after_whole, torch.rand(())), "the two parts draw different numbers after the mask"
        masks.append(mask)
    assert len({tuple(m.tolist()) for m in masks}) > 10


def test_masked_view_keeps_the_device_step_and_refuses_a_derived_view():
    split = simclr_split_view(32, *CIFAR10_STATS, 3, "cifar")
    view = masked_view(split, 4, PatchMasks())
    assert view.on_device.batch is split.on_device.batch and view.source is None
    assert view.transform.inner is split.transform and view.on_device.worker.inner is split.on_device.worker
    whole = masked_view(View(split.transform), 4, PatchMasks())
    assert whole.on_device is None and isinstance(whole.transform, MaskedView)
    with pytest.raises(ValueError, match="derived from 'x'") as err:
        masked_view(View(torch.neg, source="x"), 4, PatchMasks())
    assert "\n" not in str(err.value)


def test_a_transform_that_returns_params_cannot_be_masked():
    view = MaskedView(lambda image: (image, torch.zeros(2)), 4, PatchMasks())
    with pytest.raises(TypeError, match="must return an image only") as err:
        view(torch.zeros(1))
    assert "\n" not in str(err.value)


def test_a_masked_view_pickles_and_draws_the_same_masks_after():
    view = masked_view(simclr_split_view(32, *CIFAR10_STATS, 3, "cifar"), 4, PatchMasks(probability=1.0))
    for transform in (view.transform, view.on_device.worker):
        copy = pickle.loads(pickle.dumps(transform))
        assert type(copy.inner) is type(transform.inner) and copy.spec == transform.spec and copy.grid == 4
        torch.manual_seed(5)
        a = transform(RGB32)
        torch.manual_seed(5)
        b = copy(RGB32)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert repr(view.transform).startswith("MaskedView(") and "grid=4" in repr(view.transform)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"probability": 1.5}, "probability must be in [0, 1], got 1.5"),
        ({"probability": -0.1}, "probability must be in [0, 1], got -0.1"),
        ({"ratio": (0.5, 0.1)}, "ratio must be (low, high) with 0 <= low <= high < 1, got [0.5, 0.1]"),
        ({"ratio": (0.1, 1.0)}, "ratio must be (low, high) with 0 <= low <= high < 1, got [0.1, 1.0]"),
        ({"min_patches": 0}, "min_patches must be >= 1, got 0"),
        ({"probability": float("nan")}, ""),
        ({"ratios": (0.1, 0.5)}, ""),
    ],
)
def test_bad_patch_masks_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValidationError) as err:
        PatchMasks(**fields)
    (error,) = err.value.errors()
    assert error["loc"][0] == next(iter(fields)) and message in error["msg"] and "\n" not in error["msg"]


def test_a_grid_below_one_patch_is_refused():
    with pytest.raises(ValueError, match="grid must be >= 1"):
        MaskedView(torch.neg, 0, PatchMasks())


# ---------------------------------------------------------------- through the data pipeline


@pytest.mark.parametrize("augment_on_device", [False, True])
def test_the_pipeline_batches_a_masked_views_masks_as_its_params(tmp_path, augment_on_device):
    """Through `make_loader` (the workers' seeding, `SampleToViews`, collate): the view's params are the batch's
    (B, N) masks, the same whether its photometric steps run in the workers or are left for the device; the
    images cross processes as uint8 either way (the masked view's normalisation is deferred to the device)."""
    samples = list(islice(asset_samples("test"), 16))
    info = write_shards(samples, str(tmp_path / "m-%02d.tar"), maxcount=8)
    views = {
        "x": View(clean_view(28, *FASHION_MNIST_STATS, channels=1)),
        "m": masked_view(simclr_split_view(28, *FASHION_MNIST_STATS, 1, "mnist"), 7, PatchMasks(probability=0.5)),
    }

    def masks(on_device: bool) -> torch.Tensor:
        section = data_section(info["pattern"], batch_size=8, num_workers=0, shardshuffle=False)
        batches = list(make_loader(section, views, seed=4, epochs=1, augment_on_device=on_device))
        assert [b["views"]["m"].dtype for b in batches] == [torch.uint8] * 2
        assert on_device or [b["normalize"]["m"] for b in batches] != [None, None]
        return torch.cat([b["params"]["m"] for b in batches])

    got = masks(augment_on_device)
    assert got.shape == (16, 49) and got.dtype == torch.float32
    masked = patch_mask(got)
    assert masked.dtype == torch.bool and 0 < masked.any(1).sum() < 16
    assert torch.equal(got, masks(not augment_on_device))
