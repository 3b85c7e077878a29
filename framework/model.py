"""The one root module: every plugin's modules, and the hooks run inside `forward`.

Running every hook inside `Model.forward` means DDP and DeepSpeed see one module and
its whole graph. Nothing here knows about ranks or devices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from framework.types import Encoding

if TYPE_CHECKING:
    from framework.manager import PluginHooks
    from framework.recipe.schema import Recipe


class StepContext:
    """What a step's hooks share: the batch, the recipe, and cached encodings.

    `views`: `{view name: (B, C, H, W)}`, with the clean view under `"x"`.
    `params`: `{view name: (B, k)}` random parameters returned by view transforms.
    `labels`: (B,) class labels, or -1 where unknown; only probes may use them.
    `metrics`: a plugin may put detached scalars here (`"<plugin>.<name>"`); they are
    logged, never optimised.
    `preview`: True on the steps whose images the engine saves (`train.preview_every`);
    then a plugin may put detached image batches (B, C, H, W), in the views' normalised
    space, in `images` (`"<plugin>.<name>"`, e.g. a reconstruction): they are drawn
    under the views in `<output_dir>/previews/step_<N>.png`.
    """

    def __init__(
        self,
        hooks: PluginHooks,
        modules: nn.ModuleDict,
        config: Recipe,
        views: dict[str, torch.Tensor],
        params: dict[str, torch.Tensor],
        labels: torch.Tensor | None,
        step: int,
        preview: bool = False,
    ) -> None:
        self.hooks, self.modules, self.config = hooks, modules, config
        self.views, self.params, self.labels, self.step = views, params, labels, step
        self.preview = preview
        self.metrics: dict[str, torch.Tensor] = {}
        self.images: dict[str, torch.Tensor] = {}
        self._encodings: dict[str, Encoding] = {}

    def encode(self, view: str) -> Encoding:
        """The encoding of view `view`, computed once per step and shared by all plugins."""
        if view not in self._encodings:
            if view not in self.views:
                raise KeyError(f"no view {view!r} in this batch (views: {sorted(self.views)})")
            self._encodings[view] = self.hooks.encode(self.modules, self.views[view], self)
        return self._encodings[view]

    def encode_tensor(self, images: torch.Tensor) -> Encoding:
        """Encode images that are not a named view (e.g. transformed on the fly); not cached."""
        return self.hooks.encode(self.modules, images, self)

    def decode(self, encoding: Encoding) -> torch.Tensor:
        """Reconstruct images from `encoding.z` with the one decoder."""
        return self.hooks.decode(self.modules, encoding, self)


class Model(nn.Module):
    """Holds `plugins[<plugin>][<module>]`; `forward` returns the named loss terms and metrics."""

    def __init__(self, hooks: PluginHooks, config: Recipe) -> None:
        super().__init__()
        self.hooks = hooks
        self.config = config
        built = hooks.build_modules(config)
        self.plugins = nn.ModuleDict({name: nn.ModuleDict(mods) for name, mods in built.items()})
        self.preview_images: dict[str, torch.Tensor] = {}  # `ctx.images` of the last preview step

    def forward(
        self,
        views: dict[str, torch.Tensor],
        params: dict[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        step: int = 0,
        preview: bool = False,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        ctx = StepContext(self.hooks, self.plugins, self.config, views, params, labels, step, preview)
        terms: dict[str, torch.Tensor] = {}
        for hook in (self.hooks.regularize, self.hooks.auxiliary_head):
            for plugin, plugin_terms in hook(self.plugins, ctx).items():
                terms.update({f"{plugin}.{name}": value for name, value in plugin_terms.items()})
        if preview:
            self.preview_images = ctx.images
        return terms, ctx.metrics

    def encode(self, images: torch.Tensor) -> Encoding:
        """Encode a batch outside training (evaluation, export)."""
        return self.hooks.encode(self.plugins, images, None)

    def weights(self) -> dict[str, float]:
        """Each loss term's multiplier is its plugin's `weight`."""
        return {name: cfg.weight for name, cfg in self.config.plugins.items()}

    def extra_repr(self) -> str:
        return f"plugins={list(self.plugins)}"


def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, Any]) -> torch.Tensor:
    """`sum(weight[plugin] * term)` over the terms `<plugin>.<term>`."""
    return sum(weights[name.split(".", 1)[0]] * value for name, value in terms.items())  # type: ignore[return-value]
