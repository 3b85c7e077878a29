"""Linear evaluation: the probe itself, and `launch/evaluate.py` on a trained run (its student's or EMA
teacher's encoder)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework.checkpoint import load_run, tensors_digest
from framework.cli import eval_main, main
from framework.eval import crop_and_flip, extract, fit_linear, fit_sgd_linear, knn_accuracy
from framework.logging import read_metrics
from framework.recipe.loading import RecipeError
from framework.startup import validate
from framework.teacher import evaluated_encoder
from framework.testing import run_steps, tiny_recipe
from tests.helpers import LAUNCH, asset_samples, ddp_args, encoder_weights, one_line, teacher_run

ROOT = Path(__file__).resolve().parents[1]


def test_linear_probe_separable_classes_and_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(5, 16, generator=g)
    y = torch.randint(0, 5, (2000,), generator=g)
    x = centers[y] + torch.randn(2000, 16, generator=g)
    assert fit_linear(x[:1500], y[:1500], x[1500:], y[1500:]) > 0.97
    shuffled = y[torch.randperm(2000, generator=g)]
    assert abs(fit_linear(x[:1500], shuffled[:1500], x[1500:], shuffled[1500:]) - 0.2) < 0.08


def _blobs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = 4 * torch.randn(5, 16, generator=g)
    y = torch.randint(0, 5, (2000,), generator=g)
    return centers[y] + torch.randn(2000, 16, generator=g), y, y[torch.randperm(2000, generator=g)]


def test_sgd_linear_protocol_separable_classes_and_shuffled_labels():
    x, y, shuffled = _blobs()
    assert fit_sgd_linear(x[:1500], y[:1500], x[1500:], y[1500:], epochs=10) > 0.97
    assert abs(fit_sgd_linear(x[:1500], shuffled[:1500], x[1500:], shuffled[1500:], epochs=10) - 0.2) < 0.08


def test_sgd_linear_protocol_reextracts_features_each_epoch():
    x, y, _ = _blobs()
    seen = []

    def reextract(epoch):
        seen.append(epoch)
        return x[:1500] + 0.1 * torch.randn(1500, 16), y[:1500]

    assert fit_sgd_linear(x[:1500], y[:1500], x[1500:], y[1500:], epochs=4, reextract=reextract) > 0.97
    assert seen == [1, 2, 3]


@pytest.mark.parametrize("fit", [fit_linear, lambda *args: fit_sgd_linear(*args, epochs=3)], ids=["fast", "linear"])
def test_linear_classifiers_ignore_the_global_rng_and_dimensions_constant_over_the_train_set(fit):
    """The attack of a raw-pixel border: 8 dimensions constant over the train images but not the test ones
    (scaled by a clamped std of 1e-6 they dwarfed every other input, times weights only the initial
    draw set), and another global RNG state (what 1 and N processes reach differently): the same accuracy."""
    x, y, _ = _blobs()
    train = torch.cat([x[:1500], torch.full((1500, 8), 0.3)], 1)
    test = torch.cat([x[1500:], torch.randn(500, 8, generator=torch.Generator().manual_seed(1))], 1)
    torch.manual_seed(0)
    plain = fit(x[:1500], y[:1500], x[1500:], y[1500:])
    for seed in (1, 2):
        torch.manual_seed(seed)
        assert fit(train, y[:1500], test, y[1500:]) == plain > 0.97


def test_knn_separable_classes_and_shuffled_labels():
    x, y, shuffled = _blobs()
    assert knn_accuracy(x[:1500], y[:1500], x[1500:], y[1500:]) > 0.97
    assert abs(knn_accuracy(x[:1500], shuffled[:1500], x[1500:], shuffled[1500:]) - 0.2) < 0.08


def test_knn_is_a_weighted_nearest_neighbour_vote():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[0.2, 1.0], [1.0, 0.05]])
    assert knn_accuracy(train, labels, test, torch.tensor([1, 0]), k=1) == 1.0
    # k=3: two far neighbours of class 0 are outweighed by one near neighbour of class 1 (temperature 0.07)
    assert knn_accuracy(train, labels, test[:1], torch.tensor([1]), k=3) == 1.0
    assert knn_accuracy(train, labels, test[:1], torch.tensor([1]), k=3, temperature=100.0) == 0.0


def test_crop_and_flip_shifts_and_mirrors():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).view(2, 3, 8, 8)
    out = crop_and_flip(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)


@pytest.mark.slow
def test_evaluate_a_trained_run(tmp_path, real_fmnist_shards):
    out = run_steps(tiny_recipe(tmp_path, real_fmnist_shards, checkpoint={"every": 2}), steps=2)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "evaluate.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "linear probe, test accuracy (192 train / 96 test images)" in proc.stdout
    assert "raw pixels" in proc.stdout and str(out) in proc.stdout
    result = json.loads((out / "eval.json").read_text())
    assert result["train_samples"] == 192 and result["test_samples"] == 96
    assert 0.1 < result["accuracy"] <= 1 and 0.4 < result["raw_pixels_accuracy"] <= 1  # real images: above chance
    assert result["checkpoint"].endswith("step_00000002")


def test_eval_all_protocols(tmp_path, real_fmnist_shards, capsys):
    out = run_steps(tiny_recipe(tmp_path, real_fmnist_shards, checkpoint={"every": 2}), steps=2)
    eval_main([str(out), "--protocol", "all", "--epochs", "2", "--augment"])
    printed = capsys.readouterr().out
    assert "frozen-feature classifiers, test accuracy (192 train / 96 test images)" in printed
    assert "fast" in printed and "linear" in printed and "knn" in printed and "re-extracted" in printed
    result = json.loads((out / "eval.json").read_text())
    assert set(result["accuracies"]) == set(result["raw_pixels_accuracies"]) == {"fast", "linear", "knn"}
    assert result["dataset"] == {"train": real_fmnist_shards["train"], "test": real_fmnist_shards["test"]}
    assert result["raw_pixels_accuracies"]["knn"] > 0.4  # real images: above chance (0.1)
    assert all(0 < acc <= 1 for acc in result["accuracies"].values())


def _launch(script: str, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [*LAUNCH, *ddp_args(processes), str(ROOT / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_processes_extract_the_same_features_as_one(tmp_path, fmnist_shards):
    """Each rank encodes half of the shards; every rank gets all features, in sample-key order."""
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards, checkpoint={"every": 2}), steps=2)
    _launch("tests/dist_extract.py", str(out), str(tmp_path / "two.pt"))
    two = torch.load(tmp_path / "two.pt")
    model, recipe, _ = load_run(out)
    one = extract(model, recipe.eval.train, recipe.data, batch_size=64, num_workers=0)
    assert len(two["train"]["labels"]) == len(one["labels"]) == 192
    assert torch.equal(two["train"]["labels"], one["labels"]) and torch.equal(two["train"]["pixels"], one["pixels"])
    assert torch.allclose(two["train"]["features"], one["features"], atol=1e-5)
    # max_samples: the first 20 of each rank's share, 40 in all
    assert len(two["capped"]["labels"]) == 40


@pytest.mark.slow
def test_four_processes_extract_two_eval_shards_and_a_rank_without_samples_as_one_does(tmp_path, fmnist_shards):
    """4 ranks x 2 workers = 8 readers: 2 shards are split by record; 3 test records leave rank 3
    with none, and it still takes part in the gathers."""
    from itertools import islice

    from framework.data import write_shards

    samples = list(islice(asset_samples("test"), 43))
    two = write_shards(samples[:40], str(tmp_path / "e" / "train-%02d.tar"), maxcount=20)["pattern"]
    three = write_shards(samples[40:], str(tmp_path / "e" / "test-%02d.tar"))["pattern"]
    recipe = tiny_recipe(tmp_path, fmnist_shards, eval={"train": two, "test": three}, checkpoint={"every": 2})
    out = run_steps(recipe, steps=2)
    _launch("tests/dist_extract.py", str(out), str(tmp_path / "four.pt"), processes=4)
    four = torch.load(tmp_path / "four.pt")
    model, recipe, _ = load_run(out)
    for spec, got in ((two, four["train"]), (three, four["capped"])):
        one = extract(model, spec, recipe.data, batch_size=64, num_workers=0)
        assert len(got["labels"]) == len(one["labels"]) == (40 if spec == two else 3)
        assert torch.equal(got["labels"], one["labels"]) and torch.equal(got["pixels"], one["pixels"])
        assert torch.allclose(got["features"], one["features"], atol=1e-5)


@pytest.mark.slow
def test_eval_under_accelerate_launch_matches_one_process(tmp_path, fmnist_shards):
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards, checkpoint={"every": 2}), steps=2)
    eval_main([str(out), "--protocol", "all", "--epochs", "3"])
    one = json.loads((out / "eval.json").read_text())
    proc = _launch("launch/evaluate.py", str(out), "--protocol", "all", "--epochs", "3")
    assert proc.stdout.count("frozen-feature classifiers, test accuracy (192 train / 96 test images)") == 1
    two = json.loads((out / "eval.json").read_text())
    # The classifiers are functions of their inputs alone (zero start, no amplified constant pixel), and the
    # gathered pixels are bit-identical. Features agree to ~1e-6, not bitwise (each rank encodes other batch
    # compositions), and this process may run another thread count than the launched ones (sums in another
    # order): a test image whose margin is within that rounding may flip, at most one of 96.
    for p in ("fast", "linear", "knn"):
        assert abs(two["accuracies"][p] - one["accuracies"][p]) <= 1 / 96 + 1e-9, p
        assert abs(two["raw_pixels_accuracies"][p] - one["raw_pixels_accuracies"][p]) <= 1 / 96 + 1e-9, p


def test_online_knn_is_logged_and_leaves_training_unchanged(tmp_path, fmnist_shards):
    plain = run_steps(tiny_recipe(tmp_path / "a", fmnist_shards), steps=4)
    knn = run_steps(tiny_recipe(tmp_path / "b", fmnist_shards, eval={"knn_every": 2, "knn_samples": 64}), steps=4)
    records = read_metrics(knn)
    accs = [(r["step"], r["knn.acc"]) for r in records if "knn.acc" in r]
    assert [s for s, _ in accs] == [2, 4]
    model, recipe, _ = load_run(knn)  # the step-4 checkpoint: the same k-NN, computed offline
    train, test = (
        extract(model, spec, recipe.data, 64, 0, max_samples=64) for spec in (recipe.eval.train, recipe.eval.test)
    )
    assert len(train["labels"]) == len(test["labels"]) == 64
    assert abs(accs[-1][1] - knn_accuracy(train["features"], train["labels"], test["features"], test["labels"])) < 1e-6
    losses = [r["loss"] for r in read_metrics(plain)]
    assert [r["loss"] for r in records if "loss" in r] == losses  # same RNG, same batches, same mode


def test_online_knn_needs_eval_shards(tmp_path, fmnist_shards):
    recipe = tiny_recipe(tmp_path, fmnist_shards, eval={"knn_every": 5})
    del recipe["eval"]["test"]
    with pytest.raises(RecipeError, match="eval.knn_every needs eval.train and eval.test"):
        validate(recipe)


def _run_on(tmp_path, fmnist_shards, test_spec: str):
    recipe = tiny_recipe(tmp_path, fmnist_shards, eval={"test": test_spec}, checkpoint={"every": 2})
    return run_steps(recipe, steps=2)


@pytest.mark.parametrize("manifest", [True, False], ids=["with its manifest", "without"])
@pytest.mark.slow
def test_eval_refuses_test_shards_that_gave_fewer_samples_than_they_hold(tmp_path, fmnist_shards, manifest):
    """A test shard cut short: the stream reads the records before the cut and counts the shard as bad.
    Evaluation compares what it read with the manifest (without one: the bad count) and refuses in one
    line instead of reporting an accuracy on part of the test set."""
    shards = tmp_path / "shards"
    shutil.copytree(Path(fmnist_shards["test"]).parent, shards)
    cut = shards / "test-000002.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 100])
    if not manifest:
        (shards / "test.json").unlink()
    out = _run_on(tmp_path, fmnist_shards, str(shards / "test-{000000..000003}.tar"))
    error = one_line([out], script="evaluate.py")
    listed = " of the 96 their manifests list" if manifest else ""
    assert re.fullmatch(
        rf"augssl: error: eval\.test: read (\d+) samples{listed}; 1 bad shard\(s\) or record\(s\), last: .*", error
    )
    assert int(re.search(r"read (\d+)", error)[1]) < 96 and str(cut) in error and "leave it out of eval.test" in error
    assert not (out / "eval.json").exists()


@pytest.mark.slow
def test_eval_refuses_test_shards_without_labels(tmp_path, fmnist_shards):
    from framework.data import Sample, write_shards

    unlabelled = (Sample(s.key, s.image, -1) for s in asset_samples("test"))
    spec = write_shards(unlabelled, str(tmp_path / "u" / "test-%06d.tar"), maxcount=48)["pattern"]
    out = _run_on(tmp_path, fmnist_shards, str(tmp_path / "u" / spec))
    error = one_line([out], script="evaluate.py")
    assert error == (
        f"augssl: error: eval.test: no labels in {tmp_path / 'u' / spec} (no record has a .cls of 0 or more); "
        "give labelled shards"
    )
    assert not (out / "eval.json").exists()


def test_eval_measures_the_chosen_encoder_and_says_which(tmp_path, fmnist_shards, capsys):
    out = teacher_run(tmp_path, fmnist_shards)
    for which in ("student", "teacher", None):  # None: the recipe's default, BYOL's student
        eval_main([str(out)] + (["--encoder", which] if which else []))
        report = json.loads((out / "eval.json").read_text())
        assert report["encoder"] == (which or "student")
        assert report["encoder_blake2b"] == tensors_digest(encoder_weights(out, which or "student"))
        rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(out))]
        assert len(rows) == 1 and rows[0].startswith(f"{out} (teacher) ") == (which == "teacher")

    # the teacher's features are the features of a student holding the teacher's weights
    model, recipe, _ = load_run(out)
    features = {
        teacher: extract(model, recipe.eval.test, recipe.data, 64, 0, max_samples=48, pixels=False, teacher=teacher)
        for teacher in (False, True)
    }
    model.encoder.load_state_dict(encoder_weights(out, "teacher"))
    student_as_teacher = extract(model, recipe.eval.test, recipe.data, 64, 0, max_samples=48, pixels=False)
    assert torch.equal(features[True]["features"], student_as_teacher["features"])
    assert not torch.allclose(features[False]["features"], features[True]["features"])


def test_eval_of_the_teacher_of_a_run_without_one_is_refused_in_one_line(tmp_path, fmnist_shards, capsys):
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards, log={"trackers": []}), steps=1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        eval_main([str(out), "--encoder", "teacher"])
    assert exit_.value.code == 2 and not (out / "eval.json").exists()
    assert capsys.readouterr().err.splitlines() == [
        "augssl: error: --encoder teacher: this run has no EMA teacher (no plugin of its recipe asks for one, hook "
        "teacher_modules); give --encoder student or leave --encoder out"
    ]


@pytest.mark.parametrize("evaluate", [None, "student", "teacher"])
@pytest.mark.parametrize("plugins_say", [False, True])
def test_the_evaluated_encoder_is_the_cli_s_else_the_recipe_s_else_the_plugins(
    tmp_path, fmnist_shards, monkeypatch, evaluate, plugins_say
):
    """`--encoder`, else `teacher.evaluate`, else `teacher` when a plugin section's class says `evaluate_teacher`;
    `teacher` only in a run with one."""
    recipe = tiny_recipe(tmp_path, fmnist_shards, teacher={"evaluate": evaluate})
    cfg, _ = validate(recipe, check_data=False)
    if plugins_say:
        monkeypatch.setattr(type(cfg.plugins["kl"]), "evaluate_teacher", True, raising=False)
    default = evaluate or ("teacher" if plugins_say else "student")
    assert evaluated_encoder(cfg, has_teacher=True) == default
    assert evaluated_encoder(cfg, has_teacher=False) == "student"
    for choice in ("student", "teacher"):
        assert evaluated_encoder(cfg, has_teacher=True, choice=choice) == choice
    assert evaluated_encoder(cfg, has_teacher=False, choice="student") == "student"
    with pytest.raises(ValueError, match="^--encoder teacher: this run has no EMA teacher"):
        evaluated_encoder(cfg, has_teacher=False, choice="teacher")


def test_the_help_says_which_encoder(capsys):
    for command in (eval_main, lambda argv: main(["export", *argv])):
        with pytest.raises(SystemExit):
            command(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--encoder {student,teacher}" in text and "the EMA teacher's copy of it" in text
