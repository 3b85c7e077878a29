"""The plugin contract: a plugin names only its own things (the engine scopes them), the built-in plugins use only
the public API (`framework` and `plugins.blocks`), capabilities are typed and checked, `all_reduce` and
`gather_with_grad` agree across processes (without a deprecation warning)."""

from __future__ import annotations

import ast
import os
import socket
import warnings
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import Field
from torch import nn

import framework
import plugins.blocks
from framework import PluginConfig, View, all_reduce, gather_with_grad, hookimpl
from framework.logging import read_metrics
from framework.model import Model
from framework.recipe.loading import RecipeError
from framework.registry import BUILTIN_PLUGINS
from framework.startup import validate
from framework.testing import CONV28, run_steps, step_context, tiny_recipe, write_recipe
from tests.helpers import ENV, one_line

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# Scoped names: one plugin, two names
# ---------------------------------------------------------------------------


class TwinConfig(PluginConfig):
    shift: int = Field(1, ge=0)


class Roll:
    """A view of the clean tensor rolled by `shift` pixels along the width; its parameter is the shift."""

    def __init__(self, shift: int) -> None:
        self.shift = shift

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return image.roll(self.shift, dims=-1), torch.tensor([float(self.shift)])


class Twin:
    """A plugin with its own section, module, view, params, metric and preview image, all named short."""

    @hookimpl
    def config_schema(self) -> type[PluginConfig]:
        return TwinConfig

    @hookimpl
    def build_modules(self, encoder: nn.Module) -> dict[str, nn.Module]:
        return {"head": nn.Linear(encoder.num_features, 1)}

    @hookimpl
    def augment(self, cfg: TwinConfig) -> dict[str, View]:
        return {"rolled": View(Roll(cfg.shift), source="x")}

    @hookimpl
    def auxiliary_head(self, ctx, cfg: TwinConfig, own: nn.ModuleDict) -> dict[str, torch.Tensor]:
        assert torch.equal(ctx.views["rolled"], ctx.views["x"].roll(cfg.shift, dims=-1))
        ctx.metrics["shift"] = ctx.params["rolled"].mean().detach()
        if ctx.preview:
            ctx.images["rolled"] = ctx.views["rolled"].detach()
        return {"mse": own["head"](ctx.encode("rolled").h.detach()).pow(2).mean()}


def test_one_plugin_object_under_two_names_keeps_two_sets_of_names(tmp_path, fmnist_shards):
    twin = Twin()  # the same object twice: pluggy registers an object once, augssl registers each name's copy
    plugins = {"backbones": CONV28, "kl": {}, "left": {"shift": 1}, "right": {"shift": 3}}
    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins=plugins)
    out = run_steps(recipe, steps=2, extra_plugins={"left": twin, "right": twin})
    last = read_metrics(out)[-1]
    assert last["left.shift"] == 1.0 and last["right.shift"] == 3.0
    assert last["left.mse"] >= 0 and last["right.mse"] >= 0

    cfg, hooks = validate(recipe, extra_plugins={"left": twin, "right": twin})
    model = Model(hooks, cfg)
    assert {"left", "right"} <= set(model.plugins) and model.plugins["left"]["head"] is not model.plugins["right"][
        "head"
    ]
    x = torch.rand(2, 1, 28, 28)
    views = {"x": x, "left.rolled": x.roll(1, dims=-1), "right.rolled": x.roll(3, dims=-1)}
    params = {"left.rolled": torch.ones(2, 1), "right.rolled": torch.full((2, 1), 3.0)}
    terms, metrics = model(views, params, preview=True)
    assert {"left.mse", "right.mse"} <= set(terms) and {"left.shift", "right.shift"} <= set(metrics)
    assert {"left.rolled", "right.rolled", "kl.recon"} <= set(model.preview_images)


class Misnamed:
    """Names its metric with its own prefix, as plugins did before the engine scoped names."""

    @hookimpl
    def auxiliary_head(self, ctx) -> dict[str, torch.Tensor]:
        ctx.metrics["misnamed.acc"] = torch.zeros(())
        return {}


