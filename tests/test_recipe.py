"""Recipes: inheritance, overrides, and malformed recipes that must start nothing."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import ClassVar, Protocol

import pytest
import yaml
from pydantic import BaseModel
from torchvision.transforms import v2

from framework import PluginConfig, Recipe, Scheduled, capability, hookimpl
from framework.cli import main
from framework.data.pipeline import clean_x_view
from framework.manager import PluginHooks
from framework.recipe.loading import MAX_EXTENDS, RecipeError, apply_overrides, deep_merge, load_raw
from framework.startup import load_recipe, validate
from framework.testing import tiny_recipe, write_recipe

ROOT = Path(__file__).resolve().parents[1]
NO_SHARDS = {"train": "none.tar", "test": "none.tar"}


def test_deep_merge_lists_replace_dicts_merge():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    assert deep_merge(base, {"a": {"y": [3]}, "c": 2}) == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}


def test_precedence_cli_over_recipe_over_extends_over_defaults(tmp_path, fmnist_shards):
    parent = tiny_recipe(tmp_path, fmnist_shards, train={"seed": 7}, optim={"lr": 0.5})
    write_recipe(tmp_path / "parent.yaml", parent)
    write_recipe(tmp_path / "child.yaml", {"extends": "parent.yaml", "optim": {"lr": 0.25}})
    recipe, _ = load_recipe(tmp_path / "child.yaml", ["train.seed=9", "plugins.kl.beta=4"])
    assert recipe.optim.lr == 0.25  # recipe over extends
    assert recipe.train.seed == 9  # CLI over extends
    assert recipe.plugins["kl"].beta == 4.0  # CLI into a plugin section
    assert recipe.optim.optimizer == "adam"  # engine default
    assert recipe.plugins["kl"].likelihood == "gaussian"  # plugin default


def test_override_values_are_parsed_as_yaml():
    out = apply_overrides({}, ["a.b=3", "a.c=1.0e-3", "a.d=[1, 2]", "a.e=null", "a.f=text"])
    assert out == {"a": {"b": 3, "c": 1e-3, "d": [1, 2], "e": None, "f": "text"}}


def test_mixed_precision_no_survives_yaml_reading_it_as_false(tmp_path, fmnist_shards):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards))
    recipe, _ = load_recipe(path, ["distributed.mixed_precision=no"], check_data=False)
    assert recipe.distributed.mixed_precision == "no"


def test_a_null_plugin_section_removes_an_inherited_plugin(tmp_path, fmnist_shards):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards))
    recipe, hooks = load_recipe(path, ["plugins.kl=null"], check_data=False)
    assert list(recipe.plugins) == ["backbones"] and hooks.names == ["backbones"]


def test_shipped_recipes_validate():
    for path in sorted((ROOT / "recipes").glob("[!_]*.yaml")):
        load_recipe(path, check_data=False)


@pytest.mark.parametrize("method", ["simclr", "byol", "barlow"])
@pytest.mark.parametrize("dataset", ["cifar10", "stl10"])
def test_contrastive_recipes_use_resnet18_with_the_stem_and_views_of_their_image_size(method, dataset):
    cfg, _ = load_recipe(ROOT / "recipes" / f"{method}_{dataset}.yaml", check_data=False)
    bb = cfg.plugins["backbones"]
    assert (bb.encoder, bb.latent_dim, bb.decoder) == ("resnet18", None, None)
    assert bb.stem == {32: "cifar", 96: "stl"}[cfg.data.image_size]
    solo = {"simclr": "solo_symmetric", "byol": "solo_asymmetric", "barlow": "solo_asymmetric"}[method]
    assert cfg.plugins[method].strength == {32: solo, 96: "stl"}[cfg.data.image_size]
    assert cfg.distributed.sync_batchnorm  # BN over the global batch on multi-GPU runs


# The settings of vturrisi/solo-learn scripts/pretrain/cifar/{simclr,byol,barlow}.yaml, whose CIFAR-10 figures
# (90.74, 92.58, 92.10 %) the CIFAR-10 recipes cite; weight 0.1 is Barlow Twins' scale_loss.
SOLO_LEARN_CIFAR = {
    "simclr": {"temperature": 0.2, "proj_hidden_dim": 2048, "output_dim": 256, "strength": "solo_symmetric"},
    "byol": {
        "proj_hidden_dim": 4096,
        "proj_output_dim": 256,
        "pred_hidden_dim": 4096,
        "strength": "solo_asymmetric",
    },
    "barlow": {
        "lambda_offdiag": 0.0051,
        "weight": 0.1,
        "proj_hidden_dim": 2048,
        "proj_output_dim": 2048,
        "strength": "solo_asymmetric",
    },
}


SOLO_LEARN_LARS = {"simclr": (0.4, "linear", 1e-4), "byol": (1.0, "linear", 1e-5), "barlow": (0.3, "linear", 1e-4)}


@pytest.mark.parametrize("method", sorted(SOLO_LEARN_CIFAR))
def test_cifar10_recipes_that_cite_solo_learn_use_its_settings(method):
    cfg, _ = load_recipe(ROOT / "recipes" / f"{method}_cifar10.yaml", check_data=False)
    section = cfg.plugins[method]
    assert {key: getattr(section, key) for key in SOLO_LEARN_CIFAR[method]} == SOLO_LEARN_CIFAR[method]
    assert (cfg.data.batch_size, cfg.train.steps, cfg.optim.warmup_steps) == (256, 1000 * 195, 10 * 195)
    if method == "byol":  # solo-learn's base_tau 0.99, final_tau 1.0: the EMA teacher's momentum
        assert cfg.teacher.momentum == Scheduled(start=0.99, end=1.0, shape="cosine")
    assert cfg.optim.schedule == "cosine" and cfg.plugins["backbones"].encoder == "resnet18"
    t = cfg.optim  # solo-learn's LARS: its lr per 256 images, weight decay, eta 0.02, clip_lr
    optimiser = (t.optimizer, t.lr, t.lr_scaling, t.weight_decay, t.lars_eta, t.lars_clip)
    assert optimiser == ("lars", *SOLO_LEARN_LARS[method], 0.02, True)


STEPS_COMMENT = re.compile(
    r"^  steps: (\d+) +# (\d+) epochs x (\d+) steps \((\d+) //? \(?(\d+)(?: x (\d+) GPUs\))?", re.M
)
WARMUP_COMMENT = re.compile(r"^  warmup_steps: (\d+) +# .*?(\d+) (?:warm-up )?epochs", re.M)


def test_step_counts_are_the_epochs_the_comments_say():
    """Each recipe's `steps: N  # E epochs x M steps (IMAGES // BATCH [x G GPUs])` is right: M = IMAGES // (BATCH x G)
    and N = E x M (3200 AAVAE epochs of 195 steps are 624,000), and `warmup_steps: W  # ... K epochs` is K x M."""
    checked = 0
    for path in sorted((ROOT / "recipes").glob("[!_]*.yaml")):
        text = path.read_text()
        cfg, _ = load_recipe(path, check_data=False)
        if match := STEPS_COMMENT.search(text):
            steps, epochs, per_epoch, images, batch, gpus = (int(g or 1) for g in match.groups())
            assert per_epoch == images // (batch * gpus) and steps == epochs * per_epoch == cfg.train.steps, path.name
            if warmup := WARMUP_COMMENT.search(text):
                assert int(warmup.group(1)) == int(warmup.group(2)) * per_epoch == cfg.optim.warmup_steps, path.name
            checked += 1
        if "3200 epochs" in text:
            assert cfg.train.steps == 3200 * 195 == 624_000, path.name
    assert checked >= 15  # every recipe whose comment gives its epoch arithmetic


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("[!_]*_stl10.yaml")), ids=lambda p: p.stem)
def test_stl10_recipes_take_the_aavae_clean_view(path):
    """AAVAE's src/transforms.py: the original x of a 96-px image is Resize(int(96 * 1.1)) + CenterCrop(96);
    CR-VAE's t(x) starts from the same pixels."""
    cfg, hooks = load_recipe(path, check_data=False)
    assert (cfg.data.resize, cfg.data.image_size) == (105, 96)
    ops = clean_x_view(cfg.data).transform.transforms
    assert [type(t) for t in ops[1:3]] == [v2.Resize, v2.CenterCrop] and ops[1].size == [105]
    if "consistency" in cfg.plugins:
        t = hooks.augment(cfg)["consistency.t"].transform.transforms
        assert [type(op) for op in t[:2]] == [v2.Resize, v2.CenterCrop] and t[0].size == [105]


