"""The values that hooks exchange: views, encodings and the step context (recipe sections are
`framework.recipe.schema`'s).

These are part of the public plugin API (re-exported by `framework`), and the
built-in plugins use nothing else.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from torch import nn

    from framework.recipe.schema import Recipe


STUDENT, TEACHER = "student", "teacher"  # whose encodings: the online encoder's, the EMA teacher's
CLEAN_VIEW = "x"  # the view the engine always provides: each image with minimal preprocessing
SHORT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a plugin's name for its own view, metric or image
T = TypeVar("T")


def full_name(plugin: str, name: str) -> str:
    """The engine's name of what plugin `plugin` calls `name`: its own `v1` is `<plugin>.v1`; the clean view
    `x` and another plugin's full name (`simclr.v1`, with a dot) stay as they are."""
    return name if name == CLEAN_VIEW or "." in name else f"{plugin}.{name}"


def check_short_name(plugin: str, name: object, what: str) -> str:
    """`name` if it can name one of `plugin`'s own views, metrics or images, else a one-line ValueError."""
    if not isinstance(name, str) or not SHORT_NAME.fullmatch(name) or name == CLEAN_VIEW:
        own = f"{plugin}."
        hint = f"use {name.removeprefix(own)!r}" if isinstance(name, str) and name.startswith(own) else "e.g. 'v1'"
        raise ValueError(
            f"{what} {name!r}: a plugin names its own by a short name (letters, digits, _; not {CLEAN_VIEW!r}), "
            f"which the engine prefixes with {own!r}: {hint}"
        )
    return name


class ScopedMapping(Mapping[str, T]):
    """A plugin's read view of the batch's views (or params): its own by short name (`v1` for `<plugin>.v1`),
    the clean view `x`, and every other plugin's by full name."""

    def __init__(self, data: Mapping[str, T], plugin: str) -> None:
        self.data, self.plugin = data, plugin

    def __getitem__(self, name: str) -> T:
        full = full_name(self.plugin, name)
        if full not in self.data:
            raise KeyError(f"no view {name!r} of plugin {self.plugin!r} in this batch (views: {sorted(self)})")
        return self.data[full]

    def __iter__(self) -> Iterator[str]:
        own = f"{self.plugin}."
        return (name.removeprefix(own) for name in self.data)

    def __len__(self) -> int:
        return len(self.data)


class ScopedNames(MutableMapping[str, T]):
    """Where a plugin puts its metrics (or preview images) by short name: `ctx.metrics["acc"]` is logged as
    `<plugin>.acc`."""

    def __init__(self, data: dict[str, T], plugin: str, what: str) -> None:
        self.data, self.plugin, self.what = data, plugin, what

    def _key(self, name: str) -> str:
        return f"{self.plugin}.{check_short_name(self.plugin, name, f'ctx.{self.what}')}"

    def __getitem__(self, name: str) -> T:
        if not isinstance(name, str) or not SHORT_NAME.fullmatch(name):
            raise KeyError(name)  # a name the plugin could not have set: `in` and `get` answer no
        return self.data[f"{self.plugin}.{name}"]

    def __setitem__(self, name: str, value: T) -> None:
        self.data[self._key(name)] = value

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        del self.data[f"{self.plugin}.{name}"]

    def __iter__(self) -> Iterator[str]:
        own = f"{self.plugin}."
        return (name.removeprefix(own) for name in self.data if name.startswith(own))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class DeviceStep(Protocol):
    """The batched photometric part of a view, run on the training device (`OnDevice.batch`)."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator, first: int, total: int) -> torch.Tensor:
        """`images`: this rank's batch of the view, uint8 (B, C, H, W) on the device, rows `first`..`first + B - 1`
        of a global batch of `total`; returns them augmented and normalised (float). Every sample gets its own
        random parameters, drawn from `generator` (on the device) for all `total` rows, so that the rows of one
        process's batch get what they would in any number of processes."""
        ...


