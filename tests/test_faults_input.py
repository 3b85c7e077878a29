"""Bad input is one line and exit 2, and creates nothing: recipes that would exhaust memory, DeepSpeed
keys DeepSpeed would silently ignore, an empty output folder, an export to where nothing can be written."""

from __future__ import annotations

import math
import os

import pytest
import yaml

from framework.logging import read_metrics
from framework.recipe.loading import RecipeError, apply_overrides
from framework.startup import load_recipe, validate
from framework.testing import CONV28, run_steps, tiny_recipe, tiny_shards, write_recipe
from tests.helpers import ENV, ROOT, asset_samples, augssl, one_line

NO_SHARDS = {"train": "none.tar", "test": "none.tar"}


# Nine levels of nine aliases: 9^9 values once expanded (validation, recipe.yaml), in a few hundred characters.
LEVELS = ["l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
LEVELS += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
LAUGHS = "{" + ", ".join(LEVELS) + "}"
DEEP = "[" * 60 + "]" * 60  # nested 60 levels deep (PyYAML itself recurses past ~300)


@pytest.mark.slow
def test_a_billion_laughs_recipe_stops_before_it_expands(tmp_path):
    """Refused at once, in a recipe file and in an override: under `train.seed` the error's own message used to
    expand it (a hang), under `distributed.deepspeed` it passed validation, created the run folder and its lock
    and exhausted memory writing recipe.yaml."""
    path = tmp_path / "laughs.yaml"
    path.write_text(
        f"extends: {ROOT / 'recipes' / 'vae_fashionmnist.yaml'}\n"
        f"output_dir: {tmp_path / 'run'}\ndistributed:\n  deepspeed: {LAUGHS}\n"
    )
    assert "the recipe expands to more than 100000 values (YAML aliases?)" in one_line([path])
    recipe = ROOT / "recipes" / "vae_fashionmnist.yaml"
    for key in ("train.seed", "distributed.deepspeed.wall_clock_breakdown"):
        line = one_line([recipe, f"output_dir={tmp_path / 'run'}", f"{key}={LAUGHS}"])
        assert f"override {key}: the value expands to more than 100000 values" in line
    assert not (tmp_path / "run").exists()


def test_every_free_form_value_and_the_whole_recipe_are_bounded(tmp_path):
    """The bound holds for what validation receives, however it was assembled: a free-form mapping holding
    a million values (one list shared 1000 times), a recipe nested 60 levels deep, an override's value."""
    shared = list(range(1000))
    big = tiny_recipe(tmp_path, NO_SHARDS, distributed={"deepspeed": {"wall_clock_breakdown": [shared] * 1000}})
    with pytest.raises(RecipeError, match="the recipe expands to more than 100000 values"):
        validate(big, check_data=False)
    with pytest.raises(RecipeError, match="the recipe is nested deeper than 50 levels"):
        validate(tiny_recipe(tmp_path, NO_SHARDS, train={"seed": yaml.safe_load(DEEP)}), check_data=False)
    for value, message in ((LAUGHS, "expands to more than 100000"), (DEEP, "is nested deeper than 50 levels")):
        with pytest.raises(RecipeError, match=f"override plugins.backbones.timm_kwargs: the value {message}"):
            apply_overrides({}, [f"plugins.backbones.timm_kwargs={value}"])
    with pytest.raises(RecipeError, match="override train.seed: the value is nested deeper than 50 levels"):
        apply_overrides({}, ["train.seed=" + "[" * 2000 + "]" * 2000])  # past what PyYAML can parse


def test_a_recipe_file_nested_past_what_yaml_can_read_is_one_line(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("train: {seed: " + "[" * 2000 + "]" * 2000 + "}\n")
    with pytest.raises(RecipeError, match=r"deep.yaml: nested deeper than 50 levels$"):
        load_recipe(path, check_data=False)


@pytest.mark.slow
def test_a_backbone_refusing_its_options_or_its_file_is_one_line_and_leaves_no_run_folder(tmp_path, fmnist_shards):
    """A timm_kwargs key a CNN does not take was a traceback, a `pretrained` file that is not safetensors (nor a
    torch file) too, each after the run folder and its lock were made: now one line naming the key, no folder."""
    (tmp_path / "weights.safetensors").write_bytes(b"not safetensors")
    cases = {
        "timm_kwargs": {"encoder": "timm/resnet18", "timm_kwargs": {"drop_rate_typo": 0.1}},
        "pretrained": {"encoder": "conv28", "pretrained": str(tmp_path / "weights.safetensors")},
    }
    for key, backbone in cases.items():
        recipe = tiny_recipe(tmp_path / key, fmnist_shards, plugins={"backbones": {**CONV28, **backbone}, "kl": {}})
        line = one_line([write_recipe(tmp_path / f"{key}.yaml", recipe)])
        assert f"ValueError: plugins.backbones.{key}: " in line
        assert not (tmp_path / key / "run").exists()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"zero_optimisation": {"stage": 2}}, "zero_optimisation: not a DeepSpeed config key"),
        (
            {"zero_optimization": {"stage": 3, "stage3_param_persistance_threshold": 0}},
            "zero_optimization.stage3_param_persistance_threshold: Extra inputs are not permitted",
        ),
    ],
)
def test_a_deepspeed_key_deepspeed_would_ignore_is_a_recipe_error(tmp_path, section, message):
    with pytest.raises(RecipeError, match=f"distributed.deepspeed: .*{message}"):
        validate(tiny_recipe(tmp_path, NO_SHARDS, distributed={"deepspeed": section}), check_data=False)
    validate(
        tiny_recipe(tmp_path, NO_SHARDS, distributed={"deepspeed": {"zero_optimization": {"stage": 3}}}),
        check_data=False,
    )


