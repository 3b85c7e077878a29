"""From a record to a batch on the device: sample -> views -> batch -> device.

`SampleToViews` decodes one record (in a data worker) and computes every view with its random
parameters; `collate` stacks samples into a batch; `batch_to_device` moves a batch to the
device and applies the normalisation `split_views` deferred there (so uint8 crosses
processes and the host-device link); `DeviceViews` then applies the photometric steps of the views
that split there (`data.augment_on`). A record that cannot become a sample is a `BadRecord`.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, NamedTuple

import torch
from PIL import Image
from torchvision.transforms import v2

from framework.data.sources import ImageTooLarge, read_image
from framework.types import DeviceStep, View
from framework.views import Normalize, clean_view, without_normalize

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def clean_x_view(data: Any) -> View:
    """The clean view `x` of a recipe's `data` section: minimal preprocessing (resize/crop, normalise)."""
    return View(clean_view(data.image_size, data.mean, data.std, data.channels, resize=data.resize))


class BadRecord(Exception):
    """A record that cannot become a training sample (missing/undecodable image, bad label)."""


def ordered(views: dict[str, View]) -> list[tuple[str, View]]:
    """Views in dependency order (a derived view after its source); ValueError for a source that is no view
    or a cycle."""
    done: dict[str, View] = {}
    pending = dict(views)
    while pending:
        ready = {n: v for n, v in pending.items() if v.source is None or v.source in done}
        if not ready:
            name, view = next(iter(pending.items()))
            missing = view.source if view.source not in views else "a cycle"
            raise ValueError(f"view {name!r}: source {missing!r} is not a view (views: {', '.join(views)})")
        done.update(ready)
        for n in ready:
            del pending[n]
    return list(done.items())


class Split(NamedTuple):
    """How the views run: in the workers (in dependency order: name, transform, source), the `Normalize`
    deferred to the device, and the `DeviceStep`s applied on the device (`DeviceViews`)."""

    worker: list[tuple[str, Any, str | None]]
    deferred: dict[str, Normalize]
    device: dict[str, DeviceStep]


def split_views(views: dict[str, View], on_device: bool = False) -> Split:
    """Each view's worker-side transform (in dependency order), the `Normalize` deferred to the device and,
    with `on_device` (`data.augment_on`), the device steps of the views that split (`View.on_device`).

    A view that splits runs `on_device.worker` in the workers (uint8 out; a derived view's worker gets its
    source as the workers emit it) and `on_device.batch` on the device. A view that others derive from
    never splits: its whole `transform` runs in the workers, so its derived views see what they see with
    `on_device` off (the simplest rule that keeps them right; only the source's photometric steps stay
    per sample). Every other view is as without `on_device`, bit for bit: a view whose transform is a
    `v2.Compose` ending in `Normalize` (or wraps one: `without_normalize`) runs without it in the workers
    (uint8 out). A derived view of such
    a view gets the uint8 image and inherits the normalisation if its transform says
    `accepts_uint8 = True` (e.g. `AffineWithParams`); otherwise its source is normalised in the worker
    first, as it always was.
    """
    sources = {view.source for view in views.values()}
    split = Split([], {}, {})
    for name, view in ordered(views):
        transform = view.transform
        if on_device and view.on_device is not None and name not in sources:
            transform, split.device[name] = view.on_device.worker, view.on_device.batch
        elif (deferrable := without_normalize(transform)) is not None:
            transform, split.deferred[name] = deferrable
        elif view.source in split.deferred:
            if getattr(transform, "accepts_uint8", False):
                split.deferred[name] = split.deferred[view.source]
            else:
                transform = v2.Compose([split.deferred[view.source], transform])
        split.worker.append((name, transform, view.source))
    return split