@dataclass(frozen=True)
class OnDevice:
    """A view split in two, so its photometric steps run batched on the training device (`data.augment_on`):
    `worker` is the per-sample part the data workers run (decoding-side geometry: crops, flips, warps; returns
    a uint8 tensor (C, H, W), or `(tensor, params)`), `batch` the rest, a `DeviceStep` (e.g. a `nn.Module`).
    The view's `transform` stays the whole view, run in the workers when augmentation stays there."""

    worker: Callable[[Any], Any]
    batch: DeviceStep


@dataclass(frozen=True)
class View:
    """A named view transform returned by an `augment` hook.

    `transform` is a picklable callable run per sample in the data workers. With
    `source=None` it receives the decoded PIL image; with `source="<view name>"` it
    receives that view's output tensor (e.g. the affine head transforms SimCLR's first
    view). It returns a tensor, or `(tensor, params)` where `params` is a 1-D float
    tensor of the random parameters it drew (batched as `ctx.params[name]`).

    A transform with the attribute `accepts_uint8 = True` (e.g. an affine warp, for which
    black is 0 either way) is given its source view before normalisation, as uint8.
    """

    transform: Callable[[Any], Any]
    source: str | None = None
    on_device: OnDevice | None = None  # how the view splits when its photometric steps run on the device


@dataclass
class Encoding:
    """What the `encode` hook returns for one batch of one view.

    `h`: pooled backbone features (B, D), the representation probes use (a ViT's class token).
    `mu`, `logvar`, `z`: the Gaussian posterior q(z|x) and a reparameterised sample,
    present when the encoder has a VAE head, else None.
    `patches`: the patch tokens (B, N, D) after the encoder's last norm (no class or register tokens), row-major
    over the patch grid, present when the encoder gives token-level encodings (a plugin asks for them with
    `needs = {PATCH_TOKENS}`), else None.
    """

    h: torch.Tensor
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    z: torch.Tensor | None = None
    patches: torch.Tensor | None = None