# --- malformed recipes: one line, exit 2, nothing started ----------------------------

BAD = {
    "unknown top-level key": (lambda r: {**r, "trian": {"steps": 2}}, r"trian: Extra inputs are not permitted"),
    "misspelt plugin name": (lambda r: {**r, "plugins": {**r["plugins"], "kll": {}}}, r"unknown plugin 'kll'"),
    "wrong type": (lambda r: deep_merge(r, {"optim": {"lr": "fast"}}), r"optim\.lr: Input should be a valid number"),
    "missing data path": (
        lambda r: deep_merge(r, {"data": {"train": "/nonexistent/x-{0..3}.tar"}}),
        r"data\.train: no such shard: /nonexistent/x-0\.tar \(and 3 more of 4\)",
    ),
    "unknown plugin key": (
        lambda r: deep_merge(r, {"plugins": {"kl": {"bta": 2}}}),
        r"plugins\.kl\.bta: Extra inputs are not permitted",
    ),
    "bad plugin value": (
        lambda r: deep_merge(r, {"plugins": {"kl": {"likelihood": "poisson"}}}),
        r"plugins\.kl\.likelihood: Input should be 'gaussian' or 'bernoulli'",
    ),
    "missing required key": (lambda r: {**r, "train": {}, "optim": {"lr": 1e-3}}, r"train\.steps: Field required"),
    "negative batch size": (
        lambda r: deep_merge(r, {"data": {"batch_size": -4}}),
        r"data\.batch_size: Input should be greater than 0",
    ),
    "no plugins": (lambda r: {**r, "plugins": {}}, r"plugins: a recipe must name at least one plugin"),
    "plugin section not a mapping": (
        lambda r: deep_merge(r, {"plugins": {"kl": 3}}),
        r"plugins\.kl: expected a mapping",
    ),
    "mean of wrong length": (
        lambda r: deep_merge(r, {"data": {"mean": [0.1, 0.2, 0.3]}}),
        r"data\.mean/data\.std: need 1",
    ),
    "missing eval shards": (lambda r: deep_merge(r, {"eval": {"test": "/nope/t.tar"}}), r"eval\.test: no such shard"),
    "unknown optimizer": (
        lambda r: deep_merge(r, {"optim": {"optimizer": "lamb"}}),
        r"optim\.optimizer: Input should be 'adam', 'adamw', 'sgd' or 'lars'",
    ),
    "a key that moved out of train": (
        lambda r: deep_merge(r, {"train": {"lr": 0.1}}),
        r"bad\.yaml: train\.lr moved to optim\.lr$",
    ),
    "another key that moved out of train": (
        lambda r: deep_merge(r, {"train": {"keep_checkpoints": 3}}),
        r"bad\.yaml: train\.keep_checkpoints moved to checkpoint\.keep$",
    ),
}


