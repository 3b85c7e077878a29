"""YAML recipes: load, inherit (`extends:`), override from the command line, validate.

A recipe is data: it picks plugins and their settings; behaviour lives in plugins.
Precedence: CLI overrides > recipe > the files it extends > defaults below.
Every problem is a `RecipeError` with a one-line message that names the key path,
raised before any process group, output folder or data worker exists.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from braceexpand import braceexpand
from pydantic import Field, ValidationError, field_validator, model_validator

from framework.manager import PluginError, PluginHooks
from framework.types import PluginConfig, Strict


class RecipeError(Exception):
    """A recipe that cannot run; the message is one line naming the key and the file."""


# ---------------------------------------------------------------------------
# The engine's sections
# ---------------------------------------------------------------------------


class DataConfig(Strict):
    """Where the training images come from and how they are batched (per process)."""

    train: str  # shard URLs: a path, a brace pattern `x-{000000..000009}.tar`, http(s)://, pipe:
    image_size: int = Field(gt=0)
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    resize: int | None = None  # resize the short side to this, then center-crop image_size
    batch_size: int = Field(128, gt=0)  # per process, per micro-step
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(1000, ge=0)
    shardshuffle: bool = True
    resampled: bool = False  # draw shards with replacement, independently per rank and worker
    # resampled only: an epoch is this many samples over all ranks and workers (webdataset's
    # with_epoch); default: as many shards as data.train lists
    epoch_samples: int | None = Field(None, gt=0)
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    # labels must be -1 (unlabelled) or 0..num_classes-1; a record with another is a counted bad record
    num_classes: int | None = Field(None, gt=0)
    # faults: a worker with no good record for stall_seconds stops the run (one line); a remote
    # shard's transfer without a byte for timeout_seconds fails, and is retried `retries` times
    stall_seconds: float = Field(600.0, gt=0)
    timeout_seconds: float = Field(60.0, gt=0)
    retries: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _epoch_samples_need_resampling(self) -> DataConfig:
        if self.epoch_samples is not None and not self.resampled:
            raise ValueError("data.epoch_samples applies to resampled streams: set data.resampled: true")
        return self


class TrainConfig(Strict):
    """The optimisation: length, optimizer, schedule, logging and checkpoints."""

    steps: int = Field(gt=0)  # optimizer steps
    lr: float = Field(gt=0)
    # "linear": the optimizer's lr is lr x global_batch / 256 (Goyal et al. 2017), where
    # global_batch = data.batch_size x processes x distributed.accumulation_steps
    lr_scaling: Literal["none", "linear"] = "none"
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = 0.9  # sgd (Nesterov)
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    seed: int = 0
    log_every: int = Field(50, gt=0)
    checkpoint_every: int = Field(1000, gt=0)
    preview_every: int = Field(1000, ge=0)  # PNG of views and reconstructions every N steps; 0: never
    # Accelerate trackers the logged metrics also go to (metrics.jsonl is always written);
    # "wandb" needs `pip install wandb` (and WANDB_* settings, e.g. WANDB_MODE=offline).
    log_with: list[Literal["tensorboard", "wandb"]] = ["tensorboard"]
    keep_checkpoints: int = Field(2, gt=0)
    # "auto" (newest verified checkpoint), "never" (refuses a folder with checkpoints), "fresh" (moves
    # the old run to <output_dir>/previous/<time>/ and starts at step 0), or a checkpoint path
    resume: str = "auto"
    max_bad_steps: int = Field(10, gt=0)  # consecutive non-finite steps before stopping
    compile: bool = False  # torch.compile every plugin module in place (first steps slower: compilation)


class DistributedConfig(Strict):
    """How the step is executed; the same recipe runs on 1 CPU or many GPUs."""

    # None: the launch decides (`accelerate launch --mixed_precision`, or its config file); "no"
    # if launched without one. Set here, the recipe wins over the launch.
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    accumulation_steps: int = Field(1, gt=0)
    grad_clip: float | None = Field(None, gt=0)
    find_unused_parameters: bool = False
    sync_batchnorm: bool = False  # SyncBatchNorm over all ranks (CUDA only; ignored on CPU)
    # a collective (the per-step vote, the log, a checkpoint barrier) that waits longer than this for
    # the other ranks stops the run with one line naming the rank and what it was doing (NCCL/gloo timeout)
    timeout_seconds: int = Field(1800, gt=0)
    deepspeed: dict[str, Any] | None = None
    # GPU speed settings (each a no-op on CPU): channels_last memory format for the model and
    # the image batches (None: on CUDA), TF32 matmuls and convolutions, cudnn.benchmark.
    channels_last: bool | None = None
    tf32: bool = True
    cudnn_benchmark: bool = True

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            from framework.distributed import check_deepspeed_section

            check_deepspeed_section(value)
        return value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        """YAML reads a bare `no` (as in `distributed.mixed_precision=no`) as false."""
        return "no" if value is False else value


class EvalConfig(Strict):
    """Labelled shards for evaluating the frozen encoder (`augssl eval`, and the online k-NN)."""

    train: str | None = None
    test: str | None = None
    batch_size: int = Field(256, gt=0)
    knn_every: int = Field(0, ge=0)  # k-NN accuracy (`knn.acc`) every N steps while training; 0: never
    knn_samples: int | None = Field(10000, gt=0)  # at most this many train and test samples for it; null: all

    @model_validator(mode="after")
    def _knn_needs_shards(self) -> EvalConfig:
        if self.knn_every and not (self.train and self.test):
            raise ValueError("eval.knn_every needs eval.train and eval.test (labelled shards)")
        return self


class Recipe(Strict):
    """A whole validated recipe. `plugins` maps each plugin name to its validated section."""

    output_dir: str = Field(pattern=r"\S")  # not empty
    data: DataConfig
    train: TrainConfig
    distributed: DistributedConfig = DistributedConfig()
    eval: EvalConfig = EvalConfig()
    plugins: dict[str, Any]

    def resolved(self) -> dict[str, Any]:
        """The recipe as plain data, every default filled in (written to runs and checkpoints)."""
        out = self.model_dump(mode="json", exclude={"plugins"})
        out["plugins"] = {
            name: cfg.model_dump(mode="json") if isinstance(cfg, PluginConfig) else cfg
            for name, cfg in self.plugins.items()
        }
        return out


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: dicts merge recursively, everything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    _check_size(data, path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


MAX_VALUES = 100_000  # a recipe is a few hundred values; YAML aliases can make a short file expand to 10^9


def _check_size(data: Any, path: Path) -> None:
    """RecipeError if `data`, with every YAML alias expanded, holds more than MAX_VALUES values (a
    "billion laughs" recipe would exhaust memory in validation or when the run writes recipe.yaml)."""
    stack, count = [data], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise RecipeError(f"{path}: the recipe expands to more than {MAX_VALUES} values (YAML aliases?)")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe and everything it `extends`, merged (the recipe wins)."""
    path = Path(path).resolve()
    if path in _seen:
        raise RecipeError(f"{path}: `extends` cycle: {' -> '.join(p.name for p in (*_seen, path))}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: expected a file name, got {type(parent).__name__}")
    parent_path = path.parent / parent
    if not parent_path.exists():
        raise RecipeError(f"{path}: extends: no such recipe {parent_path}")
    return deep_merge(load_raw(parent_path, (*_seen, path)), data)


