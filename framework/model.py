"""The one root module: every plugin's modules, and the hooks run inside `forward`.

Running every hook inside `Model.forward` means DDP and DeepSpeed see one module and
its whole graph. Nothing here knows about ranks or devices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from framework.teacher import EncoderChoice, Teacher
from framework.types import Encoding, StepContext

if TYPE_CHECKING:
    from framework.manager import PluginHooks
    from framework.recipe.schema import Recipe


class Model(nn.Module):
    """Holds `plugins[<plugin>][<module>]` and, when a plugin asks for one, the EMA `teacher`; `forward` returns
    the named loss terms and metrics."""

    teacher: Teacher | None

    def __init__(self, hooks: PluginHooks, config: Recipe) -> None:
        super().__init__()
        self.hooks = hooks
        self.config = config
        built = hooks.build_modules(config)
        self.plugins = nn.ModuleDict({name: nn.ModuleDict(mods) for name, mods in built.items()})
        self.encoder_plugin = hooks.encoder_plugin
        mirrored = hooks.teacher_modules(config, self.plugins)  # None: no plugin asks for a teacher
        self.teacher = None if mirrored is None else Teacher(self.mirrored(mirrored))
        self.preview_images: dict[str, torch.Tensor] = {}  # `ctx.images` of the last preview step

    def forward(
        self,
        views: dict[str, torch.Tensor],
        params: dict[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        step: int = 0,
        preview: bool = False,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        ctx = self.context(views, params, labels, step, preview)
        terms: dict[str, torch.Tensor] = {}
        for hook in (self.hooks.regularize, self.hooks.auxiliary_head):
            for plugin, plugin_terms in hook(self.plugins, ctx).items():
                terms.update({f"{plugin}.{name}": value for name, value in plugin_terms.items()})
        if preview:
            self.preview_images = dict(ctx.images)
        return terms, dict(ctx.metrics)

    def context(
        self,
        views: dict[str, torch.Tensor],
        params: dict[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        step: int = 0,
        preview: bool = False,
    ) -> StepContext:
        """The step context of a batch: encodings by this model's encoder (and teacher), cached per view."""
        ctx = StepContext(self._encode, self._decode, self.encoder, self.config, views, params, labels, step, preview)
        if self.teacher is not None:
            ctx.with_teacher(self._encode_teacher, self.teacher.plugins)
        return ctx

    def mirrored(self, names: dict[str, list[str]]) -> dict[str, dict[str, nn.Module]]:
        """The online modules the teacher copies: the encoder (under its plugin's name) and each plugin's `names`."""
        assert self.encoder_plugin is not None
        online: dict[str, dict[str, nn.Module]] = {self.encoder_plugin: {"encoder": self.encoder}}
        for plugin, mods in names.items():
            if not mods:  # the teacher's encoder alone
                continue
            own = cast(nn.ModuleDict, self.plugins[plugin])
            online.setdefault(plugin, {}).update({name: own[name] for name in mods})
        return online

    @property
    def encoder(self) -> nn.Module:
        """The run's encoder: the `encode` provider's module `encoder` (it has `num_features`)."""
        assert self.encoder_plugin is not None  # PluginHooks requires one unless only listing plugins
        return cast(nn.ModuleDict, self.plugins[self.encoder_plugin])["encoder"]

    def encoder_of(self, which: EncoderChoice) -> nn.Module:
        """The encoder `augssl eval` and `augssl export` read (`framework.teacher.evaluated_encoder`): the run's
        (`student`) or the teacher's copy of it (`teacher`), whose state dict has the same key names."""
        if which == "student":
            return self.encoder
        assert self.teacher is not None and self.encoder_plugin is not None
        return cast(nn.ModuleDict, self.teacher.plugins[self.encoder_plugin])["encoder"]

    def _encode(self, images: torch.Tensor, ctx: StepContext | None, mask: torch.Tensor | None = None) -> Encoding:
        return self.hooks.encode(self.plugins, images, ctx, self.config, mask)

    def _encode_teacher(self, images: torch.Tensor, ctx: StepContext | None) -> Encoding:
        """The teacher's encoding: the `encode` hook with the teacher's copies as the modules (no mask)."""
        assert self.teacher is not None
        with torch.no_grad():
            return self.hooks.encode(self.teacher.plugins, images, ctx, self.config, None)

    def _decode(self, encoding: Encoding, ctx: StepContext | None) -> torch.Tensor:
        return self.hooks.decode(self.plugins, encoding, ctx, self.config)

    def encode(self, images: torch.Tensor, teacher: bool = False) -> Encoding:
        """Encode a batch outside training (evaluation, export), by the student or (`teacher`) the teacher."""
        return self._encode_teacher(images, None) if teacher else self._encode(images, None)

    def weights(self) -> dict[str, float]:
        """Each loss term's multiplier is its plugin's `weight`."""
        return {name: cfg.weight for name, cfg in self.config.plugins.items()}

    def extra_repr(self) -> str:
        return f"plugins={list(self.plugins)}"


def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, Any]) -> torch.Tensor:
    """`sum(weight[plugin] * term)` over the terms `<plugin>.<term>`."""
    return sum(weights[name.split(".", 1)[0]] * value for name, value in terms.items())
