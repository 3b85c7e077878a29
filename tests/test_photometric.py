"""Tests for the photometric augmentation on the device (plugins/blocks/photometric.py): faithful to torchvision's
kernels and distributions, deterministic in the generator, the same rows in 1 or N processes, bf16 autocast,
channels_last, torch.compile, and the presets' split views."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from framework.views import CIFAR10_STATS, FASHION_MNIST_STATS, STL10_STATS
from plugins.blocks import (
    VIEW_PRESETS,
    Photometric,
    PILGaussianBlur,
    ViewSpec,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    pil_gaussian_blur,
    rgb_to_grayscale,
    simclr_split_view,
    simclr_view,
    solarize,
    view_spec,
)
from plugins.blocks.augmentations import CropFlip, _geometry
from plugins.blocks.photometric import BLUR_SIGMA

B = 6
# Largest |ours * 255 - torchvision's uint8 output| per op (0-255 units), the same uint8 input and factors. Ours
# stay in float; torchvision truncates each result to uint8 (< 1), and floors the grey level that contrast and
# saturation blend with (< 1 more). The blur rounds (0.5). PIL's blur runs six fixed-point box passes, each
# rounded to uint8 (a small radius's few-percent neighbour weights round away), up to 3 units off ours.
TOLERANCE = {"brightness": 1.0, "contrast": 2.0, "saturation": 2.0, "hue": 1.0, "grayscale": 1.0, "blur": 0.51}
PIL_TOLERANCE, PIL_MEAN_TOLERANCE = 3.0, 0.5
FLOAT_TOLERANCE = 1e-3  # against torchvision's float kernels on the same images: float rounding only
KS_ALPHA_COEFFICIENT = 1.949  # two-sample KS critical value at alpha = 0.001: c * sqrt((n + m) / (n * m))
DRAWS = 10_000


def _images(channels: int = 3, size: int = 40, seed: int = 0) -> torch.Tensor:
    """Smooth images plus noise, uint8 (B, C, size, size): edges, flat parts and saturated pixels."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(
        torch.rand(B, channels, 6, 6, generator=g), size=(size, size), mode="bilinear"
    )
    noise = torch.randn(B, channels, size, size, generator=g) * 25
    return (base * 300 - 20 + noise).clamp(0, 255).to(torch.uint8)


def _factors(lo: float, hi: float) -> torch.Tensor:
    return torch.linspace(lo, hi, B)


def _tv(op, images: torch.Tensor, factors: torch.Tensor, **kw) -> torch.Tensor:
    """torchvision's functional `op` on each uint8 image with its own factor."""
    return torch.stack([op(img, float(f), **kw) for img, f in zip(images, factors, strict=True)])


def _gap(ours01: torch.Tensor, theirs_uint8: torch.Tensor) -> torch.Tensor:
    return (ours01 * 255 - theirs_uint8.float()).abs()


OPS = {
    "brightness": (adjust_brightness, F.adjust_brightness, (0.0, 1.8)),
    "contrast": (adjust_contrast, F.adjust_contrast, (0.0, 1.8)),
    "saturation": (adjust_saturation, F.adjust_saturation, (0.0, 1.8)),
    "hue": (adjust_hue, F.adjust_hue, (-0.5, 0.5)),
}


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", sorted(OPS))
def test_each_jitter_op_is_torchvisions(name, channels):
    ours, theirs, (lo, hi) = OPS[name]
    images, factors = _images(channels), _factors(lo, hi)
    out = ours(images.float() / 255, factors)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert _gap(out, _tv(theirs, images, factors)).max() <= TOLERANCE[name]
    assert _gap(out, _tv(theirs, images.float() / 255, factors) * 255).max() <= FLOAT_TOLERANCE  # float kernels
    if channels == 1 and name in ("saturation", "hue"):  # skipped on grey images, as torchvision does
        assert torch.equal(out, images.float() / 255)


def test_grayscale_and_solarize_are_torchvisions():
    images = _images()
    x = images.float() / 255
    assert _gap(rgb_to_grayscale(x), F.rgb_to_grayscale(images, num_output_channels=3)).max() <= TOLERANCE["grayscale"]
    assert torch.equal((solarize(x) * 255).round().to(torch.uint8), F.solarize(images, threshold=128))
    grey = _images(channels=1)
    assert torch.equal(rgb_to_grayscale(grey.float() / 255), grey.float() / 255)


@pytest.mark.parametrize(("channels", "kernel_size"), [(3, 3), (3, 9), (1, 23)])
def test_gaussian_blur_is_torchvisions_with_each_samples_sigma(channels, kernel_size):
    images, sigma = _images(channels), _factors(*BLUR_SIGMA)
    out = gaussian_blur(images.float() / 255, sigma, kernel_size)
    theirs = torch.stack(
        [F.gaussian_blur(img, [kernel_size] * 2, [float(s)] * 2) for img, s in zip(images, sigma, strict=True)]
    )
    assert _gap(out, theirs).max() <= TOLERANCE["blur"]
    x = images.float() / 255
    theirs = torch.stack(
        [F.gaussian_blur(img, [kernel_size] * 2, [float(s)] * 2) for img, s in zip(x, sigma, strict=True)]
    )
    assert _gap(out, theirs * 255).max() <= FLOAT_TOLERANCE