def test_a_metric_named_with_the_plugins_prefix_says_the_short_name(tmp_path, fmnist_shards):
    recipe = tiny_recipe(tmp_path, fmnist_shards)
    with pytest.raises(Exception, match=r"ctx.metrics 'misnamed.acc': .* use 'acc'"):
        run_steps(recipe, steps=1, extra_plugins={"misnamed": Misnamed()})


class BadView:
    @hookimpl
    def augment(self) -> dict[str, View]:
        return {"badview.v1": View(Roll(1))}


def test_a_view_named_with_a_dot_is_refused_in_one_line(tmp_path, fmnist_shards):
    with pytest.raises(Exception, match=r"plugin 'badview', hook 'augment': view 'badview.v1': .* use 'v1'"):
        run_steps(tiny_recipe(tmp_path, fmnist_shards), steps=1, extra_plugins={"badview": BadView()})


# ---------------------------------------------------------------------------
# The public API: the built-in plugins use nothing else
# ---------------------------------------------------------------------------


def _augssl_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """`(module, names, line)` of every import of a `framework` or `plugins` module in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("framework", "plugins"):
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in ("framework", "plugins")]
    return found


@pytest.mark.parametrize("name", BUILTIN_PLUGINS)
def test_a_builtin_plugin_imports_only_the_public_api(name):
    path = ROOT / "plugins" / f"{name}.py"
    for module, names, line in _augssl_imports(path):
        where = f"plugins/{name}.py:{line}: from {module} import {names}"
        assert module in ("framework", "plugins.blocks"), f"{where}: import from framework or plugins.blocks only"
        public = framework.__all__ if module == "framework" else plugins.blocks.__all__
        assert set(names) <= set(public), f"{where}: {sorted(set(names) - set(public))} not in {module}.__all__"


@pytest.mark.parametrize("path", sorted((ROOT / "plugins" / "blocks").glob("*.py")), ids=lambda p: p.name)
def test_the_building_blocks_import_only_the_framework_api_and_each_other(path):
    for module, names, line in _augssl_imports(path):
        where = f"plugins/blocks/{path.name}:{line}: from {module} import {names}"
        assert module == "framework" or module.startswith("plugins.blocks"), where
        if module == "framework":
            assert set(names) <= set(framework.__all__), f"{where}: not in framework.__all__"


def test_every_public_name_exists_and_the_api_is_versioned():
    assert framework.API_VERSION >= (1, 0)
    for module in (framework, plugins.blocks):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert not missing, f"{module.__name__}.__all__ names {missing}, which it does not define"


@pytest.mark.parametrize("name", BUILTIN_PLUGINS)
def test_no_builtin_plugin_spells_its_own_name(name):
    """The engine scopes names: a plugin that wrote `"<its name>.v1"` would break under another name."""
    text = (ROOT / "plugins" / f"{name}.py").read_text()
    strings = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    literals = [s.value for s in strings if s.value.startswith(f"{name}.")]
    docstrings = {
        ast.get_docstring(n) for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef | ast.Module)
    }
    assert not [s for s in literals if s not in docstrings], f"plugins/{name}.py names its own things: {literals}"
    assert "\nNAME = " not in text


# ---------------------------------------------------------------------------
# Capabilities: typed, and checked when the recipe is validated
# ---------------------------------------------------------------------------


class _Declares:
    """A plugin whose recipe section is `schema`."""

    def __init__(self, schema: type[PluginConfig]) -> None:
        self.schema = schema

    @hookimpl
    def config_schema(self) -> type[PluginConfig]:
        return self.schema


class FullViewName(PluginConfig):
    augmented_view: ClassVar[str] = "mydistill.v1"


class NotAString(PluginConfig):
    augmented_view: ClassVar = 3


class NotAMethod(PluginConfig):
    elbo_likelihood: ClassVar[str] = "gaussian"


class NotAscii(PluginConfig):
    augmented_view: ClassVar[str] = "v\u00e9"


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (FullViewName, "augmented_view 'mydistill.v1' must be the short name of one of the plugin's own views"),
        (NotAString, "augmented_view (capability AugmentedViews): must be a str, got 3"),
        (NotAMethod, "elbo_likelihood (capability StandsForELBO): must be a method"),
        (NotAscii, "augmented_view 'v\u00e9' must be the short name"),
    ],
)
def test_a_wrongly_declared_capability_is_one_line_at_validation(tmp_path, schema, message):
    recipe = tiny_recipe(tmp_path, {"train": "none.tar", "test": "none.tar"})
    with pytest.raises(RecipeError) as err:
        validate(recipe, check_data=False, extra_plugins={"mydistill": _Declares(schema)})
    assert str(err.value).startswith("plugins.mydistill: ") and message in str(err.value)
    assert "\n" not in str(err.value)


class FieldNamedLikeAMember(PluginConfig):
    kl_factor: float = 0.5  # the user's setting, not PriorKLSchedule's method


def test_a_recipe_field_named_like_a_capabilitys_member_claims_nothing(tmp_path):
    """A section's own setting that happens to share a member's name neither fails validation nor makes the
    plugin a provider (consistency would call the float)."""
    sections = {"backbones": {"encoder": "conv28"}, "kl": {}, "consistency": {"lambda": 1.0}, "mine": {}}
    recipe = tiny_recipe(tmp_path, {"train": "none.tar", "test": "none.tar"}, plugins=sections)
    cfg, _ = validate(recipe, check_data=False, extra_plugins={"mine": _Declares(FieldNamedLikeAMember)})
    assert cfg.plugins["mine"].kl_factor == 0.5
    assert list(cfg.providers(plugins.blocks.PriorKLSchedule)) == ["kl"]


def test_a_plugins_metrics_answer_membership_for_any_name(tmp_path):
    """`ctx.metrics` is a mapping: `in` and `get` answer for a name the plugin could not set (another
    plugin's full name), and only setting one is an error."""
    ctx = step_context(None, {"x": torch.zeros(1)}, plugin="mine")
    ctx.metrics["acc"] = torch.ones(())
    assert "acc" in ctx.metrics and "simclr.loss" not in ctx.metrics and ctx.metrics.get("simclr.loss") is None
    with pytest.raises(ValueError, match="use 'acc'"):
        ctx.metrics["mine.acc"] = torch.ones(())
    del ctx.metrics["acc"]
    assert "acc" not in ctx.metrics


def test_all_reduce_refuses_an_unknown_op_and_an_integer_mean():
    with pytest.raises(ValueError, match="op must be sum, mean, max or min, got 'avg'"):
        all_reduce(torch.ones(2), "avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the mean of a torch.int64 tensor"):
        all_reduce(torch.ones(2, dtype=torch.long), "mean")


def test_builtin_sections_have_the_capabilities_they_claim(tmp_path):
    sections = {"backbones": {"encoder": "conv28"}, "kl": {}, "aavae": {}, "consistency": {"lambda": 1.0}}
    recipe, _ = validate(tiny_recipe(tmp_path, {"train": "none.tar", "test": "none.tar"}, plugins=sections), False)
    assert list(recipe.providers(plugins.blocks.StandsForELBO)) == ["kl", "aavae"]
    assert list(recipe.providers(plugins.blocks.AugmentedViews)) == ["aavae", "consistency"]
    assert list(recipe.providers(plugins.blocks.PriorKLSchedule)) == ["kl"]
    sections = {"backbones": {"encoder": "conv28"}, "simclr": {"crops": {"global": {"count": 2}}}, "byol": {}}
    recipe, _ = validate(tiny_recipe(tmp_path, {"train": "none.tar", "test": "none.tar"}, plugins=sections), False)
    assert list(recipe.providers(plugins.blocks.CropSizes)) == ["simclr", "byol"]


THIRD_PARTY = """
from typing import ClassVar
from framework import PluginConfig, View, hookimpl
from framework.views import clean_view

class Section(PluginConfig):
    augmented_view: ClassVar[str] = {declared!r}

@hookimpl
def config_schema():
    return Section

@hookimpl
def augment(config):
    return {{{view!r}: View(clean_view(28, config.data.mean, config.data.std, 1))}}
"""


def _installed(site: Path, declared: str, view: str) -> Path:
    """A third-party plugin `mydistill` in `site`, found by its entry point as an installed package is."""
    site.mkdir(parents=True)
    (site / "mydistill_plugin.py").write_text(THIRD_PARTY.format(declared=declared, view=view))
    info = site / "augssl_mydistill-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: augssl-mydistill\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[augssl]\nmydistill = mydistill_plugin\n")
    return site


