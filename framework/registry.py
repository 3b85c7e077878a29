"""The plugins a recipe may name, loading one by name, and the class of its recipe section.

A plugin is a built-in (`plugins.<name>`, listed in `BUILTIN_PLUGINS`) or a third-party module
registered in the `augssl` entry-point group. Checking names imports neither torch nor a plugin, so a
recipe that names an unknown plugin is answered before either is imported (`framework.recipe.loading`
checks the names first); `config_schema` then loads a plugin, but builds no plugin manager. A name
that more than one source claims (an entry point named like a built-in, or two installed packages'
entry points of one name) is refused when a recipe uses it: taking one of them silently would train
something other than what the user installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points

from framework.recipe.schema import PluginConfig

ENTRY_POINT_GROUP = "augssl"  # the name of the project's hooks too (framework.hookspecs.PROJECT)
IMPL_MARK = f"{ENTRY_POINT_GROUP}_impl"  # the attribute `@hookimpl` sets on an implementation

# The built-in plugins, by recipe name; each is the module `plugins.<name>`.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "backbones",
    "kl",
    "aavae",
    "consistency",
    "affine",
    "simclr",
    "byol",
    "barlow",
    "dino",
    "ibot",
    "koleo",
    "probe",
)


class PluginError(Exception):
    """A plugin could not be loaded, is malformed, or one of its hooks failed."""


# A plugin's source: where it comes from (for messages), and its entry point (None: a built-in).
Source = tuple[str, EntryPoint | None]


def _sources() -> dict[str, list[Source]]:
    """Every plugin name, with every source that claims it."""
    found: dict[str, list[Source]] = {
        name: [("built-in", None)] for name in BUILTIN_PLUGINS if importlib.util.find_spec(f"plugins.{name}")
    }
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        origin = f"entry point {ep.value}" + (f" ({ep.dist.name})" if ep.dist else "")
        found.setdefault(ep.name, []).append((origin, ep))
    return found


def discover() -> dict[str, str]:
    """Every plugin a recipe may name: `{name: where it comes from}` (each source, for a name claimed twice)."""
    return {name: " and ".join(origin for origin, _ in sources) for name, sources in _sources().items()}


def _entry_point(name: str, found: dict[str, list[Source]]) -> EntryPoint | None:
    """The entry point of the one source of `name` (None: the built-in); PluginError for none or several."""
    sources = found.get(name, [])
    if not sources:
        raise PluginError(f"unknown plugin {name!r} (known: {', '.join(sorted(found))})")
    if len(sources) > 1:
        raise PluginError(
            f"plugin {name!r} is claimed by the {' and by the '.join(origin for origin, _ in sources)}: "
            "uninstall one, or rename the entry point"
        )
    return sources[0][1]


def check_names(names: Iterable[str]) -> None:
    """PluginError for the first of `names` that no plugin, or more than one, claims; imports none."""
    found = _sources()
    for name in names:
        _entry_point(name, found)


def load_plugin(name: str) -> object:
    """Import the plugin a recipe calls `name`: the built-in module or the entry point that claims it."""
    ep = _entry_point(name, _sources())
    where = f"module plugins.{name}" if ep is None else f"entry point {ep.value}"
    try:
        return importlib.import_module(f"plugins.{name}") if ep is None else ep.load()
    except Exception as exc:  # a plugin that fails to import (a missing dependency, a bug at import time)
        raise PluginError(f"plugin {name!r}: {where} failed to load: {type(exc).__name__}: {exc}") from exc


def config_schema(name: str, plugin: object | None = None) -> type[PluginConfig]:
    """The class of plugin `name`'s recipe section: what its `config_schema` hook returns, or `PluginConfig`
    when it implements none. `plugin` is the plugin object (default: the plugin loaded by `name`).
    PluginError naming the plugin and the hook when the hook fails or returns anything but a subclass."""
    hook = getattr(load_plugin(name) if plugin is None else plugin, "config_schema", None)
    if hook is None or getattr(hook, IMPL_MARK, None) is None:
        return PluginConfig
    where = f"plugin {name!r}, hook 'config_schema'"
    try:
        schema = hook()
    except Exception as exc:
        raise PluginError(f"{where}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(schema, type):
        raise PluginError(f"{where}: returned {type(schema).__name__}, expected type")
    if not issubclass(schema, PluginConfig):
        raise PluginError(f"{where}: {schema} is not a PluginConfig subclass")
    return schema
