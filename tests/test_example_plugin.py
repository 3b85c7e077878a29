"""The example third-party plugin installs as its own package, is discovered by entry point, and trains."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from framework.logging import read_metrics
from framework.testing import CONV28, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow  # pip installs the package; the CLI runs in subprocesses
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT / "examples" / "augssl-rotation"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}


def augssl(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "framework.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_listed_with_its_hooks_and_schema(installed):
    proc = augssl(installed, "plugins")
    assert proc.returncode == 0, proc.stderr
    block = proc.stdout.split("rotation  (entry point augssl_rotation")[1].split("\n\n")[0]
    assert "hooks: auxiliary_head, build_modules, config_schema" in block
    assert "plugins.rotation.weight" in block and "plugins.rotation.view" in block


def test_a_recipe_naming_it_trains(installed, tmp_path, fmnist_shards):
    plugins = {"backbones": CONV28, "kl": {}, "rotation": {"weight": 0.5}}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards, plugins=plugins))
    proc = augssl(installed, "train", str(recipe), "train.steps=2")
    assert proc.returncode == 0, proc.stderr
    last = read_metrics(tmp_path / "run")[-1]
    assert last["step"] == 2 and "rotation.ce" in last and "rotation.acc" in last
