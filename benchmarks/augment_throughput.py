"""Views in the data workers against views split between the workers and the device (issue 23, item 5).

    python benchmarks/augment_throughput.py [--images 200] [--repeats 3] [--batch 64] [--device auto]
        -> benchmarks/results/augment_throughput.json

ImageNet-like inputs: 500x375 JPEGs (quality 90) of random smooth images, written by this script. Per data worker
(this process, one thread, a loop over the JPEG bytes: decode, then every view), images/s of
(a) the full views in the worker: each View's `transform` (today's pipeline);
(b) the split's worker part: each View's `on_device.worker` (geometry, uint8 out) where the View has `on_device`,
    else a geometry-only stand-in built the same way (RandomResizedCrop at the preset's scale and interpolation,
    flip, PILToTensor; the JSON says which ran);
for SimCLR 2 x 224 (`solo_symmetric`), BYOL's asymmetric pair (`byol_asymmetric`) and multi-crop 2 x 224 + 6 x 96
(global scale 0.14-1, local `LOCAL_SCALE`), the views `plugins.blocks.crop_views` gives each recipe.
(c) the split's device part, each View's `on_device.batch` on a uint8 batch of `--batch`: views/s on the CPU, and
    on CUDA eager and compiled when there is one (skipped, with a note, while the views have no `on_device`).
Configurations run side by side, interleaved `--repeats` times; medians reported. Goals: the split's workers at
least 3x the full views' images/s for SimCLR, 5x for multi-crop; on CUDA at least 10,000 views/s at 224 px.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode, v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, write_report  # noqa: E402
from framework.recipe.schema import DataConfig, OptimConfig, Recipe, TrainConfig  # noqa: E402
from framework.types import View  # noqa: E402
from plugins.blocks import LOCAL_SCALE, VIEW_PRESETS, MultiCrop, TwoViewsConfig, crop_views  # noqa: E402

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # recipes/_imagenet.yaml's mean and std
CUDA_GOAL = 10_000  # views/s of the device part at the global size on one H100-class GPU


def jpegs(n: int, width: int = 500, height: int = 375, seed: int = 0) -> list[bytes]:
    """`n` ImageNet-like JPEGs: smooth random colour fields (upsampled noise, blurred) with a little grain."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8))
        image = coarse.resize((width, height), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))
        grain = rng.integers(-12, 13, (height, width, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def recipe_views(strength: str, size: int, crops: MultiCrop | None = None) -> dict[str, View]:
    """The views a joint-embedding plugin section of `strength` and `crops` gives for RGB images of `size` px."""
    mean, std = IMAGENET_STATS
    data = DataConfig(train="none.tar", image_size=size, channels=3, mean=list(mean), std=list(std))
    recipe = Recipe(output_dir="none", data=data, train=TrainConfig(steps=1), optim=OptimConfig(lr=1.0), plugins={})
    return crop_views(recipe, TwoViewsConfig(strength=strength, crops=crops))


class Workload(NamedTuple):
    """One setting the issue measures: its preset, its views, the goal for split / full workers' images/s."""

    strength: str
    views: dict[str, View]
    goal: float | None


def workloads(size: int, local_size: int) -> dict[str, Workload]:
    """SimCLR's pair, BYOL's asymmetric pair and multi-crop, by name."""
    multicrop = MultiCrop.model_validate(
        {"global": {"count": 2, "scale": (0.14, 1.0)}, "local": {"count": 6, "size": local_size, "scale": LOCAL_SCALE}}
    )
    return {
        f"simclr_2x{size}": Workload("solo_symmetric", recipe_views("solo_symmetric", size), 3.0),
        f"byol_asymmetric_2x{size}": Workload("byol_asymmetric", recipe_views("byol_asymmetric", size), None),
        f"multicrop_2x{size}_6x{local_size}": Workload(
            "solo_symmetric", recipe_views("solo_symmetric", size, multicrop), 5.0
        ),
    }


def geometry_only(strength: str, size: int, scale: tuple[float, float]) -> Callable[[Any], Any]:
    """The stand-in for `on_device.worker` while the views have none: the view's crop and flip, uint8 out."""
    spec = VIEW_PRESETS[strength][0]
    interpolation = InterpolationMode.BICUBIC if spec.bicubic else InterpolationMode.BILINEAR
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, interpolation=interpolation),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
        ]
    )


def view_geometry(
    name: str, strength: str, size: int, local_size: int, multicrop: bool
) -> tuple[int, tuple[float, float]]:
    """A view's crop size and scale, as `crop_views` names them: local crops `l<i>`, the rest global."""
    if name.startswith("l"):
        return local_size, LOCAL_SCALE
    return size, ((0.14, 1.0) if multicrop else VIEW_PRESETS[strength][0].crop_scale)


