"""The values that hooks exchange: views, encodings and the step context (recipe sections are
`framework.recipe.schema`'s).

These are part of the public plugin API (re-exported by `framework`), and the
built-in plugins use nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

    from framework.recipe.schema import Recipe


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


@dataclass
class Encoding:
    """What the `encode` hook returns for one batch of one view.

    `h`: pooled backbone features (B, D), the representation probes use.
    `mu`, `logvar`, `z`: the Gaussian posterior q(z|x) and a reparameterised sample,
    present when the encoder has a VAE head, else None.
    """

    h: torch.Tensor
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    z: torch.Tensor | None = None


class StepContext:
    """What a step's hooks share: the batch, the recipe, the encoder and cached encodings.

    `views`: `{view name: (B, C, H, W)}`, with the clean view under `"x"`.
    `params`: `{view name: (B, k)}` random parameters returned by view transforms.
    `labels`: (B,) class labels, or -1 where unknown; only probes may use them.
    `step`: optimizer steps completed before this one (0 on a fresh run's first step).
    `config`: the validated recipe; a hook's own section is its `cfg` argument.
    `encoder`: the run's encoder module (the `encode` provider's `encoder`): its
    `num_features` is the width of `Encoding.h`; BYOL's EMA reads its weights.
    `metrics`: a plugin may put detached scalars here (`"<plugin>.<name>"`); they are
    logged, never optimised.
    `preview`: True on the steps whose images the engine saves (`log.preview_every`);
    then a plugin may put detached image batches (B, C, H, W), in the views' normalised
    space, in `images` (`"<plugin>.<name>"`, e.g. a reconstruction): they are drawn
    under the views in `<output_dir>/previews/step_<N>.png`.
    """

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
        self.views, self.params, self.labels, self.step = views, params, labels, step
        self.preview = preview
        self.metrics: dict[str, torch.Tensor] = {}
        self.images: dict[str, torch.Tensor] = {}
        self._encodings: dict[str, Encoding] = {}
        self._groups: dict[tuple[str, ...], dict[str, Encoding]] = {}  # `encode_grouped`'s, by view names

    def encode(self, view: str) -> Encoding:
        """The encoding of view `view`, computed once per step and shared by all plugins."""
        if view not in self._encodings:
            if view not in self.views:
                raise KeyError(f"no view {view!r} in this batch (views: {sorted(self.views)})")
            self._encodings[view] = self._encode(self.views[view], self)
        return self._encodings[view]

    def encode_grouped(self, views: Sequence[str]) -> list[Encoding]:
        """The encodings of `views`, in that order, with one encoder call per distinct image shape.

        The views are grouped by their (C, H, W), each group concatenated along the batch (in the order of
        `views`), encoded at once and split back per view. This is DINO's MultiCropWrapper (facebookresearch/dino
        `utils.py`; SwAV's multi-resolution forward too): it changes the encoder's BatchNorm batch statistics,
        which cover the whole group instead of one view (solo-learn instead calls the encoder once per crop).
        Each group is cached by its view names, apart from `encode`'s cache (a group of one view is that view's
        `encode`): the result depends on `views` alone, never on what another plugin encoded first.
        """
        groups: dict[tuple[int, ...], list[str]] = {}
        for view in dict.fromkeys(views):
            if view not in self.views:
                raise KeyError(f"no view {view!r} in this batch (views: {sorted(self.views)})")
            groups.setdefault(tuple(self.views[view].shape[1:]), []).append(view)
        encoded: dict[str, Encoding] = {}
        for names in groups.values():
            encoded |= self._encode_group(tuple(names))
        return [encoded[view] for view in views]

    def _encode_group(self, names: tuple[str, ...]) -> dict[str, Encoding]:
        """The encodings of views of one shape, concatenated into one encoder call (cached per `names`)."""
        if len(names) == 1:
            return {names[0]: self.encode(names[0])}
        if names not in self._groups:
            sizes = [len(self.views[name]) for name in names]
            joint = self._encode(torch.cat([self.views[name] for name in names]), self)
            parts: dict[str, Any] = {
                f.name: value.split(sizes) if (value := getattr(joint, f.name)) is not None else [None] * len(names)
                for f in fields(joint)
            }  # every field of the Encoding (h, mu, logvar, z), split the same way
            self._groups[names] = {
                name: type(joint)(**{key: split[i] for key, split in parts.items()}) for i, name in enumerate(names)
            }
        return self._groups[names]

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
