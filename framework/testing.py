"""Helpers for testing plugins and recipes in a few lines: tiny shards, tiny recipes, a step runner.

from framework.logging import read_metrics
from framework.testing import tiny_shards, tiny_recipe, run_steps

def test_my_plugin(tmp_path):
    shards = tiny_shards(tmp_path)
    out = run_steps(tiny_recipe(tmp_path, shards, plugins={"backbones": {...}, "my_plugin": {}}), steps=2)
    assert "my_plugin.l2" in read_metrics(out)[-1]
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from framework.data.shards import brace_pattern, write_shards
from framework.data.sources import FASHION_MNIST_DIR, Sample, fashion_mnist
from framework.recipe.loading import deep_merge
from framework.recipe.schema import DataConfig

CONV28 = {"encoder": "conv28", "decoder": "conv28", "latent_dim": 16}


def synthetic_samples(n: int, size: int, channels: int, seed: int = 0, split: str = "train") -> Iterator[Sample]:
    """`n` labelled images of `size` px: 10 classes of coloured blobs (for RGB / 96-px recipes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        label = int(rng.integers(10))
        cx, cy = 0.2 + 0.06 * label, 0.8 - 0.06 * label
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02)
        colour = rng.uniform(0.3, 1.0, size=channels)
        pixels = np.clip(blob[..., None] * colour + rng.normal(0, 0.05, (size, size, channels)), 0, 1)
        pixels = (255 * pixels).astype(np.uint8)
        yield Sample(f"{split}_{i:07d}", Image.fromarray(pixels[..., 0] if channels == 1 else pixels), label)


def tiny_shards(
    root: str | Path,
    n_train: int = 192,
    n_test: int = 96,
    per_shard: int = 24,
    size: int = 28,
    channels: int = 1,
) -> dict[str, str]:
    """Write small train/test shards; 28-px grey ones are real Fashion-MNIST images.

    Returns `{"train": spec, "test": spec}` (brace patterns usable as `data.train`).
    """
    root = Path(root) / f"shards_{size}px_{channels}ch"
    specs = {}
    for split, n in (("train", n_train), ("test", n_test)):
        pattern = str(root / f"{split}-%06d.tar")
        if size == 28 and channels == 1 and FASHION_MNIST_DIR.exists():
            samples: Iterator[Sample] = islice(fashion_mnist(FASHION_MNIST_DIR, split), n)
        else:
            samples = synthetic_samples(n, size, channels, seed=hash(split) % 1000, split=split)
        if not (root / f"{split}.json").exists():
            write_shards(samples, pattern, maxcount=per_shard)
        info = json.loads((root / f"{split}.json").read_text())
        specs[split] = brace_pattern(pattern, len(info["shards"]))
    return specs


def tiny_recipe(
    tmp_path: str | Path,
    shards: dict[str, str],
    plugins: dict[str, Any] | None = None,
    size: int = 28,
    channels: int = 1,
    **sections: Any,
) -> dict[str, Any]:
    """A complete recipe (as data) for a few CPU steps on `shards`; `sections` deep-merge on top."""
    recipe = {
        "output_dir": str(Path(tmp_path) / "run"),
        "data": {
            "train": shards["train"],
            "image_size": size,
            "channels": channels,
            "mean": [0.5] * channels,
            "std": [0.25] * channels,
            "batch_size": 8,
            "num_workers": 0,
            "shuffle_buffer": 16,
        },
        "eval": {"train": shards["train"], "test": shards["test"], "batch_size": 64},
        "train": {"steps": 2},
        "optim": {"lr": 1e-3},
        "log": {"every": 1},
        "checkpoint": {"every": 1000},
        "plugins": plugins if plugins is not None else {"backbones": CONV28, "kl": {}},
    }
    return deep_merge(recipe, sections)


def data_section(spec: str, size: int = 28, channels: int = 1, **settings: Any) -> DataConfig:
    """A `data` section over the shards `spec` for `make_loader` (e.g. `data_section(spec, batch_size=4)`):
    `settings` are its keys; unset ones are `DataConfig`'s defaults, except `shuffle_buffer` (0)."""
    return DataConfig(
        train=spec,
        image_size=size,
        channels=channels,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        **{"shuffle_buffer": 0, **settings},
    )


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for `accelerate launch --main_process_port`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_recipe(path: str | Path, recipe: dict[str, Any]) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_steps(
    recipe: dict[str, Any] | str | Path,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    extra_plugins: dict[str, object] | None = None,
) -> Path:
    """Validate and train a recipe in this process; returns its output folder.

    `extra_plugins` registers plugin objects (e.g. a class instance with `@hookimpl` methods) by name.
    """
    from framework.engine import train
    from framework.recipe.loading import apply_overrides
    from framework.startup import load_recipe, validate

    extra = [f"train.steps={steps}"] if steps is not None else []
    if isinstance(recipe, dict):
        cfg, hooks = validate(apply_overrides(recipe, [*overrides, *extra]), extra_plugins=extra_plugins)
    else:
        cfg, hooks = load_recipe(recipe, [*overrides, *extra], extra_plugins=extra_plugins)
    return train(cfg, hooks)


def step_context(
    recipe: Any,
    views: dict[str, Any],
    *,
    encode: Any = None,
    decode: Any = None,
    encoder: Any = None,
    params: dict[str, Any] | None = None,
    labels: Any = None,
    step: int = 0,
    preview: bool = False,
    plugin: str | None = None,
    teacher: Any = None,
    teacher_modules: dict[str, Any] | None = None,
) -> Any:
    """A `framework.StepContext` for a plugin's unit test, without a model: `ctx.encode(name)` is
    `encode(views[name])` (cached per view; with `masked=True`, `encode(views[name], mask)`),
    `ctx.decode(encoding)` is `decode(encoding)`, `ctx.encode_teacher(name)` is `teacher(views[name])` and
    `ctx.teacher` the plugin's entry of `teacher_modules` (`{plugin: {module name: module}}`).

    `views` and `params` are keyed by the engine's names (`"x"`, `"<plugin>.v1"`); with `plugin`, the context
    is that plugin's, as its hooks receive it (`ctx.views["v1"]`, metrics named `<plugin>.<name>`).

    `recipe` is what `tiny_recipe` returns (validated here, its shards unchecked, so `ctx.config` is a
    `Recipe` and `ctx.config.plugins[name]` a plugin's section, as in a run), or any object standing for
    `ctx.config` (a validated `Recipe`, or a stub with only the fields the hook reads)."""
    from framework.startup import validate
    from framework.types import StepContext

    if isinstance(recipe, dict):
        recipe = validate(recipe, check_data=False)[0]

    def no_model(*_: Any) -> Any:
        raise AssertionError("this test context has no encode/decode function")

    def enc(view: Any, ctx: Any, mask: Any = None) -> Any:
        if encode is None:
            no_model()
        return encode(view) if mask is None else encode(view, mask)

    dec = (lambda encoding, ctx: decode(encoding)) if decode is not None else no_model
    ctx = StepContext(enc, dec, encoder, recipe, views, params or {}, labels, step, preview)
    if teacher is not None or teacher_modules is not None:
        ctx.with_teacher((lambda view, ctx: teacher(view)) if teacher is not None else no_model, teacher_modules or {})
    return ctx if plugin is None else ctx.scoped(plugin)