def test_pil_blur_is_pils_gaussian_blur():
    images, radius = _images(), _factors(*BLUR_SIGMA)
    out = pil_gaussian_blur(images.float() / 255, radius)
    theirs = torch.stack(
        [
            F.pil_to_tensor(F.to_pil_image(img).filter(ImageFilter.GaussianBlur(float(r))))
            for img, r in zip(images, radius, strict=True)
        ]
    )
    gap = _gap(out, theirs)
    assert gap.max() <= PIL_TOLERANCE and gap.mean() <= PIL_MEAN_TOLERANCE
    for column in (0, 1, 7):  # the response to a line, at the border and inside
        line = np.zeros((15, 15), np.uint8)
        line[:, column] = 255
        x = torch.from_numpy(line).float().div(255).expand(len(radius), 1, 15, 15)
        pil = [np.asarray(Image.fromarray(line).filter(ImageFilter.GaussianBlur(float(r)))) for r in radius]
        assert _gap(pil_gaussian_blur(x, radius), torch.from_numpy(np.stack(pil)).unsqueeze(1)).max() <= PIL_TOLERANCE


# ---------------------------------------------------------------------------
# Distributions: the parameters follow torchvision's
# ---------------------------------------------------------------------------


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / a.numel()
    cdf_b = torch.searchsorted(b, points, right=True) / b.numel()
    return float((cdf_a - cdf_b).abs().max())


def _ks_critical(n: int, m: int) -> float:
    return KS_ALPHA_COEFFICIENT * math.sqrt((n + m) / (n * m))


STRONG = ViewSpec((0.8, 0.8, 0.8, 0.2), blur="kernel", blur_p=0.5, solarize_p=0.2)


def _sample(spec: ViewSpec, total: int, seed: int = 0):
    module = Photometric(spec, 96, *STL10_STATS, 3)
    return module.sample(torch.Generator().manual_seed(seed), total)


def test_the_factors_and_sigma_follow_torchvisions_distributions():
    ours = _sample(STRONG._replace(jitter_p=1.0), DRAWS)
    torch.manual_seed(0)
    jitter = v2.ColorJitter(*STRONG.jitter)
    theirs = [jitter.make_params([]) for _ in range(DRAWS)]
    names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
    blur = v2.GaussianBlur(9, sigma=BLUR_SIGMA)
    pil = PILGaussianBlur(BLUR_SIGMA)
    lo, hi = pil.sigma
    reference = {
        **{i: torch.tensor([p[name] for p in theirs]) for i, name in enumerate(names)},
        "sigma": torch.tensor([blur.make_params([])["sigma"][0] for _ in range(DRAWS)]),
        "radius": torch.tensor([lo + (hi - lo) * torch.rand(()).item() for _ in range(DRAWS)]),  # as PILGaussianBlur
    }
    drawn = {**{i: ours.factors[:, i] for i in range(4)}, "sigma": ours.sigma, "radius": ours.sigma}
    critical = _ks_critical(DRAWS, DRAWS)
    for key, values in drawn.items():
        assert ks_statistic(values, reference[key]) < critical, key
    assert ks_statistic(drawn[0], reference[0] * 0.5 + 0.5) > critical  # the test tells another range apart
    orders = torch.tensor([p["fn_idx"].tolist() for p in theirs])
    assert sorted(set(map(tuple, ours.order.tolist()))) == sorted(itertools.permutations(range(4)))
    for order in (ours.order, orders):  # each of the 24 orders about as often as the others, in both
        counts = torch.unique(order, dim=0, return_counts=True)[1].double() / DRAWS
        assert counts.numel() == 24 and (counts - 1 / 24).abs().max() < 0.01


def test_the_apply_probabilities_are_the_specs_within_one_percent():
    params = _sample(STRONG, 100_000)
    got = {p: float(getattr(params, p).double().mean()) for p in ("jitter", "grayscale", "blur", "solarize")}
    want = {"jitter": STRONG.jitter_p, "grayscale": STRONG.grayscale_p, "blur": 0.5, "solarize": 0.2}
    assert all(abs(got[p] - want[p]) < 0.01 for p in want), (got, want)
    assert (params.factors[~params.jitter] == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()  # not applied: identity
    none = _sample(ViewSpec((0.4, 0.4, 0.0, 0.0), grayscale_p=0.0), 1000)
    assert not none.blur.any() and not none.solarize.any() and not none.grayscale.any()
    assert (none.factors[:, 2] == 1).all() and (none.factors[:, 3] == 0).all()


# ---------------------------------------------------------------------------
# The module: order, generator, rows, precision, memory format, compile
# ---------------------------------------------------------------------------


def test_color_jitter_follows_each_samples_order():
    module = Photometric(STRONG, 40, *CIFAR10_STATS, 3)
    images = _images()
    x = images.float() / 255
    params = module.sample(torch.Generator().manual_seed(3), B)
    params = params._replace(jitter=torch.ones(B, dtype=torch.bool), factors=params.factors.clone())
    params.factors[:] = torch.tensor([1.3, 0.6, 1.5, 0.2])
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
        params = params._replace(order=torch.tensor([order] * B))
        want = x
        for op in order:
            want = ops[op](want, params.factors[:, op])
        assert torch.allclose(module.color_jitter(x, params), want, atol=1e-5)
    params = params._replace(jitter=torch.zeros(B, dtype=torch.bool), factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * B))
    assert torch.equal(module.color_jitter(x, params), x)  # not applied: the image, exactly


