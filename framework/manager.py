"""The plugin manager and its typed facade.

`PluginHooks` registers exactly the plugins a recipe names (loaded by `framework.registry`:
built-ins by name from `plugins/`, third-party ones through the `augssl` entry-point group), checks them
against `framework.hookspecs`, and offers one typed method per hook. It calls each
plugin's implementation itself, with the arguments the implementation asks for, its own
recipe section (`cfg`) and modules (`own`) among them; results of collect hooks come back
as `{plugin name: result}`, so nothing depends on the order plugins are called in. Hence
pluggy's call-order and wrapping markers (`hookwrapper`, `wrapper`, `tryfirst`, `trylast`)
are refused at registration, in one line. Every error names the plugin and the hook.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import pluggy
import torch
from torch import nn

from framework import hookspecs
from framework.errors import one_line
from framework.recipe.schema import PluginConfig
from framework.registry import PluginError, config_schema, load_plugin
from framework.types import Encoding, StepContext, View, check_short_name, full_name, num_features

if TYPE_CHECKING:
    from framework.recipe.schema import Recipe

__all__ = ["PluginError", "PluginHooks"]


class Registration:
    """One name's registration of a plugin: the plugin's hook implementations, on an object of its own (pluggy
    registers an object once, and one module may be listed under two names: two entry points, two sections)."""

    def __init__(self, plugin: object) -> None:
        for attr in dir(plugin):
            value = getattr(plugin, attr, None)
            if callable(value) and getattr(value, f"{hookspecs.PROJECT}_impl", None) is not None:
                setattr(self, attr, value)


class PluginHooks:
    """The typed facade over pluggy: one method per hook of `framework.hookspecs`."""

    def __init__(self, names: list[str], extra: dict[str, object] | None = None, require_encoder: bool = True) -> None:
        """Register the plugins `names` (loaded by name) and `extra` (objects, by name).

        `require_encoder=False` skips the exactly-one-`encode` check (listing plugins alone).
        """
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        plugins = {name: load_plugin(name) for name in names if name not in (extra or {})}
        plugins.update(extra or {})
        for name, plugin in plugins.items():
            try:
                self.pm.register(Registration(plugin), name=name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin {name!r}: {one_line(exc)}") from exc
        self._check_implementations()
        self.names = list(plugins)
        self.encoder_plugin = self._single_provider("encode", required=require_encoder)
        self.decoder_plugin = self._single_provider("decode", required=False)

    def _check_implementations(self) -> None:
        """Unknown hooks and pluggy's ordering/wrapping markers, named by plugin (before check_pending)."""
        known = ", ".join(n for n in vars(hookspecs) if hasattr(getattr(hookspecs, n), "augssl_spec"))
        for hook, caller in vars(self.pm.hook).items():
            if not isinstance(caller, pluggy.HookCaller):
                continue
            for impl in caller.get_hookimpls():
                if caller.spec is None and not impl.optionalhook:
                    raise PluginError(f"plugin {impl.plugin_name!r}: unknown hook {hook!r} (hooks: {known})")
                marks = [m for m in ("hookwrapper", "wrapper", "tryfirst", "trylast") if getattr(impl, m, False)]
                if marks:
                    raise PluginError(
                        f"plugin {impl.plugin_name!r}, hook {hook!r}: @hookimpl({marks[0]}=True) is not supported: "
                        "augssl calls every plugin's implementation itself, in no set order (see docs/plugins.md)"
                    )
        self.pm.check_pending()

    def _single_provider(self, hook: str, required: bool) -> str | None:
        providers = [impl.plugin_name for impl in getattr(self.pm.hook, hook).get_hookimpls()]
        if len(providers) > 1 or (required and not providers):
            need = "exactly one plugin" if required else "at most one plugin"
            raise PluginError(f"hook {hook!r}: {need} may implement it, found {len(providers)}: {providers or 'none'}")
        return providers[0] if providers else None

    def _impls(self, hook: str, plugin: str | None = None) -> list[pluggy.HookImpl]:
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        return [impl for impl in impls if plugin is None or impl.plugin_name == plugin]

    @staticmethod
    def _call(hook: str, impl: pluggy.HookImpl, **kwargs: Any) -> Any:
        """Call one implementation with the arguments it asks for; errors name it."""
        try:
            return impl.function(*[kwargs[arg] for arg in impl.argnames])
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {impl.plugin_name!r}, hook {hook!r}: {type(exc).__name__}: {exc}") from exc

    def _collect(
        self,
        hook: str,
        expect: type | tuple[type, ...] | None,
        scope: Callable[[str], dict[str, Any]] = lambda name: {},
        **kwargs: Any,
    ) -> dict[str, Any]:
        """`{plugin: result}` of every implementation; `scope(plugin)` adds its `cfg`/`own` arguments."""
        results = {}
        for impl in self._impls(hook):
            result = self._call(hook, impl, **kwargs, **scope(impl.plugin_name))
            if expect is not None and not isinstance(result, expect):
                raise PluginError(
                    f"plugin {impl.plugin_name!r}, hook {hook!r}: returned {type(result).__name__}, "
                    f"expected {getattr(expect, '__name__', expect)}"
                )
            results[impl.plugin_name] = result
        return results

    @staticmethod
    def _scope(
        config: Recipe, modules: nn.ModuleDict | None = None, ctx: StepContext | None = None
    ) -> Callable[[str], dict[str, Any]]:
        """A plugin's scoped arguments: its own section `cfg`, (with `modules`) its own modules `own` and (with
        `ctx`) its own view of the step context, in which its views, metrics and images have short names."""

        def scope(name: str) -> dict[str, Any]:
            own = modules[name] if modules is not None and name in modules else nn.ModuleDict()
            return {"cfg": config.plugins.get(name), "own": own, "ctx": ctx.scoped(name) if ctx is not None else None}

        return scope

    # -- start-up -----------------------------------------------------------------------

    def config_schema(self) -> dict[str, type[PluginConfig]]:
        return {name: config_schema(name, self.pm.get_plugin(name)) for name in self.names}

    def build_modules(self, config: Recipe) -> dict[str, dict[str, nn.Module]]:
        """Every plugin's modules, the encoder's plugin first; the others receive its `encoder`."""
        scope = self._scope(config)
        built: dict[str, dict[str, nn.Module]] = {}
        encoder = None
        if self.encoder_plugin is not None:
            first = self._impls("build_modules", self.encoder_plugin)
            own = (
                self._call("build_modules", first[0], config=config, encoder=None, **scope(self.encoder_plugin))
                if first
                else {}
            )
            encoder = self._check_encoder(own)
            built[self.encoder_plugin] = own
        for impl in self._impls("build_modules"):
            if impl.plugin_name != self.encoder_plugin:
                built[impl.plugin_name] = self._call(
                    "build_modules", impl, config=config, encoder=encoder, **scope(impl.plugin_name)
                )
        for plugin, modules in built.items():
            if not isinstance(modules, dict):
                raise PluginError(
                    f"plugin {plugin!r}, hook 'build_modules': returned {type(modules).__name__}, expected dict"
                )
            for key, module in modules.items():
                if not isinstance(module, nn.Module):
                    raise PluginError(f"plugin {plugin!r}, hook 'build_modules': {key!r} is not an nn.Module")
        return built

    def _check_encoder(self, own: Any) -> nn.Module:
        where = f"plugin {self.encoder_plugin!r}, hook 'build_modules'"
        encoder = own.get("encoder") if isinstance(own, dict) else None
        if not isinstance(encoder, nn.Module):
            raise PluginError(f"{where}: the plugin that implements 'encode' must return its encoder as 'encoder'")
        try:
            num_features(encoder)
        except ValueError as exc:
            raise PluginError(f"{where}: {exc}") from None
        return encoder

    def shard_blocks(self, config: Recipe, modules: nn.ModuleDict) -> dict[str, list[nn.Module]]:
        """Every plugin's blocks (`shard_blocks`), each checked to be a submodule of the plugin's own modules."""
        listed = self._collect("shard_blocks", list, self._scope(config, modules))
        for plugin, blocks in listed.items():
            own = cast(nn.ModuleDict, modules[plugin]) if plugin in modules else nn.ModuleDict()
            inside = {id(m) for holder in own.values() for m in holder.modules() if m is not holder}
            for i, block in enumerate(blocks):
                if id(block) not in inside:
                    raise PluginError(
                        f"plugin {plugin!r}, hook 'shard_blocks': item {i} ({type(block).__name__}) is not a submodule "
                        "of the plugin's own modules"
                    )
        return listed

    def teacher_modules(self, config: Recipe, modules: nn.ModuleDict) -> dict[str, list[str]] | None:
        """`{plugin: [own module names]}` the teacher mirrors, each checked to be one of the plugin's own modules;
        None when no plugin asks for a teacher."""
        named = self._collect("teacher_modules", (list, tuple), self._scope(config, modules), config=config)
        for plugin, names in named.items():
            own = cast(nn.ModuleDict, modules[plugin]) if plugin in modules else nn.ModuleDict()
            if unknown := [n for n in names if not isinstance(n, str) or n not in own]:
                raise PluginError(
                    f"plugin {plugin!r}, hook 'teacher_modules': {unknown[0]!r} is not one of its own modules "
                    f"({', '.join(own) or 'none'})"
                )
        return {plugin: list(names) for plugin, names in named.items()} if named else None

    def augment(self, config: Recipe) -> dict[str, View]:
        """All views, by full name `<plugin>.<view>`; a `source` naming the plugin's own view by its short
        name is given the full one."""
        views: dict[str, View] = {}
        for plugin, named in self._collect("augment", dict, self._scope(config), config=config).items():
            where = f"plugin {plugin!r}, hook 'augment'"
            for key, view in named.items():
                try:
                    check_short_name(plugin, key, "view")
                except ValueError as exc:
                    raise PluginError(f"{where}: {exc}") from exc  # a ValueError: one line
                if not isinstance(view, View):
                    raise PluginError(f"{where}: view {key!r} is not a framework.View")
                if view.source is not None:
                    view = dataclasses.replace(view, source=full_name(plugin, view.source))
                views[f"{plugin}.{key}"] = view
        return views

    # -- every step ---------------------------------------------------------------------

    def encode(
        self,
        modules: nn.ModuleDict,
        view: torch.Tensor,
        ctx: StepContext | None,
        config: Recipe,
        mask: torch.Tensor | None = None,
    ) -> Encoding:
        """The encoding of `view` (its patches masked by `mask`, if given) by the one `encode` provider."""
        assert self.encoder_plugin is not None
        (impl,) = self._impls("encode")
        if mask is not None and "mask" not in impl.argnames:
            raise PluginError(
                f"plugin {impl.plugin_name!r}, hook 'encode': it takes no patch mask (no `mask` argument), and a "
                "plugin of this recipe encodes a masked view"
            )
        scope = self._scope(config, modules, ctx)(impl.plugin_name)
        return self._call("encode", impl, modules=modules, view=view, mask=mask, **scope)

    def decode(
        self, modules: nn.ModuleDict, encoding: Encoding, ctx: StepContext | None, config: Recipe
    ) -> torch.Tensor:
        """The reconstruction of `encoding` by the one `decode` provider."""
        if self.decoder_plugin is None:
            raise PluginError("hook 'decode': no plugin of this recipe implements it (a decoder)")
        (impl,) = self._impls("decode")
        scope = self._scope(config, modules, ctx)
        return self._call("decode", impl, modules=modules, encoding=encoding, **scope(impl.plugin_name))

    def regularize(self, modules: nn.ModuleDict, ctx: StepContext) -> dict[str, dict[str, torch.Tensor]]:
        return self._collect("regularize", dict, self._scope(ctx.config, modules, ctx), modules=modules)

    def auxiliary_head(self, modules: nn.ModuleDict, ctx: StepContext) -> dict[str, dict[str, torch.Tensor]]:
        return self._collect("auxiliary_head", dict, self._scope(ctx.config, modules, ctx), modules=modules)

    # -- the loop ------------------------------------------------------------------------

    def check_launch(self, deepspeed: bool) -> None:
        """Refuse, in one line, a hook this launch cannot call: `on_after_backward` under DeepSpeed (its
        backward steps the optimizer too, and ZeRO keeps the gradients out of `.grad`)."""
        if deepspeed and (names := [impl.plugin_name for impl in self._impls("on_after_backward")]):
            raise PluginError(
                f"plugin {names[0]!r}, hook 'on_after_backward': not supported under DeepSpeed, whose backward "
                "steps the optimizer too (launch without --use_deepspeed, or leave the plugin out)"
            )

    def on_train_start(self, modules: nn.ModuleDict, step: int, config: Recipe, encoder: nn.Module) -> None:
        self._loop_hook("on_train_start", modules, step, config, encoder)

    def on_after_backward(self, modules: nn.ModuleDict, step: int, config: Recipe, encoder: nn.Module) -> None:
        self._loop_hook("on_after_backward", modules, step, config, encoder)

    def on_train_step_end(self, modules: nn.ModuleDict, step: int, config: Recipe, encoder: nn.Module) -> None:
        self._loop_hook("on_train_step_end", modules, step, config, encoder)

    def _loop_hook(self, hook: str, modules: nn.ModuleDict, step: int, config: Recipe, encoder: nn.Module) -> None:
        """The training loop's hooks share their arguments; results are ignored."""
        scope = self._scope(config, modules)
        self._collect(hook, None, scope, modules=modules, step=step, config=config, encoder=encoder)

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
