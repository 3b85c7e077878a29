"""The plugin manager and its typed facade.

`PluginHooks` registers exactly the plugins a recipe names (built-ins by name from
`plugins/`, third-party ones through the `augssl` entry-point group), checks them
against `framework.hookspecs`, and offers one typed method per hook. Results of
collect hooks come back as `{plugin name: result}`, so nothing depends on the order
pluggy calls plugins in. Every error names the plugin and the hook.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy
import torch
from torch import nn

from framework import hookspecs
from framework.types import Encoding, PluginConfig, View

if TYPE_CHECKING:
    from framework.model import StepContext
    from framework.recipe import Recipe

ENTRY_POINT_GROUP = hookspecs.PROJECT

# The built-in plugins, by recipe name; each is the module `plugins.<name>`.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "backbones", "kl", "aavae", "consistency", "affine", "simclr", "byol", "barlow", "probe",
)  # fmt: skip


class PluginError(Exception):
    """A plugin could not be loaded, is malformed, or one of its hooks failed."""


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _builtin_available(name: str) -> bool:
    return importlib.util.find_spec(f"plugins.{name}") is not None


def discover() -> dict[str, str]:
    """Every plugin a recipe may name: `{name: where it comes from}`."""
    found = {name: "built-in" for name in BUILTIN_PLUGINS if _builtin_available(name)}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, f"entry point {ep.value}" + (f" ({ep.dist.name})" if ep.dist else ""))
    return found


def load_plugin(name: str) -> object:
    """Import the plugin a recipe calls `name`: a built-in first, else an entry point."""
    if name in BUILTIN_PLUGINS and _builtin_available(name):
        return importlib.import_module(f"plugins.{name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            return ep.load()
        except Exception as exc:  # an installed plugin that fails to import
            raise PluginError(f"plugin {name!r}: entry point {ep.value} failed to load: {exc}") from exc
    known = ", ".join(sorted(discover()))
    raise PluginError(f"unknown plugin {name!r} (known: {known})")


class PluginHooks:
    """The typed facade over pluggy: one method per hook of `framework.hookspecs`."""

    def __init__(
        self, names: list[str], extra: dict[str, object] | None = None, require_encoder: bool = True
    ) -> None:
        """Register the plugins `names` (loaded by name) and `extra` (objects, by name).

        `require_encoder=False` skips the exactly-one-`encode` check (listing plugins alone).
        """
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        plugins = {name: load_plugin(name) for name in names if name not in (extra or {})}
        plugins.update(extra or {})
        for name, plugin in plugins.items():
            try:
                self.pm.register(plugin, name=name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin {name!r}: {_one_line(exc)}") from exc
        for hook, caller in vars(self.pm.hook).items():  # what check_pending() rejects, named by plugin
            if isinstance(caller, pluggy.HookCaller) and caller.spec is None:
                for impl in caller.get_hookimpls():
                    if not impl.optionalhook:
                        known = ", ".join(n for n in vars(hookspecs) if hasattr(getattr(hookspecs, n), "augssl_spec"))
                        raise PluginError(f"plugin {impl.plugin_name!r}: unknown hook {hook!r} (hooks: {known})")
        self.pm.check_pending()
        self.names = list(plugins)
        self._encoder = self._single_provider("encode", required=require_encoder)
        self._decoder = self._single_provider("decode", required=False)

    def _single_provider(self, hook: str, required: bool) -> Callable[..., Any] | None:
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        providers = [impl.plugin_name for impl in impls]
        if len(providers) > 1 or (required and not providers):
            need = "exactly one plugin" if required else "at most one plugin"
            raise PluginError(
                f"hook {hook!r}: {need} may implement it, found {len(providers)}: {providers or 'none'}"
            )
        return self._bind(hook, impls[0]) if impls else None

    @staticmethod
    def _bind(hook: str, impl: pluggy.HookImpl) -> Callable[..., Any]:
        """Call one implementation with the arguments it asks for; errors name it."""

        def call(**kwargs: Any) -> Any:
            try:
                return impl.function(*[kwargs[arg] for arg in impl.argnames])
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r}, hook {hook!r}: {type(exc).__name__}: {exc}"
                ) from exc

        return call

    def _collect(self, hook: str, expect: type | tuple[type, ...] | None, **kwargs: Any) -> dict[str, Any]:
        results = {}
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            result = self._bind(hook, impl)(**kwargs)
            if expect is not None and not isinstance(result, expect):
                raise PluginError(
                    f"plugin {impl.plugin_name!r}, hook {hook!r}: returned {type(result).__name__}, "
                    f"expected {getattr(expect, '__name__', expect)}"
                )
            results[impl.plugin_name] = result
        return results

    # -- start-up -----------------------------------------------------------------------

    def config_schema(self) -> dict[str, type[PluginConfig]]:
        schemas = self._collect("config_schema", type)
        for name, schema in schemas.items():
            if not issubclass(schema, PluginConfig):
                raise PluginError(f"plugin {name!r}, hook 'config_schema': {schema} is not a PluginConfig subclass")
        return {name: schemas.get(name, PluginConfig) for name in self.names}

    def build_modules(self, config: Recipe) -> dict[str, dict[str, nn.Module]]:
        built = self._collect("build_modules", dict, config=config)
        for plugin, modules in built.items():
            for key, module in modules.items():
                if not isinstance(module, nn.Module):
                    raise PluginError(f"plugin {plugin!r}, hook 'build_modules': {key!r} is not an nn.Module")
        return built

    def augment(self, config: Recipe) -> dict[str, View]:
        """All views, by full name `<plugin>.<view>`."""
        views: dict[str, View] = {}
        for plugin, named in self._collect("augment", dict, config=config).items():
            for key, view in named.items():
                if not isinstance(view, View):
                    raise PluginError(f"plugin {plugin!r}, hook 'augment': view {key!r} is not a framework.View")
                views[f"{plugin}.{key}"] = view
        return views

    # -- every step ---------------------------------------------------------------------

    def encode(self, modules: nn.ModuleDict, view: torch.Tensor, ctx: StepContext | None) -> Encoding:
        assert self._encoder is not None
        return self._encoder(modules=modules, view=view, ctx=ctx)

    def decode(self, modules: nn.ModuleDict, encoding: Encoding, ctx: StepContext | None) -> torch.Tensor:
        if self._decoder is None:
            raise PluginError("hook 'decode': no plugin provides a decoder (set plugins.backbones.decoder)")
        return self._decoder(modules=modules, encoding=encoding, ctx=ctx)

    def regularize(self, modules: nn.ModuleDict, ctx: StepContext) -> dict[str, dict[str, torch.Tensor]]:
        return self._collect("regularize", dict, modules=modules, ctx=ctx)

    def auxiliary_head(self, modules: nn.ModuleDict, ctx: StepContext) -> dict[str, dict[str, torch.Tensor]]:
        return self._collect("auxiliary_head", dict, modules=modules, ctx=ctx)

    def on_train_step_end(self, modules: nn.ModuleDict, step: int, config: Recipe) -> None:
        self._collect("on_train_step_end", None, modules=modules, step=step, config=config)

    # -- description (for `augssl plugins`) ---------------------------------------------

    def implemented_hooks(self) -> dict[str, list[str]]:
        """`{plugin: [hook names it implements]}`."""
        table: dict[str, list[str]] = {name: [] for name in self.names}
        for hook in sorted(self.pm.hook.__dict__):
            caller = getattr(self.pm.hook, hook)
            if isinstance(caller, pluggy.HookCaller):
                for impl in caller.get_hookimpls():
                    table[impl.plugin_name].append(hook)
        return table