def test_an_empty_output_dir_is_a_recipe_error(tmp_path, fmnist_shards):
    for empty in ("", "  "):
        with pytest.raises(RecipeError, match="output_dir"):
            validate(tiny_recipe(tmp_path, fmnist_shards, output_dir=empty))


@pytest.mark.slow
def test_an_export_to_an_unwritable_place_is_one_line(tmp_path, fmnist_shards):
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards, log={"trackers": []}), steps=1)
    one_line(["export", out, "--out", "/proc/augssl/encoder.safetensors"], script="augssl")


def test_a_label_outside_the_recipes_classes_is_a_counted_bad_record_not_a_crash(tmp_path, fmnist_shards):
    """One record of 24 says class 57 (data.num_classes 10): counted in data.bad_records, the run
    trains on; without data.num_classes the online probe ignores it instead of crashing."""
    from itertools import islice

    from framework.data import Sample, write_shards

    samples = [
        Sample(s.key, s.image, 57 if i == 5 else s.label) for i, s in enumerate(islice(asset_samples("train"), 24))
    ]
    info = write_shards(samples, str(tmp_path / "bad" / "train-%06d.tar"), maxcount=24)
    shards = {"train": str(tmp_path / "bad" / info["shards"][0]["url"]), "test": fmnist_shards["test"]}
    plugins = {"backbones": {"encoder": "conv28", "latent_dim": None}, "probe": {"num_classes": 10}}
    for num_classes, bad in ((10, 1), (None, 0)):
        recipe = tiny_recipe(
            tmp_path / str(num_classes),
            shards,
            plugins=plugins,
            data={"num_classes": num_classes, "shuffle_buffer": 0, "max_bad_fraction": 0.5},
        )
        records = read_metrics(run_steps(recipe, steps=3))
        assert records[-1]["data.bad_records"] == bad and all(math.isfinite(r["probe.ce"]) for r in records)


@pytest.mark.slow
def test_a_run_whose_shards_are_all_unreadable_stops_with_one_line(tmp_path, fmnist_shards):
    """Empty files where the shards should be: the stream used to spin forever; now one line naming
    data.train, exit 2, within about data.stall_seconds."""
    for i in range(2):
        (tmp_path / f"empty-{i:06d}.tar").write_bytes(b"")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(
            tmp_path,
            {"train": str(tmp_path / "empty-{000000..000001}.tar"), "test": fmnist_shards["test"]},
            data={"stall_seconds": 5, "num_workers": 1},
        ),
    )
    assert "data.train" in one_line([recipe])


@pytest.mark.slow
def test_a_pretrained_file_gone_after_training_is_one_line_for_resume_eval_and_export(tmp_path, fmnist_shards):
    """The run started from a `pretrained` file that is then deleted: resuming, evaluating and exporting rebuild
    the model from recipe.yaml, and each stops with one line naming the key, not a traceback."""
    from safetensors.torch import save_file

    from plugins.backbones import BackbonesConfig, build_encoder

    weights = tmp_path / "start.safetensors"
    save_file(build_encoder(BackbonesConfig(encoder="conv28"), 1, 28).state_dict(), str(weights))
    plugins = {"backbones": {**CONV28, "pretrained": str(weights)}, "kl": {}}
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards, plugins=plugins, log={"trackers": []}), steps=1)
    weights.unlink()
    gone = f"plugins.backbones.pretrained: no file {weights}"
    assert gone in one_line([out / "recipe.yaml", "train.steps=2"])
    assert gone in one_line([out], script="evaluate.py")
    assert gone in one_line(["export", out, "--out", tmp_path / "e.safetensors"], script="augssl")


@pytest.mark.slow
def test_no_vae_head_beside_a_plugin_that_needs_one_is_one_line_and_creates_nothing(tmp_path):
    """`latent_dim: null` beside kl (without a decoder) passed validation and failed at kl's first step, after the
    run folder was made: now the recipe's error, naming the key and the plugin that needs the head."""
    shards = tiny_shards(tmp_path)
    backbone = {"encoder": "conv28", "latent_dim": None}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, shards, plugins={"backbones": backbone, "kl": {}}))
    line = one_line([recipe])
    assert "plugins.backbones: Value error, latent_dim: null builds no VAE head, and plugins kl need one" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_augssl_plugins_fails_when_an_installed_plugin_does_not_load(tmp_path):
    """A plugin whose import fails (a missing dependency) is listed with its error, and the command exits 2 with
    one line naming it: `augssl plugins` as a CI or pre-flight check must not pass on a broken install."""
    (tmp_path / "broken_plugin.py").write_text("import augssl_missing_dependency\n")
    dist = tmp_path / "augssl_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: augssl-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[augssl]\nbroken = broken_plugin\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = augssl("plugins", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "broken  (entry point broken_plugin (augssl-broken))\n  error: plugin 'broken'" in proc.stdout
    assert "kl  (built-in)\n  hooks:" in proc.stdout  # the others are still listed
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("augssl: error: 1 plugin(s) failed to load"), proc.stderr
    assert "plugin 'broken': entry point broken_plugin failed to load: ModuleNotFoundError" in lines[0]
