"""docs/plugins.md's tutorial works as written: the VICReg package made of the page's code blocks alone installs by
entry point, trains on 1 and 2 processes and is evaluated, and its module registered under two names trains as two
plugins, each logging its own terms."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import framework
import plugins.blocks
from framework.logging import read_metrics
from framework.recipe.loading import deep_merge
from framework.testing import write_recipe
from tests.helpers import LAUNCH, ROOT, ddp_args, final_weights

DOC = ROOT / "docs" / "plugins.md"
# A block of the package or the recipe: its first line is a comment naming the file (`# vicreg/augssl_vicreg.py`);
# `, continued` after the name appends the block to the file.
MARKED = re.compile(r"^```\w*\n# (vicreg/[\w./-]+|vicreg\.yaml)\b[^\n]*\n(.*?)^```", re.S | re.M)
FILES = {"vicreg/pyproject.toml", "vicreg/augssl_vicreg.py", "vicreg/test_vicreg.py", "vicreg.yaml"}
TERMS = ("invariance", "variance", "covariance", "std")  # three loss terms and the metric


def tutorial_files() -> dict[str, str]:
    """`{path: text}` of the files the tutorial's marked blocks make, each file's blocks joined in page order."""
    files: dict[str, list[str]] = {}
    for path, body in MARKED.findall(DOC.read_text()):
        files.setdefault(path, []).append(body)
    return {path: "\n\n".join(parts) for path, parts in files.items()}


def test_the_tutorial_makes_a_package_of_the_public_api_only():
    files = tutorial_files()
    assert set(files) == FILES, f"docs/plugins.md's marked blocks make {sorted(files)}, the test expects {FILES}"
    module = ast.parse(files["vicreg/augssl_vicreg.py"])
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("framework", "plugins"):
            assert node.module in ("framework", "plugins.blocks"), f"the tutorial imports {node.module}"
            public = (framework if node.module == "framework" else plugins.blocks).__all__
            names = {alias.name for alias in node.names}
            assert names <= set(public), f"the tutorial imports {sorted(names - set(public))}, not in {node.module}"
        assert not (
            isinstance(node, ast.Import) and any(a.name.startswith(("framework", "plugins")) for a in node.names)
        )


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The tutorial's folder, written from the page, and the environment in which its package is installed (by
    pip, into a folder on PYTHONPATH) with the entry point `vicreg`, and the same module as `vic2` (a second
    distribution's entry point, as two packages naming one module would)."""
    folder, site = tmp_path_factory.mktemp("tutorial"), tmp_path_factory.mktemp("site")
    for path, text in tutorial_files().items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site)]
    subprocess.run([*pip, str(folder / "vicreg")], check=True, capture_output=True, timeout=300)
    second = site / "augssl_vic2-0.1.0.dist-info"
    second.mkdir()
    (second / "METADATA").write_text("Metadata-Version: 2.1\nName: augssl-vic2\nVersion: 0.1.0\n")
    (second / "entry_points.txt").write_text("[augssl]\nvic2 = augssl_vicreg\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return folder, env


def recipe_on(folder: Path, shards: dict[str, str], out: Path, **plugins: dict) -> Path:
    """The tutorial's recipe on the test shards, for 2 steps of 8 images per process (`plugins` added)."""
    recipe = yaml.safe_load((folder / "vicreg.yaml").read_text())
    tiny = {
        "output_dir": str(out / "run"),
        "data": {"train": shards["train"], "batch_size": 8, "num_workers": 0, "shuffle_buffer": 16},
        "eval": {"train": shards["train"], "test": shards["test"]},
        "train": {"steps": 2},
        "log": {"every": 1},
        "plugins": plugins,
    }
    return write_recipe(out / "vicreg.yaml", deep_merge(recipe, tiny))


def run(env: dict[str, str], *command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def train(env: dict[str, str], recipe: Path, out: Path, processes: int) -> dict:
    """Train `recipe` into `out` with `augssl train` (1 process) or `accelerate launch` (2); its last record."""
    if processes == 1:
        run(env, sys.executable, "-m", "framework.cli", "train", str(recipe), f"output_dir={out}")
    else:
        run(env, *LAUNCH, *ddp_args(processes), str(ROOT / "launch" / "train.py"), str(recipe), f"output_dir={out}")
    last = read_metrics(out)[-1]
    assert last["step"] == 2
    return last


@pytest.mark.slow
def test_the_tutorials_own_test_passes(package):
    folder, env = package
    run(env, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_vicreg.py", cwd=folder / "vicreg")


@pytest.mark.slow
def test_the_tutorial_trains_on_one_and_two_processes_and_evaluates(package, tmp_path, fmnist_shards):
    folder, env = package
    listed = run(env, sys.executable, "-m", "framework.cli", "plugins").stdout
    assert "vicreg  (entry point augssl_vicreg" in listed and "plugins.vicreg.variance_weight" in listed
    recipe = recipe_on(folder, fmnist_shards, tmp_path)
    runs = {tmp_path / "one": 1, tmp_path / "two": 2}
    for out, processes in runs.items():
        last = train(env, recipe, out, processes)
        assert {f"vicreg.{term}" for term in TERMS} <= set(last), (processes, sorted(last))
        assert last["data.seen"] == 2 * 8 * processes  # the 2-process run trained on the global batch of 16
    proc = run(env, sys.executable, "-m", "framework.cli", "eval", *map(str, runs))
    assert all(str(out) in proc.stdout and (out / "eval.json").is_file() for out in runs), proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_one_module_under_two_names_trains_two_plugins(package, tmp_path, fmnist_shards, processes):
    folder, env = package
    vic2 = {"weight": 0.5, "invariance_weight": 10.0, "proj_hidden_dim": 64, "proj_output_dim": 32}
    last = train(env, recipe_on(folder, fmnist_shards, tmp_path, vic2=vic2), tmp_path / "run", processes)
    for name in ("vicreg", "vic2"):
        assert {f"{name}.{term}" for term in TERMS} <= set(last), (name, sorted(last))
    assert last["vic2.invariance"] != last["vicreg.invariance"]  # two projectors, two sets of views
    if processes == 1:  # the loss is each plugin's own terms times its own weight (and the probe's)
        terms = ("invariance", "variance", "covariance")
        own = sum(last[f"vicreg.{t}"] + 0.5 * last[f"vic2.{t}"] for t in terms) + last["probe.ce"]
        assert last["loss"] == pytest.approx(own, rel=1e-5)
    widths = {key: tuple(value.shape) for key, value in final_weights(tmp_path / "run").items()}
    assert widths["plugins.vicreg.projector.6.weight"] == (1024, 1024)
    assert widths["plugins.vic2.projector.6.weight"] == (32, 64)
