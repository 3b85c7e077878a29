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

The names below are the whole plugin API; the built-in plugins use nothing else.
"""

from framework.distributed import full_parameters, gather_with_grad, rank, world_size
from framework.hookspecs import hookimpl
from framework.precision import at_least_float32, full_precision
from framework.recipe.schema import PluginConfig, Recipe
from framework.schedules import Scheduled
from framework.types import Encoding, StepContext, View, num_features
from framework.views import ToMode, check_stats, denormalize, normalize, tensor_steps

__all__ = [
    "Encoding",
    "PluginConfig",
    "Recipe",
    "Scheduled",
    "StepContext",
    "ToMode",
    "View",
    "at_least_float32",
    "check_stats",
    "denormalize",
    "full_parameters",
    "full_precision",
    "gather_with_grad",
    "hookimpl",
    "normalize",
    "num_features",
    "rank",
    "tensor_steps",
    "world_size",
]