def test_an_override_of_a_key_that_moved_says_where_it_is_now(tmp_path, fmnist_shards, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards))
    code, err = _run_cli([str(path), "train.log_with=[]"], capsys)
    assert code == 2 and err == f"augssl: error: {path}: train.log_with moved to log.trackers\n"


def _run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    err = capsys.readouterr().err
    return exc.value.code, err


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_recipe_fails_with_one_line_and_starts_nothing(case, tmp_path, fmnist_shards, capsys):
    mutate, expected = BAD[case]
    recipe = mutate(tiny_recipe(tmp_path, fmnist_shards))
    path = write_recipe(tmp_path / "bad.yaml", recipe)
    code, err = _run_cli([str(path)], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("augssl: error: ") and str(path) in err
    assert __import__("re").search(expected, err.strip()), err
    assert not (tmp_path / "run").exists(), "a bad recipe must not create its output folder"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train: [unclosed", r"invalid YAML"),
        ("- a\n- list\n", r"a recipe must be a mapping of sections, got list"),
        ("extends: missing.yaml\n", r"extends: no such recipe"),
    ],
)
def test_malformed_files(text, expected, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, err = _run_cli([str(path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert __import__("re").search(expected, err), err


def test_extends_cycle(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    code, err = _run_cli([str(tmp_path / "a.yaml")], capsys)
    assert code == 2 and "`extends` cycle: a.yaml -> b.yaml -> a.yaml" in err


def test_an_extends_chain_longer_than_the_bound_is_one_line(tmp_path, capsys):
    """17 recipes each extending the next used to be read to any depth (a chain of 1000 was a RecursionError)."""
    for i in range(MAX_EXTENDS + 1):
        (tmp_path / f"r{i}.yaml").write_text(f"extends: r{i + 1}.yaml\n" if i < MAX_EXTENDS else "train: {}\n")
    code, err = _run_cli([str(tmp_path / "r0.yaml")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"r{MAX_EXTENDS - 1}.yaml: extends: a chain of more than {MAX_EXTENDS} recipes (from r0.yaml)" in err
    (tmp_path / f"r{MAX_EXTENDS - 1}.yaml").write_text("train: {}\n")  # 16 recipes: read
    assert load_raw(tmp_path / "r0.yaml") == {"train": {}}


NON_FINITE_PLUGINS = {
    "backbones": {"encoder": "conv28", "latent_dim": None},
    "byol": {},
    "simclr": {"crops": {"local": {"count": 2, "size": 14}}},
    "dino": {},
}


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=.inf",
        "optim.lr=inf",  # a string pydantic would read as a float
        "optim.weight_decay=.inf",
        "optim.weight_decay_end=.nan",
        "optim.lars_eta=.inf",
        "optim.betas=[0.9, .nan]",
        "distributed.grad_clip=.inf",
        "data.mean=[-.inf]",
        "data.stall_seconds=1e999",
        "plugins.backbones.logvar_range=[-.inf, 10]",
        "plugins.byol.weight=.inf",
        "plugins.byol.lr=.inf",
        "teacher.momentum.start=.nan",  # framework.Scheduled, a model nested in a section
        "plugins.dino.student_temp=.nan",
        "plugins.simclr.crops.local.scale=[0.05, .inf]",  # a plugin's own nested model
    ],
)
def test_numbers_in_recipes_must_be_finite(tmp_path, override):
    """Every float of every section, plugin sections and the models nested in them included: `.inf` as a
    learning rate, weight decay, LARS eta or clip used to be accepted."""
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, NO_SHARDS, plugins=NON_FINITE_PLUGINS))
    key = override.partition("=")[0]
    with pytest.raises(RecipeError, match=rf"^{path}: {re.escape(key)}(\.\d)?: Input should be a finite number"):
        load_recipe(path, [override], check_data=False)


def _models(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation names, at any depth (`Scheduled | None`, `dict[str, MultiCrop]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation, *(m for f in annotation.model_fields.values() for m in _models(f.annotation))]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def test_every_model_of_every_section_refuses_non_finite_numbers():
    """What makes the test above hold for fields it does not name: the engine's sections, every built-in
    plugin's section and every model nested in one refuse inf and nan (pydantic's allow_inf_nan)."""
    from framework.registry import BUILTIN_PLUGINS

    schemas = [Recipe, *(PluginHooks([name], require_encoder=False).config_schema()[name] for name in BUILTIN_PLUGINS)]
    models = {m for schema in schemas for m in _models(schema)}
    assert Scheduled in models and len(models) > 15
    assert not [m.__name__ for m in models if m.model_config.get("allow_inf_nan") is not False]


def test_bad_override_syntax(tmp_path, fmnist_shards, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards))
    code, err = _run_cli([str(path), "optim.lr"], capsys)
    assert code == 2 and "override 'optim.lr': expected key.path=value" in err
    with pytest.raises(RecipeError, match=r"override 'optim\.lr\.x=1': optim\.lr is not a section"):
        apply_overrides(yaml.safe_load(path.read_text()), ["optim.lr.x=1"])


# Run `augssl` in a fresh process and print its exit status and which of torch and the plugins it imported.
IMPORTED = (
    "import sys; from framework.cli import main\n"
    "try: main(sys.argv[1:])\n"
    "except SystemExit as e: print(e.code, [m for m in sys.modules if m == 'torch' or m.startswith('plugins.')])"
)


@pytest.mark.parametrize("override", ["plugins.kll.weight=1", "optim.lr=fast", "trian.steps=2", "train.seed=[1"])
def test_a_bad_recipe_is_refused_before_torch_or_a_plugin_is_imported(override):
    """What validation does not need comes after it: a misspelt plugin name cost 4-9 s of CPU (torch,
    torchvision's models, torch._dynamo) before its one line; now a fraction of a second."""
    recipe = ROOT / "recipes" / "vae_fashionmnist.yaml"
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTED, "train", str(recipe), override], capture_output=True, text=True, timeout=300
    )
    assert proc.stdout.strip() == "2 []" and proc.stderr.startswith("augssl: error: "), proc.stdout + proc.stderr


@pytest.mark.slow
def test_launch_script_rejects_a_bad_recipe_in_a_fresh_process(tmp_path, fmnist_shards):
    recipe = deep_merge(tiny_recipe(tmp_path, fmnist_shards), {"plugins": {"kl": {"beta": "high"}}})
    path = write_recipe(tmp_path / "bad.yaml", recipe)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"augssl: error: {path}: plugins.kl.beta: Input should be a valid number, "
        "unable to parse string as a number (got 'high')"
    ]
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_is_not_installed_is_a_one_line_error_before_anything_starts(tmp_path, fmnist_shards):
    import importlib.util

    recipe = tiny_recipe(tmp_path, fmnist_shards, log={"trackers": ["tensorboard", "wandb"]})
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(RecipeError, match=r"^log.trackers: wandb is not installed \(pip install wandb\)$"):
        validate(recipe, check_data=False)
    assert validate(tiny_recipe(tmp_path, fmnist_shards), check_data=False)[0].log.trackers == ["tensorboard"]


def test_epoch_samples_needs_a_resampled_stream(tmp_path, fmnist_shards):
    recipe = tiny_recipe(tmp_path, fmnist_shards, data={"epoch_samples": 100})
    with pytest.raises(RecipeError, match="data.epoch_samples applies to resampled streams"):
        validate(recipe)
    validate(tiny_recipe(tmp_path, fmnist_shards, data={"epoch_samples": 100, "resampled": True}))


class _Section:
    """A plugin that only registers `schema` as its recipe section."""

    def __init__(self, schema: type[PluginConfig]) -> None:
        self.schema = schema

    @hookimpl
    def config_schema(self) -> type[PluginConfig]:
        return self.schema


@capability()
class _TestTerms(Protocol):
    """A capability of the test: the plugin's terms are test terms."""

    test_terms: ClassVar[str]


class _Provides(PluginConfig):
    test_terms: ClassVar[str] = "yes"


def test_providers_are_the_plugins_whose_section_declares_the_capability_in_recipe_order(tmp_path):
    extra = {"zeta": _Section(_Provides), "plain": _Section(PluginConfig), "alpha": _Section(_Provides)}
    recipe, _ = validate(tiny_recipe(tmp_path, {"train": "none.tar", "test": "none.tar"}), False, extra)
    assert list(recipe.plugins) == ["backbones", "kl", "zeta", "plain", "alpha"]
    assert list(recipe.providers(_TestTerms)) == ["zeta", "alpha"]
    assert recipe.providers(_TestTerms)["zeta"] is recipe.plugins["zeta"]
    assert isinstance(recipe.plugins["alpha"], _TestTerms) and not isinstance(recipe.plugins["plain"], _TestTerms)