def worker_parts(
    views: dict[str, View], strength: str, size: int, local_size: int
) -> tuple[list[Callable[[Any], Any]], str]:
    """The split's worker part of every view, and which it is (`on_device.worker` or the geometry stand-in)."""
    if all(v.on_device is not None for v in views.values()):
        return [v.on_device.worker for v in views.values() if v.on_device is not None], "on_device.worker"
    multicrop = any(name.startswith("l") for name in views)
    parts = []
    for name in views:
        parts.append(geometry_only(strength, *view_geometry(name, strength, size, local_size, multicrop)))
    return parts, "geometry stand-in (RandomResizedCrop + flip + PILToTensor)"


def images_per_second(images: list[bytes], transforms: list[Callable[[Any], Any]]) -> float:
    """What one data worker does per record: decode the JPEG, then run every view's transform on it (the first
    image once before the clock starts)."""
    for transform in transforms:
        transform(Image.open(io.BytesIO(images[0])).convert("RGB"))
    start = time.perf_counter()
    for data in images:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        for transform in transforms:
            transform(image)
    return len(images) / (time.perf_counter() - start)


def views_per_second(step: Callable[..., torch.Tensor], size: int, batch: int, device: str, repeats: int) -> float:
    """Views/s of a device step on a random uint8 batch of `batch` views of `size` px (first call: warm-up)."""
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def once() -> None:
        step(images, generator, 0, batch)

    once()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def device_parts(
    views: dict[str, View], size: int, local_size: int, batch: int, devices: list[str], repeats: int
) -> dict[str, Any]:
    """Views/s of every view's `on_device.batch` on each device (eager, and compiled on CUDA), or why not."""
    if any(v.on_device is None for v in views.values()):
        return {"skipped": "the views have no on_device.batch yet"}
    out: dict[str, Any] = {}
    for name, view in views.items():
        if name.startswith("l") and name != "l1":
            continue  # the local crops are one configuration: l1 stands for them
        assert view.on_device is not None
        crop = local_size if name.startswith("l") else size
        step = view.on_device.batch
        for device in devices:
            if isinstance(step, torch.nn.Module):
                step = step.to(device)
            out[f"{name}/{device}_eager"] = views_per_second(step, crop, batch, device, repeats)
            if device == "cuda":
                compiled = torch.compile(step)
                out[f"{name}/cuda_compiled"] = views_per_second(compiled, crop, batch, device, repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="JPEGs per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians reported")
    parser.add_argument("--size", type=int, default=224, help="global crop size")
    parser.add_argument("--local-size", type=int, default=96, help="local crop size (multi-crop)")
    parser.add_argument("--batch", type=int, default=64, help="the device part's batch")
    parser.add_argument("--device-repeats", type=int, default=10, help="batches timed per device measurement")
    parser.add_argument("--device-threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU device part")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CPU, and CUDA if any")
    parser.add_argument("--out", default=str(RESULTS / "augment_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # one data worker's share of the machine
    torch.manual_seed(0)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("augment_throughput: --device cuda, but torch sees no CUDA device")
    devices = {"auto": ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"], "cpu": ["cpu"], "cuda": ["cuda"]}
    images = jpegs(args.images)
    settings = workloads(args.size, args.local_size)
    runs: dict[str, dict[str, list[float]]] = {name: {"full": [], "split": []} for name in settings}
    parts = {name: worker_parts(w.views, w.strength, args.size, args.local_size) for name, w in settings.items()}
    for _ in range(args.repeats):  # interleaved, so a slow spell of a loaded machine hits all alike
        for name, w in settings.items():
            runs[name]["full"].append(images_per_second(images, [v.transform for v in w.views.values()]))
            runs[name]["split"].append(images_per_second(images, parts[name][0]))
    results: dict[str, Any] = {}
    report = {
        "images": f"{args.images} JPEGs 500x375 quality 90 (random smooth)",
        "sizes": {"global": args.size, "local": args.local_size},
        "worker_threads": 1,
        "repeats": args.repeats,
        "device_batch": args.batch,
        "device_threads_on_cpu": args.device_threads,
        "devices": devices[args.device],
        "cuda_goal_views_per_second": CUDA_GOAL,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "results": results,
    }
    for name, w in settings.items():
        full, split = (statistics.median(runs[name][k]) for k in ("full", "split"))
        results[name] = {
            "views": len(w.views),
            "worker_images_per_second": {"full": full, "split": split},
            "split_over_full": split / full,
            "split_worker_part": parts[name][1],
            "goal_split_over_full": w.goal,
            "goal_met": None if w.goal is None else split / full >= w.goal,
            "every_repeat": runs[name],
        }
        goal = f", goal {w.goal}x" if w.goal else ""
        print(f"{name}: full views {full:.1f} images/s per worker, split {split:.1f} ({split / full:.2f}x{goal})")
    torch.set_num_threads(args.device_threads)  # the training process's share, not a worker's
    for name, w in settings.items():  # the report is saved after each: a time limit keeps what was measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        results[name]["device_views_per_second"] = device_parts(
            w.views, args.size, args.local_size, args.batch, devices[args.device], args.device_repeats
        )
        print(f"{name}: device part, views/s: {results[name]['device_views_per_second']}", flush=True)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
