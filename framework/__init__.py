"""augssl's engine and public plugin API.

Write a plugin in a few lines::

    # my_plugin.py
    import torch
    from framework import PluginConfig, StepContext, hookimpl

    class Config(PluginConfig):
        scale: float = 1.0

    @hookimpl
    def config_schema() -> type[PluginConfig]:
        return Config

    @hookimpl
    def regularize(ctx: StepContext, cfg: Config) -> dict[str, torch.Tensor]:
        h = ctx.encode("x").h
        return {"l2": cfg.scale * h.pow(2).mean()}

and expose it to recipes through the ``augssl`` entry-point group::

    [project.entry-points.augssl]
    my_plugin = "my_plugin"

A recipe that lists ``plugins: {my_plugin: {scale: 0.1}}`` then trains with the term
``my_plugin.l2``. Every hook is documented in ``framework.hookspecs``; a hook receives its
plugin's own section as ``cfg`` and its own modules as ``own``.

A hook's names are its plugin's own: ``ctx.views["v1"]`` is its view ``<plugin>.v1``, and
``ctx.metrics["acc"]`` is logged as ``<plugin>.acc`` (docs/plugins.md, "Scoped names").

The names below and ``plugins.blocks`` (the building blocks of the built-in methods: views, heads,
VAE terms, losses, EMA targets, capabilities) are the whole plugin API, versioned by ``API_VERSION``;
the built-in plugins use nothing else (tests/test_plugin_contract.py checks it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from framework.distributed import all_reduce, full_parameters, gather_with_grad, rank, world_size
    from framework.hookspecs import hookimpl
    from framework.precision import at_least_float32, full_precision
    from framework.recipe.schema import PluginConfig, Recipe, capability, needed_by
    from framework.schedules import Scheduled
    from framework.sharding import local_shard
    from framework.teacher import ema_update, initialise_targets, update_targets
    from framework.types import Encoding, OnDevice, StepContext, View, full_name, num_features
    from framework.views import ToMode, check_stats, denormalize, normalize, tensor_steps, without_normalize

# Each name of the API and the module that defines it, imported on first use: `augssl train` and
# `framework.cli` import this package first, and a bad recipe is answered before torch is imported.
_MODULES = {
    "framework.distributed": ("all_reduce", "full_parameters", "gather_with_grad", "rank", "world_size"),
    "framework.hookspecs": ("hookimpl",),
    "framework.precision": ("at_least_float32", "full_precision"),
    "framework.sharding": ("local_shard",),
    "framework.teacher": ("ema_update", "initialise_targets", "update_targets"),
    "framework.recipe.schema": ("PluginConfig", "Recipe", "capability", "needed_by"),
    "framework.schedules": ("Scheduled",),
    "framework.types": ("Encoding", "OnDevice", "StepContext", "View", "full_name", "num_features"),
    "framework.views": ("ToMode", "check_stats", "denormalize", "normalize", "tensor_steps", "without_normalize"),
}
# The plugin API's version, (major, minor): a minor release adds names (here or in `plugins.blocks`), a
# major one changes or removes one. A plugin that needs a name added in 1.2 may check `API_VERSION >= (1, 2)`.
API_VERSION = (1, 2)  # 1.1: local_shard (FSDP2); 1.2: the shared teacher, patch tokens and masks

_HOME = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    """The API name `name`, from its module (imported now if not yet); AttributeError for any other name
    (so `from framework import checkpoint` imports the submodule)."""
    if name not in _HOME:
        raise AttributeError(f"module 'framework' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "API_VERSION",
    "Encoding",
    "OnDevice",
    "PluginConfig",
    "Recipe",
    "Scheduled",
    "StepContext",
    "ToMode",
    "View",
    "all_reduce",
    "at_least_float32",
    "capability",
    "check_stats",
    "denormalize",
    "ema_update",
    "full_name",
    "full_parameters",
    "full_precision",
    "gather_with_grad",
    "hookimpl",
    "initialise_targets",
    "local_shard",
    "needed_by",
    "normalize",
    "num_features",
    "rank",
    "tensor_steps",
    "update_targets",
    "without_normalize",
    "world_size",
]