@pytest.mark.slow
@pytest.mark.parametrize(
    ("declared", "view", "message"),
    [
        (
            "mydistill.v1",
            "v1",
            "plugins.mydistill: Value error, capability AugmentedViews: augmented_view 'mydistill.v1' must be",
        ),
        ("v3", "v1", "hook 'augment': view 'affine.view': source 'mydistill.v3' is not a view"),
        (
            "v1",
            "mydistill.v1",
            "plugin 'mydistill', hook 'augment': view 'mydistill.v1': a plugin names its own by a short name",
        ),
    ],
)
def test_a_third_party_plugins_wrong_names_are_one_line_before_the_run_folder(
    tmp_path, fmnist_shards, declared, view, message
):
    site = _installed(tmp_path / "site", declared, view)
    plugins = {"backbones": CONV28, "kl": {}, "mydistill": {}, "affine": {}}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards, plugins=plugins))
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    assert message in one_line([recipe], env=env)
    assert not (tmp_path / "run" / "recipe.yaml").exists()  # nothing written: the run never started


# ---------------------------------------------------------------------------
# all_reduce: one process == two processes
# ---------------------------------------------------------------------------


def _reduce_on_rank(rank: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = torch.arange(8, dtype=torch.float32).view(4, 2)  # the global batch; rank r holds rows 2r, 2r+1
        local = rows[2 * rank : 2 * rank + 2].clone().requires_grad_()
        out = {op: all_reduce(local.sum(0), op) for op in ("sum", "mean", "max", "min")}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gathered = gather_with_grad(local)  # (4, 2) on every rank: the global batch, in rank order
        seen: list[torch.Tensor] = []
        gathered.register_hook(seen.append)  # the gradient the gather receives, kept by reference
        (gathered * torch.arange(1.0, 9.0).view(4, 2)).sum().backward()
        gather = {"rows": gathered.tolist(), "grad": local.grad.tolist(), "warnings": [str(w.message) for w in caught]}
        gather["incoming"] = seen[0].tolist()  # untouched by the backward's all-reduce
        detached = all(not v.requires_grad for v in out.values())
        queue.put((rank, {op: v.tolist() for op, v in out.items()}, detached, gather))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_and_gather_of_two_processes_equal_one_process_over_the_whole_batch():
    rows = torch.arange(8, dtype=torch.float32).view(4, 2)
    one = all_reduce(rows.sum(0), "sum")  # one process: a copy
    assert torch.equal(one, rows.sum(0)) and not one.requires_grad
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_reduce_on_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=300)
    halves = [rows[0:2].sum(0), rows[2:4].sum(0)]
    weights = torch.arange(1.0, 9.0).view(4, 2)
    for rank, values, detached, gather in results:
        assert detached
        assert gather["rows"] == rows.tolist() and not gather["warnings"]
        assert gather["incoming"] == weights.tolist()
        assert gather["grad"] == (2 * weights[2 * rank : 2 * rank + 2]).tolist()  # both ranks' gradients, summed
        assert values["sum"] == one.tolist()
        assert values["mean"] == (one / 2).tolist()
        assert values["max"] == torch.maximum(*halves).tolist() and values["min"] == torch.minimum(*halves).tolist()