class SampleToViews:
    """Decode one raw record and compute every view (with their random parameters).

    Views whose normalisation is deferred (`split_views`) come out as uint8; the
    batch's `"normalize"` entry maps them to their `Normalize`, for `batch_to_device`. With `on_device`,
    the views that split come out of their `on_device.worker`, uint8, for `DeviceViews`.

    Labels are -1 (unlabelled) or 0..`num_classes` - 1 (without `num_classes`: below 2**31); any
    other `cls` (57 for 10 classes, -2, "3.5", "seven") makes the record a `BadRecord`. An image over
    PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, set to `max_image_pixels` when given)
    raises `ImageTooLarge`: not a bad record to skip, a limit the recipe may lift.
    """

    def __init__(
        self,
        views: dict[str, View],
        channels: int,
        num_classes: int | None = None,
        max_image_pixels: int | None = None,
        on_device: bool = False,
    ) -> None:
        self.views, self.normalize, _ = split_views(views, on_device)  # the device steps stay in the trainer
        self.mode = "L" if channels == 1 else "RGB"
        self.num_classes = num_classes
        self.max_image_pixels = max_image_pixels

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        key = next((k for k in IMAGE_KEYS if k in raw), None)
        if key is None:
            raise BadRecord(f"no image ({'/'.join(IMAGE_KEYS)}) in record")
        if self.max_image_pixels is not None:  # this process decodes the recipe's images: its limit (0: none)
            Image.MAX_IMAGE_PIXELS = self.max_image_pixels or None
        try:
            image = read_image(io.BytesIO(raw[key]), self.mode, "data.max_image_pixels")  # 16 bits scaled to 8
        except ImageTooLarge:
            raise  # not a damaged record: the run stops, saying how to allow it
        except Exception as exc:
            raise BadRecord(f"undecodable image: {exc}") from None
        label = -1
        if "cls" in raw:
            try:
                label = int(raw["cls"].decode() if isinstance(raw["cls"], bytes) else raw["cls"])
            except ValueError:
                raise BadRecord(f"bad label {raw['cls'][:20]!r}") from None
            top = self.num_classes if self.num_classes is not None else 2**31
            if not -1 <= label < top:
                raise BadRecord(
                    f"label {label} outside -1..{top - 1}" + (" (num_classes)" if self.num_classes is not None else "")
                )
        out: dict[str, torch.Tensor] = {}
        params: dict[str, torch.Tensor] = {}
        for name, transform, source in self.views:
            result = transform(image if source is None else out[source])
            if isinstance(result, tuple):
                out[name], params[name] = result
            else:
                out[name] = result
        return {"views": out, "params": params, "label": label, "key": raw["__key__"]}


def collate(samples: list[dict[str, Any]], normalize: dict[str, Normalize] | None = None) -> dict[str, Any]:
    """One batch of `SampleToViews` samples: views and params stacked, labels a tensor, keys a list."""
    return {
        "normalize": normalize or {},
        "views": {k: torch.stack([s["views"][k] for s in samples]) for k in samples[0]["views"]},
        "params": {k: torch.stack([s["params"][k] for s in samples]) for k in samples[0]["params"]},
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
    }


def batch_to_device(batch: dict[str, Any], device: torch.device | str) -> tuple[dict, dict, torch.Tensor]:
    """A loader batch's (views, params, labels) on `device`, views normalised there."""
    norm = batch["normalize"]
    views = {}
    for k, v in batch["views"].items():
        v = v.to(device, non_blocking=True)
        views[k] = norm[k](v) if k in norm else v
    params = {k: v.to(device, non_blocking=True) for k, v in batch["params"].items()}
    return views, params, batch["label"].to(device, non_blocking=True)


def augments_on_device(augment_on: str, device: torch.device) -> bool:
    """Whether the views that split run their photometric steps on `device` (`data.augment_on`): "device",
    "workers", or "auto": on a CUDA device (CPU runs keep every step in the data workers)."""
    return augment_on == "device" or (augment_on == "auto" and device.type == "cuda")


def device_seed(seed: int, step: int, micro: int) -> int:
    """The seed of the device steps' generator at micro-step `micro` after optimizer step `step` of a run
    seeded `seed`: a hash of the three (64 bits; any integers). No rank in it: every process draws the
    parameters of the whole global batch."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{step}:{micro}".encode(), digest_size=8).digest(), "little")


class DeviceViews:
    """The device steps of the views that split (`split_views`), applied to a batch on the device.

    At each micro-step one generator on the device is seeded from (train.seed, the optimizer step, the
    micro-step since it), never from the rank or the global RNG, and the steps run in sorted view-name
    order, each drawing the parameters of the global batch (`total` = processes x `batch_size` rows) and
    applying this rank's rows (from `first` = rank x `batch_size`). So a resumed run draws what an
    uninterrupted one draws (no state to save), and a row of the global batch gets the same parameters in
    any number of processes. (A training stream never ends, so every batch has `batch_size` rows; a
    shorter one would take the draws of its first rows.)
    """

    def __init__(
        self,
        views: dict[str, View],
        on_device: bool,
        device: torch.device,
        seed: int,
        rank: int,
        world_size: int,
        batch_size: int,
    ) -> None:
        steps = split_views(views, on_device).device
        self.steps = [(name, steps[name]) for name in sorted(steps)]
        for _, step in self.steps:
            if isinstance(step, torch.nn.Module):
                step.to(device)  # its buffers (e.g. normalisation statistics) where the batch is
        self.generator = torch.Generator(device=device)
        self.seed, self.first, self.total = seed, rank * batch_size, world_size * batch_size

    def __call__(self, views: dict[str, torch.Tensor], step: int, micro: int) -> dict[str, torch.Tensor]:
        """`views` (on the device) with the device steps applied, at micro-step `micro` after optimizer step
        `step`."""
        if not self.steps:
            return views
        self.generator.manual_seed(device_seed(self.seed, step, micro))
        out = dict(views)
        with torch.no_grad():
            for name, apply in self.steps:
                out[name] = apply(views[name], self.generator, self.first, self.total)
        return out
