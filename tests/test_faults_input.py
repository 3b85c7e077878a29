"""Bad input is one line and exit 2, and creates nothing: recipes that would exhaust memory, DeepSpeed
keys DeepSpeed would silently ignore, an empty output folder, an export to where nothing can be written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from framework.recipe import RecipeError, validate
from framework.testing import run_steps, tiny_recipe
from tests.test_scale import ENV, ROOT

NO_SHARDS = {"train": "none.tar", "test": "none.tar"}


def one_line(args: list[str], script: str = "train.py") -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=ENV, cwd=ROOT)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("augssl: error: "), proc.stderr[-2000:]
    return lines[0]


def test_a_billion_laughs_recipe_stops_before_it_expands(tmp_path):
    """Nine levels of nine aliases are 9^9 values once expanded (validation, recipe.yaml); refused at once."""
    levels = ["    l0: &l0 [" + ", ".join(['"lol"'] * 9) + "]"]
    levels += [f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "laughs.yaml"
    path.write_text(f"extends: {ROOT / 'recipes' / 'vae_fashionmnist.yaml'}\n"
                    f"output_dir: {tmp_path / 'run'}\ndistributed:\n  deepspeed:\n" + "\n".join(levels) + "\n")  # fmt: skip
    assert "expands to more than 100000 values (YAML aliases?)" in one_line([path])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("section", "message"),
    [({"zero_optimisation": {"stage": 2}}, "zero_optimisation: not a DeepSpeed config key"),
     ({"zero_optimization": {"stage": 3, "stage3_param_persistance_threshold": 0}},
      "zero_optimization.stage3_param_persistance_threshold: Extra inputs are not permitted")],
)  # fmt: skip
def test_a_deepspeed_key_deepspeed_would_ignore_is_a_recipe_error(tmp_path, section, message):
    with pytest.raises(RecipeError, match=f"distributed.deepspeed: .*{message}"):
        validate(tiny_recipe(tmp_path, NO_SHARDS, distributed={"deepspeed": section}), check_data=False)
    validate(tiny_recipe(tmp_path, NO_SHARDS, distributed={"deepspeed": {"zero_optimization": {"stage": 3}}}),
             check_data=False)  # fmt: skip


def test_an_empty_output_dir_is_a_recipe_error(tmp_path, fmnist_shards):
    for empty in ("", "  "):
        with pytest.raises(RecipeError, match="output_dir"):
            validate(tiny_recipe(tmp_path, fmnist_shards, output_dir=empty))


def test_an_export_to_an_unwritable_place_is_one_line(tmp_path, fmnist_shards):
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards, train={"log_with": []}), steps=1)
    code = "import sys; from framework.cli import main; sys.argv[0] = 'augssl'; main()"
    proc = subprocess.run([sys.executable, "-c", code, "export", str(out), "--out", "/proc/augssl/encoder.safetensors"],
                          capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("augssl: error: ") and proc.stderr.count("\n") == 1