@pytest.mark.parametrize("strength", sorted(VIEW_PRESETS))
def test_the_generator_decides_and_rows_match_the_full_batch(strength):
    channels, stats = (1, FASHION_MNIST_STATS) if strength == "mnist" else (3, CIFAR10_STATS)
    module = Photometric(VIEW_PRESETS[strength][1], 40, *stats, channels)
    images = _images(channels)

    def run(seed: int, rows: slice = slice(None)) -> torch.Tensor:
        return module(images[rows], torch.Generator().manual_seed(seed), rows.start or 0, B)

    full = run(0)
    assert full.dtype == torch.float32 and full.shape == images.shape
    assert torch.equal(full, run(0)) and not torch.equal(full, run(1))
    halves = torch.cat([run(0, slice(0, 2)), run(0, slice(2, B))])  # 1 process == 2 (of unequal batches)
    torch.testing.assert_close(halves, full, rtol=0, atol=1e-6)


def test_bf16_autocast_and_channels_last_give_the_same_images():
    module = Photometric(VIEW_PRESETS["byol_asymmetric"][0], 40, *CIFAR10_STATS, 3)
    images = _images()
    want = module(images, torch.Generator().manual_seed(0), 0, B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = module(images, torch.Generator().manual_seed(0), 0, B)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, want, rtol=0, atol=1e-5)
    channels_last = images.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(module(channels_last, torch.Generator().manual_seed(0), 0, B), want, rtol=0, atol=1e-5)


def test_bad_input_is_refused():
    module = Photometric(STRONG, 40, *CIFAR10_STATS, 3)
    with pytest.raises(TypeError, match="uint8"):
        module(_images().float(), torch.Generator(), 0, B)
    with pytest.raises(ValueError, match="rows 4..9 are not in a batch of 8"):
        module(_images(), torch.Generator(), 4, 8)


def test_compiled_module_runs_on_cpu_and_matches_eager():
    module = Photometric(VIEW_PRESETS["solo_symmetric"][0], 40, *CIFAR10_STATS, 3)
    images = _images()
    compiled = torch.compile(module)
    got = compiled(images, torch.Generator().manual_seed(0), 0, B)
    torch.testing.assert_close(got, module(images, torch.Generator().manual_seed(0), 0, B), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------
# The presets' split views
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("strength", sorted(VIEW_PRESETS))
def test_a_presets_worker_then_batch_gives_what_its_transform_gives(strength):
    channels, stats = (1, FASHION_MNIST_STATS) if strength == "mnist" else (3, CIFAR10_STATS)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8))
    for second in (False, True):
        view = pickle.loads(pickle.dumps(simclr_split_view(24, *stats, channels, strength, second)))
        assert view.on_device is not None
        torch.manual_seed(0)
        whole = view.transform(image)
        torch.manual_seed(0)
        assert torch.equal(whole, simclr_view(24, *stats, channels, strength, second)(image))  # workers: unchanged
        uint8 = torch.stack([view.on_device.worker(image) for _ in range(4)])
        assert uint8.dtype == torch.uint8 and uint8.shape == (4, *whole.shape)
        out = view.on_device.batch(uint8, torch.Generator().manual_seed(0), 0, 4)
        assert out.dtype == whole.dtype and out.shape == (4, *whole.shape)
        mean, std = (torch.tensor(s).view(-1, 1, 1) for s in stats)
        assert (out * std + mean).min() >= -1e-5 and (out * std + mean).max() <= 1 + 1e-5


@pytest.mark.parametrize(("strength", "channels"), [("solo_symmetric", 3), ("byol_asymmetric", 3), ("mnist", 1)])
def test_a_split_views_worker_crops_and_flips_as_torchvisions_geometry(strength, channels):
    """`CropFlip`, the split view's worker part, draws the crop box and the flip from torch's RNG as
    `RandomResizedCrop` + `RandomHorizontalFlip` do, and resizes with torch's antialiased uint8 kernel instead
    of PIL's: on the same RNG state, the same pixels within 2 (mean under 0.5) for every draw."""
    spec = view_spec(strength)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)).filter(
        ImageFilter.GaussianBlur(2)
    )
    ours, theirs = CropFlip(spec, 64, channels), v2.Compose([*_geometry(spec, 64, channels), v2.ToImage()])
    for seed in range(20):
        torch.manual_seed(seed)
        a = ours(image)
        torch.manual_seed(seed)
        b = theirs(image).as_subclass(torch.Tensor)
        assert a.dtype == torch.uint8 and a.shape == b.shape == (channels, 64, 64)
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.5, (seed, diff.max(), diff.float().mean())
