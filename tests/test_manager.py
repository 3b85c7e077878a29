"""The plugin manager: loading by name, entry points, and errors that name the plugin and hook."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from framework import hookimpl
from framework.cli import main
from framework.manager import PluginError, PluginHooks
from framework.registry import discover, load_plugin
from framework.startup import validate
from framework.testing import run_steps, tiny_recipe, write_recipe

NO_SHARDS = {"train": "none.tar", "test": "none.tar"}


def test_builtins_load_by_name_and_unknown_names_list_the_known_ones():
    assert load_plugin("kl").__name__ == "plugins.kl"
    with pytest.raises(PluginError, match=r"unknown plugin 'nope' \(known: .*backbones.*kl"):
        load_plugin("nope")


class BadSignature:
    @hookimpl
    def regularize(self, modules, ctx, not_an_argument):
        return {}


def test_a_hookimpl_with_a_wrong_signature_names_plugin_and_hook():
    with pytest.raises(PluginError, match=r"plugin 'bad'.*regularize.*not_an_argument"):
        PluginHooks(["backbones"], extra={"bad": BadSignature()})


class Misspelt:
    @hookimpl
    def regularise(self, ctx):  # British spelling: not a hook
        return {}


def test_an_unknown_hook_name_is_reported_by_check_pending():
    with pytest.raises(PluginError, match=r"plugin 'typo'.*unknown hook 'regularise'"):
        PluginHooks(["backbones"], extra={"typo": Misspelt()})


class Wrapper:
    @hookimpl(hookwrapper=True)
    def regularize(self, ctx):
        yield


class First:
    @hookimpl(tryfirst=True)
    def regularize(self, ctx):
        return {}


@pytest.mark.parametrize(("plugin", "mark"), [(Wrapper(), "hookwrapper"), (First(), "tryfirst")])
def test_pluggy_ordering_and_wrapping_markers_are_refused_in_one_line(plugin, mark):
    with pytest.raises(
        PluginError, match=rf"plugin 'odd', hook 'regularize': @hookimpl\({mark}=True\) is not supported"
    ):
        PluginHooks(["backbones"], extra={"odd": plugin})


class Scoped:
    """Records what the scoped arguments `cfg` and `own` are, for each hook that gets them."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple] = {}

    @hookimpl
    def build_modules(self, cfg, encoder):
        self.seen["build_modules"] = (cfg, encoder)
        return {"head": torch.nn.Linear(encoder.num_features, 2)}

    @hookimpl
    def augment(self, cfg):
        self.seen["augment"] = (cfg,)
        return {}

    @hookimpl
    def regularize(self, cfg, own, ctx):
        self.seen["regularize"] = (cfg, own, ctx.encoder)
        return {"zero": own["head"](ctx.encode("x").h).sum() * 0}

    @hookimpl
    def on_train_start(self, cfg, own, encoder):
        self.seen["on_train_start"] = (cfg, own, encoder)

    @hookimpl
    def on_after_backward(self, cfg, own, encoder):
        self.seen["on_after_backward"] = (cfg, own, encoder)

    @hookimpl
    def on_train_step_end(self, cfg, own, encoder):
        self.seen["on_train_step_end"] = (cfg, own, encoder)


def test_hooks_receive_their_own_section_and_modules(tmp_path, fmnist_shards):
    from framework.model import Model
    from framework.startup import validate

    spy = Scoped()
    recipe, hooks = validate(tiny_recipe(tmp_path, fmnist_shards), extra_plugins={"spy": spy})
    model = Model(hooks, recipe)
    cfg, encoder = spy.seen["build_modules"]
    assert cfg is recipe.plugins["spy"] and encoder is model.encoder is model.plugins["backbones"]["encoder"]
    model(model.context({"x": torch.randn(2, 1, 28, 28)}, {}).views, {})
    cfg, own, ctx_encoder = spy.seen["regularize"]
    assert cfg is recipe.plugins["spy"] and own is model.plugins["spy"] and ctx_encoder is model.encoder
    hooks.augment(recipe)
    assert spy.seen["augment"] == (recipe.plugins["spy"],)
    for hook in ("on_train_start", "on_after_backward", "on_train_step_end"):
        getattr(hooks, hook)(model.plugins, 1, recipe, model.encoder)
        assert spy.seen[hook] == (recipe.plugins["spy"], model.plugins["spy"], model.encoder), hook


class Raises:
    @hookimpl
    def auxiliary_head(self, ctx):
        raise RuntimeError("shape mismatch in my head")


class WrongType:
    @hookimpl
    def regularize(self, ctx):
        return torch.tensor(1.0)  # not a dict of terms


@pytest.mark.parametrize(
    "plugin, expected",
    [
        (Raises(), r"plugin 'broken', hook 'auxiliary_head': RuntimeError: shape mismatch in my head"),
        (WrongType(), r"plugin 'broken', hook 'regularize': returned Tensor, expected dict"),
    ],
)
def test_a_broken_hook_at_run_time_names_plugin_and_hook(plugin, expected, tmp_path, fmnist_shards):
    with pytest.raises(PluginError, match=expected):
        run_steps(tiny_recipe(tmp_path, fmnist_shards), steps=1, extra_plugins={"broken": plugin})


def _install(site: Path, monkeypatch, module: str, source: str, entry: str) -> None:
    """A distribution `module` (its module and metadata) in the folder `site`, put on sys.path: as pip installs
    a package whose pyproject.toml names `entry` (`name = module`) in the `augssl` entry-point group."""
    (site / f"{module}.py").parent.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    dist = site / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[augssl]\n{entry}\n")
    monkeypatch.syspath_prepend(str(site))


def test_third_party_plugins_come_from_the_entry_point_group(tmp_path, monkeypatch, fmnist_shards):
    source = """
        from framework import PluginConfig, hookimpl

        class Config(PluginConfig):
            scale: float = 1.0

        @hookimpl
        def config_schema():
            return Config

        @hookimpl
        def regularize(ctx, cfg):
            return {"l2": cfg.scale * ctx.encode("x").h.pow(2).mean()}
    """
    _install(tmp_path / "site", monkeypatch, "thirdparty_l2", source, "l2 = thirdparty_l2")
    assert discover()["l2"].startswith("entry point thirdparty_l2")
    from framework.logging import read_metrics
    from framework.testing import CONV28

    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins={"backbones": CONV28, "l2": {"scale": 0.5}})
    out = run_steps(recipe, steps=1)
    assert "l2.l2" in read_metrics(out)[-1]
    sys.modules.pop("thirdparty_l2", None)


def test_an_entry_point_named_like_a_built_in_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """A third-party `kl` beside the built-in one was silently ignored (the built-in won): a recipe naming `kl`
    is now refused in one line naming both, before either is imported; recipes without `kl` are unaffected."""
    _install(tmp_path / "site", monkeypatch, "shadow_kl", "raise ImportError('never imported')", "kl = shadow_kl")
    assert discover()["kl"] == "built-in and entry point shadow_kl (shadow-kl)"
    claimed = "plugin 'kl' is claimed by the built-in and by the entry point shadow_kl (shadow-kl): uninstall one"
    with pytest.raises(PluginError, match=re.escape(claimed)):
        load_plugin("kl")
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, NO_SHARDS))
    with pytest.raises(SystemExit) as exc:
        main(["train", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip().splitlines() == [
        f"augssl: error: {path}: plugins: {claimed}, or rename the entry point"
    ]
    validate(tiny_recipe(tmp_path, NO_SHARDS, plugins={"backbones": {"encoder": "conv28"}}), check_data=False)
    assert "shadow_kl" not in sys.modules
