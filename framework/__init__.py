"""augssl's engine and public plugin API.

Write a plugin in a few lines::

    # my_plugin.py
    from framework import PluginConfig, hookimpl

    class Config(PluginConfig):
        scale: float = 1.0

    @hookimpl
    def config_schema():
        return Config

    @hookimpl
    def regularize(modules, ctx):
        h = ctx.encode("x").h
        return {"l2": ctx.config.plugins["my_plugin"].scale * h.pow(2).mean()}

and expose it to recipes through the ``augssl`` entry-point group::

    [project.entry-points.augssl]
    my_plugin = "my_plugin"

A recipe that lists ``plugins: {my_plugin: {scale: 0.1}}`` then trains with the term
``my_plugin.l2``. Every hook is documented in ``framework.hookspecs``.
"""

from framework.hookspecs import hookimpl
from framework.precision import at_least_float32, full_precision
from framework.types import Encoding, PluginConfig, View

__all__ = ["Encoding", "PluginConfig", "View", "at_least_float32", "full_precision", "hookimpl"]