class StepContext:
    """What a step's hooks share: the batch, the recipe, the encoder and cached encodings.

    A hook receives its plugin's own context (`scoped`), in which names are the plugin's: `ctx.views["v1"]`
    is its own view `v1` (the engine's `<plugin>.v1`), `ctx.views["x"]` the clean view and
    `ctx.views["simclr.v1"]` another plugin's, by full name; so for `params`, `encode` and `encode_grouped`.
    What it puts in `metrics` and `images` under a short name `n` is logged as `<plugin>.n`.

    `views`: `{view name: (B, C, H, W)}`, with the clean view under `"x"`.
    `params`: `{view name: (B, k)}` random parameters returned by view transforms.
    `labels`: (B,) class labels, or -1 where unknown; only probes may use them.
    `step`: optimizer steps completed before this one (0 on a fresh run's first step).
    `config`: the validated recipe; a hook's own section is its `cfg` argument.
    `encoder`: the run's encoder module (the `encode` provider's `encoder`): its
    `num_features` is the width of `Encoding.h`; BYOL's EMA reads its weights.
    `plugin`: the name the recipe gives the plugin this context belongs to (None: the engine's).
    `metrics`: a plugin may put detached scalars here (`ctx.metrics["acc"]`); they are
    logged, never optimised.
    `teacher`: this plugin's modules mirrored by the run's EMA teacher (hook `teacher_modules`), by name
    (`ctx.teacher["head"]`; another plugin's: `teacher_of`); `encode_teacher` / `encode_teacher_grouped` are the
    teacher's encodings.
    `preview`: True on the steps whose images the engine saves (`log.preview_every`);
    then a plugin may put detached image batches (B, C, H, W), in the views' normalised
    space, in `images` (e.g. `ctx.images["recon"]`, a reconstruction): they are drawn
    under the views in `<output_dir>/previews/step_<N>.png`.
    """

    plugin: str | None = None

    def __init__(
        self,
        encode: Callable[[torch.Tensor, StepContext], Encoding],
        decode: Callable[[Encoding, StepContext], torch.Tensor],
        encoder: nn.Module,
        config: Recipe,
        views: dict[str, torch.Tensor],
        params: dict[str, torch.Tensor],
        labels: torch.Tensor | None,
        step: int,
        preview: bool = False,
    ) -> None:
        self._encode, self._decode, self.encoder, self.config = encode, decode, encoder, config
        self._views, self._params = views, params
        self.views: Mapping[str, torch.Tensor] = views
        self.params: Mapping[str, torch.Tensor] = params
        self.labels, self.step, self.preview = labels, step, preview
        self._metrics: dict[str, torch.Tensor] = {}
        self._images: dict[str, torch.Tensor] = {}
        self.metrics: MutableMapping[str, torch.Tensor] = self._metrics
        self.images: MutableMapping[str, torch.Tensor] = self._images
        self._encodings: dict[tuple[str, str, bool], Encoding] = {}  # by (student/teacher, view, masked)
        self._groups: dict[tuple[str, tuple[str, ...], bool], dict[str, Encoding]] = {}  # `encode_grouped`'s
        self._teach: Callable[[torch.Tensor, StepContext], Encoding] | None = None
        self._teacher_modules: Any = {}  # {plugin: {module name: module}} (the teacher's ModuleDict)
        self.teacher: Any = {}  # this plugin's entry of it (a ModuleDict), by module name

    def with_teacher(self, encode: Callable[[torch.Tensor, StepContext], Encoding], modules: Any) -> None:
        """Give this context the run's teacher: its `encode` and its copies, `{plugin: {module name: module}}`."""
        self._teach, self._teacher_modules = encode, modules

    def scoped(self, plugin: str) -> StepContext:
        """This step's context as plugin `plugin` sees it: its own names are short; the batch, the caches,
        the metrics and the images are shared with every other plugin's context of the step."""
        ctx = copy.copy(self)
        ctx.plugin = plugin
        ctx.views, ctx.params = ScopedMapping(self._views, plugin), ScopedMapping(self._params, plugin)
        ctx.metrics = ScopedNames(self._metrics, plugin, "metrics")
        ctx.images = ScopedNames(self._images, plugin, "images")
        ctx.teacher = self._teacher_modules[plugin] if plugin in self._teacher_modules else {}
        return ctx

    def teacher_of(self, plugin: str) -> Any:
        """The teacher's copies of another plugin's mirrored modules (`ctx.teacher` is this plugin's own), by
        the name a capability gave (iBOT's head shared with DINO's); KeyError if it mirrors none."""
        if plugin not in self._teacher_modules:
            raise KeyError(f"the teacher mirrors no module of plugin {plugin!r}")
        return self._teacher_modules[plugin]

    def _full(self, view: str) -> str:
        """The engine's name of `view` as this context names it; KeyError if the batch has no such view."""
        full = view if self.plugin is None else full_name(self.plugin, view)
        if full not in self._views:
            raise KeyError(f"no view {view!r} in this batch (views: {sorted(self.views)})")
        return full

    def encode(self, view: str, masked: bool = False) -> Encoding:
        """The encoding of view `view`, computed once per step and shared by all plugins. `masked`: with the
        view's patch mask applied (`mask_of`), a separate encoding."""
        return self._encoded(STUDENT, self._full(view), masked)

    def encode_teacher(self, view: str) -> Encoding:
        """The teacher's encoding of view `view` (hook `teacher_modules`): no gradient, never masked, computed
        once per step and shared by all plugins."""
        return self._encoded(TEACHER, self._full(view), False)

    def mask_of(self, view: str) -> torch.Tensor:
        """The patch mask of view `view`, (B, N) bool (True: the patch is replaced by the encoder's mask token):
        the view's params, which a masked view returns as its per-patch 0/1 values (`plugins.blocks.masked_view`).
        KeyError if the view has no params."""
        mask = self._mask(self._full(view), True)
        assert mask is not None
        return mask

    def _encoded(self, kind: str, full: str, masked: bool) -> Encoding:
        """The encoding (`kind`: the student's or the teacher's) of the view the engine calls `full`, cached."""
        key = (kind, full, masked)
        if key not in self._encodings:
            self._encodings[key] = self._run(kind, self._views[full], self._mask(full, masked))
        return self._encodings[key]

    def _mask(self, full: str, masked: bool) -> torch.Tensor | None:
        if not masked:
            return None
        if full not in self._params:
            raise KeyError(f"view {full!r} carries no patch mask (its transform returns no params)")
        return self._params[full] > 0.5

    def _run(self, kind: str, images: torch.Tensor, mask: torch.Tensor | None) -> Encoding:
        if kind == STUDENT:
            return self._encode(images, self) if mask is None else self._encode(images, self, mask)  # type: ignore[call-arg]
        if self._teach is None:
            raise RuntimeError("this run has no teacher: a plugin that encodes with one implements `teacher_modules`")
        return self._teach(images, self)

    def encode_grouped(self, views: Sequence[str], masked: bool = False) -> list[Encoding]:
        """The encodings of `views`, in that order, with one encoder call per distinct image shape.

        The views are grouped by their (C, H, W), each group concatenated along the batch (in the order of
        `views`), encoded at once and split back per view. This is DINO's MultiCropWrapper (facebookresearch/dino
        `utils.py`; SwAV's multi-resolution forward too): it changes the encoder's BatchNorm batch statistics,
        which cover the whole group instead of one view (solo-learn instead calls the encoder once per crop).
        Each group is cached by its view names, apart from `encode`'s cache (a group of one view is that view's
        `encode`): the result depends on `views` alone, never on what another plugin encoded first. `masked`:
        every view with its patch mask applied (`mask_of`).
        """
        return self._grouped(STUDENT, views, masked)

    def encode_teacher_grouped(self, views: Sequence[str]) -> list[Encoding]:
        """`encode_grouped` by the teacher (`encode_teacher`)."""
        return self._grouped(TEACHER, views, False)

    def _grouped(self, kind: str, views: Sequence[str], masked: bool) -> list[Encoding]:
        full = [self._full(view) for view in views]
        groups: dict[tuple[int, ...], list[str]] = {}
        for view in dict.fromkeys(full):
            groups.setdefault(tuple(self._views[view].shape[1:]), []).append(view)
        encoded: dict[str, Encoding] = {}
        for names in groups.values():
            encoded |= self._encode_group(kind, tuple(names), masked)
        return [encoded[view] for view in full]

    def _encode_group(self, kind: str, names: tuple[str, ...], masked: bool) -> dict[str, Encoding]:
        """The encodings of views of one shape (full names), concatenated into one encoder call (cached per
        `names`)."""
        if len(names) == 1:
            return {names[0]: self._encoded(kind, names[0], masked)}
        key = (kind, names, masked)
        if key not in self._groups:
            sizes = [len(self._views[name]) for name in names]
            masks = [mask for name in names if (mask := self._mask(name, masked)) is not None]
            joint = self._run(
                kind, torch.cat([self._views[name] for name in names]), torch.cat(masks) if masks else None
            )
            parts: dict[str, Any] = {
                f.name: value.split(sizes) if (value := getattr(joint, f.name)) is not None else [None] * len(names)
                for f in fields(joint)
            }  # every field of the Encoding (h, mu, logvar, z, patches), split the same way
            self._groups[key] = {
                name: type(joint)(**{key: split[i] for key, split in parts.items()}) for i, name in enumerate(names)
            }
        return self._groups[key]

    def encode_tensor(self, images: torch.Tensor) -> Encoding:
        """Encode images that are not a named view (e.g. transformed on the fly); not cached."""
        return self._encode(images, self)

    def decode(self, encoding: Encoding) -> torch.Tensor:
        """Reconstruct images from `encoding.z` with the one decoder."""
        return self._decode(encoding, self)


def num_features(encoder: nn.Module) -> int:
    """The width of the features `Encoding.h` that `encoder` declares (its `num_features` attribute,
    as timm's models carry it; the plugin manager checks it is a positive int when the run is built)."""
    width = getattr(encoder, "num_features", None)
    if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
        name = type(encoder).__name__
        raise ValueError(f"the encoder needs `num_features`, the width of Encoding.h ({name} has {width!r})")
    return width
