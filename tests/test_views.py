"""Tests for the clean view (framework/views.py) and the methods' augmentations (plugins/blocks/augmentations.py)."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from framework import Encoding
from framework.recipe.loading import RecipeError
from framework.startup import validate
from framework.testing import step_context, tiny_recipe
from framework.views import CIFAR10_STATS, FASHION_MNIST_STATS, STL10_STATS, ToMode, clean_view
from plugins.blocks import (
    AFFINE_COMPONENTS,
    CRVAE_PRESETS,
    LOCAL_SCALE,
    AffineParams,
    AffineWithParams,
    PILGaussianBlur,
    crvae_affine_view,
    simclr_view,
    two_views,
)
from tests.helpers import asset_samples

IDENTITY_VEC = torch.tensor([0, 0, 0, 1, 0, 0], dtype=torch.float32)


def _pil(size: int, mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


GREY28, RGB32, RGB96 = _pil(28, "L"), _pil(32, "RGB"), _pil(96, "RGB")

# (image, size, channels, stats, kwargs) for each dataset-like case.
CASES = {
    "fmnist": (GREY28, 28, 1, FASHION_MNIST_STATS),
    "cifar": (RGB32, 32, 3, CIFAR10_STATS),
    "stl": (RGB96, 96, 3, STL10_STATS),
}


def _check_normalised(out: torch.Tensor, size: int, stats) -> None:
    mean, std = stats
    assert isinstance(out, torch.Tensor) and type(out) is torch.Tensor
    assert out.dtype == torch.float32 and out.shape == (len(mean), size, size)
    lo = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(-1, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(mean, std, strict=True)]).view(-1, 1, 1)
    assert (out >= lo - 1e-5).all() and (out <= hi + 1e-5).all()


def _all_views():
    m, s = CIFAR10_STATS
    return [
        clean_view(32, m, s, 3),
        simclr_view(32, m, s, 3, "cifar"),
        simclr_view(96, *STL10_STATS, 3, "stl"),
        simclr_view(28, *FASHION_MNIST_STATS, 1, "mnist"),
        crvae_affine_view(32, m, s, 3, "large", vertical_flip=True, color_jitter=True),
    ]


def _image_for(view) -> Image.Image:
    size = next(t.size[0] for t in view.transforms if hasattr(t, "size"))
    return {28: GREY28, 32: RGB32, 96: RGB96}[size]


# ---------------------------------------------------------------- base views


@pytest.mark.parametrize("case", list(CASES))
def test_clean_view_is_exact_normalisation(case):
    img, size, channels, (mean, std) = CASES[case]
    out = clean_view(size, mean, std, channels)(img)
    _check_normalised(out, size, (mean, std))
    raw = torch.from_numpy(np.array(img)).float().div(255).reshape(size, size, -1).permute(2, 0, 1)
    ref = (raw - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    torch.testing.assert_close(out, ref)


def test_clean_view_resize_crop_and_channel_forcing():
    out = clean_view(64, *STL10_STATS, 3, resize=72)(RGB96)
    _check_normalised(out, 64, STL10_STATS)
    _check_normalised(clean_view(32, *FASHION_MNIST_STATS, 1)(RGB32), 32, FASHION_MNIST_STATS)
    _check_normalised(clean_view(28, *CIFAR10_STATS, 3)(GREY28), 28, CIFAR10_STATS)


@pytest.mark.parametrize("strength", ["cifar", "stl", "mnist", "solo_symmetric", "solo_asymmetric"])
@pytest.mark.parametrize("case", list(CASES))
def test_simclr_view_shapes(case, strength):
    img, size, channels, stats = CASES[case]
    for second in (False, True):
        view = simclr_view(size, *stats, channels, strength, second=second)
        for _ in range(5):
            _check_normalised(view(img), size, stats)


def test_simclr_view_structure():
    def flat(view):
        out = []
        for t in view.transforms:
            out += list(t.transforms) if isinstance(t, v2.RandomApply) else [t]
        return out

    stl = flat(simclr_view(96, *STL10_STATS, 3, "stl"))
    (blur,) = [t for t in stl if isinstance(t, v2.GaussianBlur)]
    assert tuple(blur.kernel_size) == (9, 9)
    (crop,) = [t for t in stl if isinstance(t, v2.RandomResizedCrop)]
    assert tuple(crop.scale) == (0.08, 1.0)
    (jit,) = [t for t in stl if isinstance(t, v2.ColorJitter)]
    assert jit.brightness == pytest.approx((0.2, 1.8)) and jit.hue == pytest.approx((-0.2, 0.2))
    assert any(isinstance(t, v2.RandomGrayscale) for t in stl)

    cifar = flat(simclr_view(32, *CIFAR10_STATS, 3, "cifar"))
    assert not any(isinstance(t, v2.GaussianBlur) for t in cifar)
    (jit,) = [t for t in cifar if isinstance(t, v2.ColorJitter)]
    assert jit.saturation == pytest.approx((0.6, 1.4)) and jit.hue == pytest.approx((-0.1, 0.1))

    for strength in ("cifar", "mnist"):  # grey: no saturation, hue or grayscale
        grey = flat(simclr_view(28, *FASHION_MNIST_STATS, 1, strength))
        assert not any(isinstance(t, v2.RandomGrayscale) for t in grey)
        (jit,) = [t for t in grey if isinstance(t, v2.ColorJitter)]
        assert jit.saturation is None and jit.hue is None
    (crop,) = [
        t for t in flat(simclr_view(28, *FASHION_MNIST_STATS, 1, "mnist")) if isinstance(t, v2.RandomResizedCrop)
    ]
    assert tuple(crop.scale) == (0.2, 1.0)


def test_solo_learn_presets_are_its_cifar_augmentations():
    """solo-learn scripts/pretrain/cifar/augmentations/{symmetric,asymmetric}.yaml, with the steps of its
    solo/data/pretrain_dataloader.py: bicubic RandomResizedCrop 0.08-1, jitter p 0.8, grayscale p 0.2, PIL blur,
    solarisation, hflip p 0.5."""

    def steps(view):
        out = {}
        for t in view.transforms:
            inner = t.transforms[0] if isinstance(t, v2.RandomApply) else t
            out[type(inner)] = (inner, t.p if isinstance(t, v2.RandomApply) else getattr(t, "p", None))
        return out

    for second in (False, True):
        sym = steps(simclr_view(32, *CIFAR10_STATS, 3, "solo_symmetric", second=second))
        jitter, p = sym[v2.ColorJitter]
        assert p == 0.8 and jitter.saturation == pytest.approx((0.2, 1.8)) and jitter.hue == pytest.approx((-0.2, 0.2))
        assert sym[PILGaussianBlur][0].sigma == (0.1, 2.0) and sym[PILGaussianBlur][1] == 0.5
        crop = sym[v2.RandomResizedCrop][0]
        assert tuple(crop.scale) == (0.08, 1.0) and InterpolationMode(crop.interpolation) == InterpolationMode.BICUBIC
        assert sym[v2.RandomGrayscale][1] == 0.2 and sym[v2.RandomHorizontalFlip][1] == 0.5
        assert v2.RandomSolarize not in sym and v2.GaussianBlur not in sym

        asym = steps(simclr_view(32, *CIFAR10_STATS, 3, "solo_asymmetric", second=second))
        jitter, p = asym[v2.ColorJitter]
        assert (
            p == 0.8
            and jitter.brightness == pytest.approx((0.6, 1.4))
            and jitter.saturation == pytest.approx((0.8, 1.2))
        )
        assert jitter.hue == pytest.approx((-0.1, 0.1)) and PILGaussianBlur not in asym
        if second:  # solarisation on the second view only
            solarize, p = asym[v2.RandomSolarize]
            assert p == 0.2 and solarize.threshold == 128
        else:
            assert v2.RandomSolarize not in asym


def test_pil_blur_draws_its_radius_from_torch():
    torch.manual_seed(3)
    radius = 0.1 + 1.9 * torch.rand(()).item()
    torch.manual_seed(3)
    out = PILGaussianBlur((0.1, 2.0))(RGB32)
    assert np.array_equal(np.array(out), np.array(RGB32.filter(ImageFilter.GaussianBlur(radius=radius))))


@pytest.mark.parametrize("preset", ["simple", "large"])
@pytest.mark.parametrize("case", list(CASES))
def test_crvae_view_shapes(case, preset):
    img, size, channels, stats = CASES[case]
    for flip, jitter in [(False, False), (True, True)]:
        view = crvae_affine_view(size, *stats, channels, preset, vertical_flip=flip, color_jitter=jitter)
        for _ in range(3):
            _check_normalised(view(img), size, stats)


def test_crvae_options_are_the_authors_variants():
    """sinhasam/CRVAE CRVAE/augmentations.py: RandomVerticalFlip() first, RandomAffine, then
    ColorJitter(brightness=0.2, hue=0.2, contrast=0.5) always applied; no horizontal flip."""
    ops = list(crvae_affine_view(32, *CIFAR10_STATS, 3, "simple", vertical_flip=True, color_jitter=True).transforms)
    kinds = [type(t) for t in ops[:4]]
    assert kinds == [ToMode, v2.RandomVerticalFlip, v2.RandomAffine, v2.ColorJitter]
    assert ops[1].p == 0.5 and InterpolationMode(ops[2].interpolation) == InterpolationMode.NEAREST
    jitter = ops[3]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.8, 1.2),
        (0.5, 1.5),
        None,
        (-0.2, 0.2),
    )
    assert not any(isinstance(t, (v2.RandomApply, v2.RandomHorizontalFlip)) for t in ops)
    plain = crvae_affine_view(32, *CIFAR10_STATS, 3, "simple").transforms
    assert not any(isinstance(t, (v2.RandomVerticalFlip, v2.ColorJitter)) for t in plain)


@pytest.mark.parametrize("preset", ["simple", "large"])
def test_crvae_presets_within_range(preset):
    limits = {"simple": (15, 0.05, (0.9, 1.1)), "large": (30, 0.1, (0.75, 1.25))}[preset]
    max_deg, max_t, (lo, hi) = limits
    assert CRVAE_PRESETS[preset]["degrees"] == (-max_deg, max_deg)
    view = crvae_affine_view(32, *CIFAR10_STATS, 3, preset)
    (affine,) = [t for t in view.transforms if isinstance(t, v2.RandomAffine)]
    assert list(affine.degrees) == [-max_deg, max_deg]
    assert tuple(affine.translate) == (max_t, max_t) and tuple(affine.scale) == (lo, hi)
    assert affine.shear is None and affine.fill == 0
    torch.manual_seed(0)
    ps = [affine.make_params([RGB32]) for _ in range(500)]
    angles = torch.tensor([p["angle"] for p in ps])
    scales = torch.tensor([p["scale"] for p in ps])
    shifts = torch.tensor([p["translate"] for p in ps]).float()
    assert angles.abs().max() <= max_deg and angles.abs().max() > 0.9 * max_deg
    assert scales.min() >= lo and scales.max() <= hi
    assert shifts.abs().max() <= round(max_t * 32)
    assert all(p["shear"] == (0.0, 0.0) for p in ps)


# ---------------------------------------------------------------- picklability, seeds


@pytest.mark.parametrize("idx", range(5))
def test_base_views_pickle_and_reproduce(idx):
    view = _all_views()[idx]
    img = _image_for(view)
    clone = pickle.loads(pickle.dumps(view))
    torch.manual_seed(123)
    a = view(img)
    torch.manual_seed(123)
    b = clone(img)
    torch.manual_seed(123)
    c = view(img)
    assert torch.equal(a, b) and torch.equal(a, c)
    if idx > 0:  # random views differ across draws
        assert any(not torch.equal(a, view(img)) for _ in range(5))


def test_affine_pickle_and_reproduce():
    x = clean_view(32, *CIFAR10_STATS, 3)(RGB32)
    aff = AffineWithParams(*CIFAR10_STATS)
    clone = pickle.loads(pickle.dumps(aff))
    torch.manual_seed(7)
    a, pa = aff(x)
    torch.manual_seed(7)
    b, pb = clone(x)
    assert torch.equal(a, b) and torch.equal(pa, pb)
    c, pc = aff(x)
    assert not torch.equal(pa, pc)


# ---------------------------------------------------------------- AffineWithParams


def test_affine_planted_params_exact():
    mean, std = CIFAR10_STATS
    x = clean_view(32, mean, std, 3)(RGB32)
    aff = AffineWithParams(mean, std)
    planted = AffineParams(angle=30.0, translate_x=3.5, translate_y=-2.0, scale=1.1, shear_x=10.0, shear_y=-5.0)
    out, vec = aff.apply(x, planted)
    expected_vec = torch.tensor([30 / 360, 3.5 / 32, -2.0 / 32, 1.1, 10 / 25, -5 / 25], dtype=torch.float32)
    assert vec.dtype == torch.float32 and vec.shape == (6,)
    assert torch.equal(vec, expected_vec)
    black = [-m / s for m, s in zip(mean, std, strict=True)]
    ref = F.affine(
        x,
        angle=30.0,
        translate=[3.5, -2.0],
        scale=1.1,
        shear=[10.0, -5.0],
        interpolation=InterpolationMode.NEAREST,  # the paper's code: torchvision's RandomAffine default
        fill=black,
    )
    assert out.shape == x.shape and torch.equal(out, ref)
    # a plain 6-sequence is accepted too
    out2, vec2 = aff.apply(x, tuple(planted))
    assert torch.equal(out2, out) and torch.equal(vec2, vec)


@pytest.mark.parametrize("case", ["fmnist", "cifar"])
def test_affine_fill_is_black_in_pixel_space(case):
    img, size, channels, (mean, std) = CASES[case]
    x = clean_view(size, mean, std, channels)(img)
    out, _ = AffineWithParams(mean, std).apply(x, AffineParams(translate_x=size / 2))
    unnorm = out * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    torch.testing.assert_close(unnorm[:, :, : size // 2 - 1], torch.zeros(channels, size, size // 2 - 1))
    assert unnorm[:, :, size // 2 + 1 :].abs().sum() > 0


def test_affine_all_off_is_identity():
    x = clean_view(32, *CIFAR10_STATS, 3)(RGB32)
    aff = AffineWithParams(*CIFAR10_STATS, components=())
    for _ in range(3):
        out, vec = aff(x)
        assert torch.equal(out, x) and out is not x
        assert torch.equal(vec, IDENTITY_VEC)
    out, vec = AffineWithParams(*CIFAR10_STATS).apply(x, AffineParams())
    assert torch.equal(out, x) and torch.equal(vec, IDENTITY_VEC)


@pytest.mark.parametrize("component", AFFINE_COMPONENTS)
def test_affine_single_component(component):
    x = clean_view(32, *CIFAR10_STATS, 3)(RGB32)
    aff = AffineWithParams(*CIFAR10_STATS, components=[component])
    slot = AFFINE_COMPONENTS.index(component)
    others = [i for i in range(6) if i != slot]
    vecs = torch.stack([aff(x)[1] for _ in range(50)])
    assert torch.equal(vecs[:, others], IDENTITY_VEC[others].expand(50, 5))
    moved = vecs[:, slot] != IDENTITY_VEC[slot]
    # a whole-pixel translation is 0 for draws within half a pixel of it (1 in 16 at 32 px), the others never
    assert moved.float().mean() > 0.8 if component.startswith("translate") else moved.all()


def test_affine_sampling_ranges_and_stream():
    aff = AffineWithParams(*CIFAR10_STATS)
    torch.manual_seed(0)
    raw = [aff.sample_params(32, 48) for _ in range(3000)]
    r = torch.tensor(raw, dtype=torch.float64)
    bounds = [(-90, 90), (-12, 12), (-8, 8), (0.7, 1.3), (-25, 25), (-25, 25)]  # tx: 25 % of 48
    for i, (lo, hi) in enumerate(bounds):
        assert r[:, i].min() >= lo and r[:, i].max() <= hi
        span = hi - lo
        assert r[:, i].min() < lo + 0.02 * span and r[:, i].max() > hi - 0.02 * span
    shifts = r[:, 1:3]
    assert torch.equal(shifts, shifts.round()) and len(shifts[:, 0].unique()) == 25  # whole pixels, -12..12
    vecs = torch.stack([p.normalized(32, 48) for p in raw])
    nb = [(-0.25, 0.25), (-0.25, 0.25), (-0.25, 0.25), (0.7, 1.3), (-1, 1), (-1, 1)]
    for i, (lo, hi) in enumerate(nb):
        assert vecs[:, i].min() >= lo - 1e-6 and vecs[:, i].max() <= hi + 1e-6
    # the RNG stream does not depend on the enabled components
    torch.manual_seed(0)
    sub = AffineWithParams(*CIFAR10_STATS, components=["scale"]).sample_params(32, 48)
    assert sub == AffineParams(scale=raw[0].scale)


def test_affine_shapes_grey_and_rgb():
    for case in ("fmnist", "cifar", "stl"):
        img, size, channels, stats = CASES[case]
        x = clean_view(size, *stats, channels)(img)
        out, vec = AffineWithParams(*stats)(x)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert vec.shape == (6,) and vec.dtype == torch.float32


def test_invalid_arguments():
    with pytest.raises(ValueError):
        clean_view(32, *CIFAR10_STATS, 1)
    with pytest.raises(ValueError):
        simclr_view(32, *CIFAR10_STATS, 3, "imagenet")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        crvae_affine_view(32, *CIFAR10_STATS, 3, "huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AffineWithParams(*CIFAR10_STATS, components=["rotation"])
    with pytest.raises(ValueError):
        clean_view(32, (0.5, 0.5), (0.5, 0.5), 2)


# ---------------------------------------------------------------- multi-crop (docs/methods.md#multi-crop)

BACKBONE = {"encoder": "conv28", "latent_dim": None}


def _steps(view) -> dict:
    """{step type: (step, its probability)} of a `simclr_view` Compose (RandomApply unwrapped)."""
    out = {}
    for t in view.transforms:
        inner = t.transforms[0] if isinstance(t, v2.RandomApply) else t
        out[type(inner)] = (inner, t.p if isinstance(t, v2.RandomApply) else getattr(t, "p", None))
    return out


def _crop_recipe(tmp_path, shards, plugin="simclr", **section):
    return tiny_recipe(tmp_path, shards, plugins={"backbones": BACKBONE, plugin: section})


def test_byol_asymmetric_preset_is_the_papers_table_6():
    """BYOL paper (arXiv 2006.07733) Table 6: blur p 1.0 / 0.1, solarisation p 0 / 0.2 on the first / second view
    (solo-learn's imagenet-100 asymmetric.yaml); the rest as solo_asymmetric (which has no blur: its CIFAR yaml)."""
    first, second = (_steps(simclr_view(32, *CIFAR10_STATS, 3, "byol_asymmetric", second=s)) for s in (False, True))
    assert first[PILGaussianBlur][1] == 1.0 and v2.RandomSolarize not in first
    assert second[PILGaussianBlur][1] == 0.1 and second[v2.RandomSolarize][1] == 0.2
    for view in (first, second):
        assert view[PILGaussianBlur][0].sigma == (0.1, 2.0) and view[v2.RandomGrayscale][1] == 0.2
        jitter, p = view[v2.ColorJitter]
        assert p == 0.8 and jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.hue == pytest.approx((-0.1, 0.1))
        crop = view[v2.RandomResizedCrop][0]
        assert tuple(crop.scale) == (0.08, 1.0) and InterpolationMode(crop.interpolation) == InterpolationMode.BICUBIC
    solo = _steps(simclr_view(32, *CIFAR10_STATS, 3, "solo_asymmetric"))
    assert PILGaussianBlur not in solo


def test_multi_crop_views_from_a_spec_on_real_images(tmp_path, fmnist_shards):
    crops = {"global": {"count": 4, "scale": [0.14, 1.0]}, "local": {"count": 3, "size": 16}}
    cfg, hooks = validate(_crop_recipe(tmp_path, fmnist_shards, crops=crops, strength="byol_asymmetric"))
    views = {k: v for k, v in hooks.augment(cfg).items() if k.startswith("simclr.")}
    assert list(views) == [f"simclr.v{i}" for i in range(1, 5)] + [f"simclr.l{i}" for i in range(1, 4)]
    images = [s.image for s in itertools.islice(asset_samples("train"), 5)]
    torch.manual_seed(0)
    for name, view in views.items():
        size = 28 if ".v" in name else 16  # the global size defaults to data.image_size
        out = torch.stack([view.transform(img) for img in images])
        assert out.shape == (5, 1, size, size) and out.dtype == torch.float32
        assert out.std() > 0.1  # real images, not blank crops
        steps = _steps(view.transform)
        crop = steps[v2.RandomResizedCrop][0]
        assert tuple(crop.size) == (size, size) and tuple(crop.scale) == ((0.14, 1.0) if ".v" in name else LOCAL_SCALE)
        second = name in ("simclr.v2", "simclr.v4")  # globals alternate the preset's two views; locals: the first
        assert steps[PILGaussianBlur][1] == (0.1 if second else 1.0)
        assert (v2.RandomSolarize in steps) == second
        assert view.on_device is not None  # and split: the geometry in the workers, the rest on the device
        split = view.on_device.batch(
            torch.stack([view.on_device.worker(img) for img in images]), torch.Generator(), 0, 5
        )
        assert split.shape == out.shape and split.dtype == out.dtype
    own = dict(global_={"count": 2, "size": 20}, local={"count": 1, "size": 12, "scale": [0.1, 0.3]})
    cfg, hooks = validate(
        _crop_recipe(tmp_path, fmnist_shards, crops={"global": own["global_"], "local": own["local"]})
    )
    views = hooks.augment(cfg)
    assert [views[f"simclr.{n}"].transform(images[0]).shape[-1] for n in ("v1", "v2", "l1")] == [20, 20, 12]
    assert tuple(_steps(views["simclr.l1"].transform)[v2.RandomResizedCrop][0].scale) == (0.1, 0.3)


def test_without_crops_the_views_are_todays_two(tmp_path, fmnist_shards):
    for plugin in ("simclr", "byol", "barlow"):
        cfg, hooks = validate(_crop_recipe(tmp_path, fmnist_shards, plugin=plugin), check_data=False)
        assert cfg.plugins[plugin].crops is None
        views = {k: v for k, v in hooks.augment(cfg).items() if k.startswith(plugin)}
        want = two_views(cfg, None)
        assert list(views) == [f"{plugin}.v1", f"{plugin}.v2"]
        assert [repr(v.transform) for v in views.values()] == [repr(v.transform) for v in want.values()]


@pytest.mark.parametrize(
    ("plugin", "crops", "message"),
    [
        ("simclr", {"global": {"count": 1}}, "at least two crops"),
        ("simclr", {"global": {"count": 0}, "local": {"count": 4, "size": 16}}, "at least one global crop"),
        ("byol", {"global": {"count": 2}, "local": {"count": 2}}, "local.size is required"),
        ("simclr", {"global": {"count": 2, "scale": [0.5, 0.2]}}, "scale must be"),
        ("simclr", {"global": {"count": 2}, "locals": {"count": 2}}, "locals"),
        ("barlow", {"global": {"count": 2}, "local": {"count": 2, "size": 16}}, "Barlow Twins is defined on one pair"),
        ("barlow", {"global": {"count": 3}}, "Barlow Twins is defined on one pair"),
    ],
)
def test_bad_crop_specs_are_refused_in_one_line(tmp_path, fmnist_shards, plugin, crops, message):
    with pytest.raises(RecipeError, match=message) as err:
        validate(_crop_recipe(tmp_path, fmnist_shards, plugin=plugin, crops=crops), check_data=False)
    assert f"plugins.{plugin}.crops" in str(err.value) and "\n" not in str(err.value)


def test_barlow_accepts_a_sized_pair(tmp_path, fmnist_shards):
    crops = {"global": {"count": 2, "size": 24, "scale": [0.2, 1.0]}}
    cfg, hooks = validate(_crop_recipe(tmp_path, fmnist_shards, plugin="barlow", crops=crops), check_data=False)
    views = {k: v for k, v in hooks.augment(cfg).items() if k.startswith("barlow.")}
    assert list(views) == ["barlow.v1", "barlow.v2"]
    assert _steps(views["barlow.v1"].transform)[v2.RandomResizedCrop][0].size == (24, 24)


class CountingEncoder:
    """An encoder whose output depends on the whole batch (like BatchNorm): h = x - mean over the batch."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> Encoding:
        self.calls.append(tuple(x.shape))
        flat = x.flatten(1)
        h = flat - flat.mean(0)
        return Encoding(h=h, mu=2 * h, logvar=None, z=h + 1)


def test_encode_grouped_concatenates_views_of_one_size_and_splits_them_back():
    g = torch.Generator().manual_seed(0)
    views = {n: torch.randn(4, 1, 6, 6, generator=g) for n in ("x", "v1", "v2", "v3")}
    views |= {n: torch.randn(4, 1, 3, 3, generator=g) for n in ("l1", "l2")}
    encoder = CountingEncoder()
    ctx = step_context(None, views, encode=encoder)
    order = ["v1", "l1", "v2", "l2", "v3"]
    got = ctx.encode_grouped(order)
    assert encoder.calls == [(12, 1, 6, 6), (8, 1, 3, 3)]  # once per distinct size, the views concatenated
    want_big = CountingEncoder()(torch.cat([views[n] for n in ("v1", "v2", "v3")]))
    want_small = CountingEncoder()(torch.cat([views[n] for n in ("l1", "l2")]))
    for name, encoding in zip(order, got, strict=True):
        want, i = (want_small, int(name[1]) - 1) if name[0] == "l" else (want_big, int(name[1]) - 1)
        for field in ("h", "mu", "z"):
            assert torch.equal(getattr(encoding, field), getattr(want, field)[4 * i : 4 * (i + 1)]), (name, field)
        assert encoding.logvar is None
    separate = CountingEncoder()(views["v1"]).h
    assert not torch.allclose(got[0].h, separate)  # grouping is not the same as one call per view
    assert all(a is b for a, b in zip(ctx.encode_grouped(order), got, strict=True)) and len(encoder.calls) == 2
    alone = ctx.encode("v2")  # `encode` is the view alone, whoever grouped it: results do not depend on call order
    assert encoder.calls[2:] == [(4, 1, 6, 6)] and not torch.equal(alone.h, got[2].h)
    later = step_context(None, views, encode=CountingEncoder())
    later.encode("v2")  # another plugin encoded v2 first: the group is the same
    assert all(torch.equal(a.h, b.h) for a, b in zip(later.encode_grouped(order), got, strict=True))
    assert ctx.encode_grouped(["v2"])[0] is alone and len(encoder.calls) == 3  # a group of one is `encode`'s
    single = step_context(None, views, encode=(one := CountingEncoder()))
    assert single.encode_grouped(["l1"])[0].h.shape == (4, 9) and one.calls == [(4, 1, 3, 3)]
    with pytest.raises(KeyError, match="no view 'v9'"):
        ctx.encode_grouped(["v1", "v9"])


def test_the_dino_preset_is_dinos_data_augmentation(tmp_path, fmnist_shards):
    """DINO's DataAugmentationDINO (main_dino.py): the global crops are byol_asymmetric's two views (blur p 1.0 /
    0.1, solarisation p 0 / 0.2) and every local crop the same jitter, grey and crop with blur p 0.5 and no
    solarisation; presets without a local view of their own keep their first view for the local crops."""
    from plugins.blocks import LOCAL_VIEWS, VIEW_PRESETS, view_spec

    assert VIEW_PRESETS["dino"] == VIEW_PRESETS["byol_asymmetric"]
    local = view_spec("dino", local=True)
    assert local == VIEW_PRESETS["byol_asymmetric"][0]._replace(blur_p=0.5) and local.solarize_p == 0
    assert view_spec("byol_asymmetric", local=True) == VIEW_PRESETS["byol_asymmetric"][0] and "dino" in LOCAL_VIEWS
    crops = {"global": {"count": 2}, "local": {"count": 2, "size": 16}}
    cfg, hooks = validate(_crop_recipe(tmp_path, fmnist_shards, crops=crops, strength="dino"))
    views = hooks.augment(cfg)
    steps = {name: _steps(views[f"simclr.{name}"].transform) for name in ("v1", "v2", "l1")}
    assert [steps[n][PILGaussianBlur][1] for n in ("v1", "v2", "l1")] == [1.0, 0.1, 0.5]
    assert v2.RandomSolarize in steps["v2"] and v2.RandomSolarize not in steps["l1"]