_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*$")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`3`, `1.0e-3`, `[1, 2]`, `null`)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not _KEY.match(key):
            raise RecipeError(f"override {item!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _first_error(exc: ValidationError, prefix: str = "") -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    got = f" (got {err['input']!r})" if err["type"] not in ("missing", "extra_forbidden") else ""
    return f"{loc or '<root>'}: {err['msg']}{got}{more}"


def shard_urls(spec: str) -> list[str]:
    """Expand a shard spec (brace patterns, `::`-separated lists) into URLs."""
    return [url for part in spec.split("::") for url in braceexpand(part.strip()) if url]


def is_local(url: str) -> bool:
    return not re.match(r"^(pipe:|[a-z][a-z0-9+.-]*://)", url) or url.startswith("file://")


def check_shards(key: str, spec: str) -> None:
    """A missing local shard is a recipe error naming the key (remote URLs are not probed)."""
    urls = shard_urls(spec)
    if not urls:
        raise RecipeError(f"{key}: no shard URLs in {spec!r}")
    missing = [u for u in urls if is_local(u) and not Path(u.removeprefix("file://")).exists()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(urls)})" if len(missing) > 1 else ""
        raise RecipeError(f"{key}: no such shard: {missing[0]}{more}")


def validate(
    data: dict[str, Any], check_data: bool = True, extra_plugins: dict[str, object] | None = None
) -> tuple[Recipe, PluginHooks]:
    """Validate merged recipe data; returns the recipe and the registered plugins.

    `extra_plugins` registers plugin objects by name beside those the recipe names
    (tests and embedding applications); their section defaults to `{}`.
    """
    plugins_raw = data.get("plugins")
    if not isinstance(plugins_raw, dict) or not plugins_raw:
        raise RecipeError("plugins: a recipe must name at least one plugin (e.g. plugins: {backbones: ..., kl: ...})")
    plugins_raw = {name: section for name, section in plugins_raw.items() if section is not None}
    plugins_raw.update({name: {} for name in extra_plugins or {} if name not in plugins_raw})
    for name, section in plugins_raw.items():
        if not isinstance(section, dict):
            raise RecipeError(f"plugins.{name}: expected a mapping of settings, got {section!r}")
    try:
        recipe = Recipe.model_validate({**data, "plugins": plugins_raw})
    except ValidationError as exc:
        raise RecipeError(_first_error(exc)) from None
    try:
        hooks = PluginHooks(list(plugins_raw), extra=extra_plugins)
        schemas = hooks.config_schema()
    except PluginError as exc:
        raise RecipeError(f"plugins: {exc}") from None
    validated = {}
    for name, schema in schemas.items():
        try:
            validated[name] = schema.model_validate(plugins_raw[name])
        except ValidationError as exc:
            raise RecipeError(_first_error(exc, f"plugins.{name}")) from None
    recipe.plugins = validated
    if len(recipe.data.mean) != recipe.data.channels or len(recipe.data.std) != recipe.data.channels:
        raise RecipeError(f"data.mean/data.std: need {recipe.data.channels} values (data.channels)")
    for tracker in recipe.train.log_with:
        if importlib.util.find_spec(tracker) is None:
            raise RecipeError(f"train.log_with: {tracker} is not installed (pip install {tracker})")
    if check_data:
        check_shards("data.train", recipe.data.train)
        for key in ("train", "test"):
            spec = getattr(recipe.eval, key)
            if spec is not None:
                check_shards(f"eval.{key}", spec)
    return recipe, hooks


def load_recipe(
    path: str | Path,
    overrides: list[str] = (),
    check_data: bool = True,
    extra_plugins: dict[str, object] | None = None,
) -> tuple[Recipe, PluginHooks]:
    """Load, merge, override and validate a recipe file; errors are `RecipeError` naming the file."""
    try:
        return validate(apply_overrides(load_raw(path), list(overrides)), check_data, extra_plugins)
    except RecipeError as exc:
        msg = str(exc)
        raise RecipeError(msg if msg.startswith(str(Path(path).resolve())) else f"{path}: {msg}") from None


def write_resolved(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
