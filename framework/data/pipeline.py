"""From a record to a batch on the device: sample -> views -> batch -> device.

`SampleToViews` decodes one record (in a data worker) and computes every view with its random
parameters; `collate` stacks samples into a batch; `batch_to_device` moves a batch to the
device and applies the normalisation `split_normalize` deferred there (so uint8 crosses
processes and the host-device link). A record that cannot become a sample is a `BadRecord`.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from framework.data.sources import ImageTooLarge, read_image
from framework.types import View
from framework.views import Normalize, clean_view

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


def split_normalize(views: dict[str, View]) -> tuple[list[tuple[str, Any, str | None]], dict[str, Normalize]]:
    """Each view's worker-side transform (in dependency order) and the `Normalize` deferred to the device.

    A view whose transform is a `v2.Compose` ending in `Normalize` runs without it in the
    workers (uint8 out). A derived view of such a view gets the uint8 image and inherits the
    normalisation if its transform says `accepts_uint8 = True` (e.g. `AffineWithParams`);
    otherwise its source is normalised in the worker first, as it always was.
    """
    worker, deferred = [], {}
    for name, view in ordered(views):
        transform = view.transform
        if (
            isinstance(transform, v2.Compose)
            and transform.transforms
            and isinstance(transform.transforms[-1], Normalize)
        ):
            deferred[name] = transform.transforms[-1]
            transform = v2.Compose(transform.transforms[:-1])
        elif view.source in deferred:
            if getattr(transform, "accepts_uint8", False):
                deferred[name] = deferred[view.source]
            else:
                transform = v2.Compose([deferred[view.source], transform])
        worker.append((name, transform, view.source))
    return worker, deferred


class SampleToViews:
    """Decode one raw record and compute every view (with their random parameters).

    Views whose normalisation is deferred (`split_normalize`) come out as uint8; the
    batch's `"normalize"` entry maps them to their `Normalize`, for `batch_to_device`.

    Labels are -1 (unlabelled) or 0..`num_classes` - 1 (without `num_classes`: below 2**31); any
    other `cls` (57 for 10 classes, -2, "3.5", "seven") makes the record a `BadRecord`. An image over
    PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, set to `max_image_pixels` when given)
    raises `ImageTooLarge`: not a bad record to skip, a limit the recipe may lift.
    """

    def __init__(
        self, views: dict[str, View], channels: int, num_classes: int | None = None, max_image_pixels: int | None = None
    ) -> None:
        self.views, self.normalize = split_normalize(views)
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
