"""`augssl export`: the encoder loads strictly into a plain torchvision ResNet and gives the same features; its
model card never takes the weights' path nor replaces a file augssl did not write, and shows only the
accuracies measured on the exported encoder; in a run with an EMA teacher, the student's or the teacher's
encoder (`--encoder`, else the recipe's `teacher.evaluate`) under the same key names."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from framework.checkpoint import complete_checkpoints, load_run
from framework.cli import eval_main, main
from framework.testing import run_steps, tiny_recipe, tiny_shards
from tests.helpers import augssl, encoder_weights, one_line, teacher_run


def test_exported_resnet18_loads_into_torchvision_strictly(tmp_path, capsys):
    shards = tiny_shards(tmp_path, n_train=48, n_test=24, size=32, channels=3)
    plugins = {"backbones": {"encoder": "resnet18", "decoder": "conv28", "latent_dim": 16}, "kl": {}}
    recipe = tiny_recipe(tmp_path, shards, plugins=plugins, size=32, channels=3)
    out = run_steps(recipe, steps=2)
    weights = tmp_path / "encoder.safetensors"
    capsys.readouterr()
    main(["export", str(out), "--out", str(weights)])
    assert json.loads(capsys.readouterr().out)["arch"] == "resnet18"
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()  # the encoder's own export_metadata, and what the run knows
        assert (meta["stem"], meta["key_names"], meta["num_features"], meta["channels"]) == (
            "cifar",
            "torchvision",
            "512",
            "3",
        )

    # the README's recipe, written out by hand (no augssl import involved in building the net)
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    net.load_state_dict(load_file(str(weights)), strict=True)

    model, _, _ = load_run(out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model.encode(x).h)


@pytest.fixture
def two_checkpoints(tmp_path, fmnist_shards):
    """A run folder with checkpoints at steps 1 and 2."""
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards, log={"trackers": []}, checkpoint={"every": 1}), steps=2)
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000001", "step_00000002"]
    return out


@pytest.mark.slow
def test_the_model_card_never_takes_the_weights_path_nor_replaces_a_file_augssl_did_not_write(
    two_checkpoints, tmp_path
):
    out = two_checkpoints
    weights = tmp_path / "encoder.safetensors"
    notes = weights.with_suffix(".md")  # the card's path
    error = one_line(["export", out, "--out", notes], script="augssl")
    assert error == (
        f"augssl: error: --out {notes}: the model card goes beside the weights as <name>.md; "
        f"give the weights another name, e.g. --out {weights}"
    )
    assert not notes.exists()
    notes.write_text("# my notes on this encoder\n")
    error = one_line(["export", out, "--out", weights], script="augssl")
    assert error.endswith(f"{notes} exists and is not a model card augssl wrote; move it, or give --out another name")
    assert notes.read_text() == "# my notes on this encoder\n" and not weights.exists()

    notes.unlink()
    for again in (False, True):  # an earlier export's card is replaced, with one line
        proc = augssl("export", out, "--out", weights)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout)["card"] == str(notes) and load_file(weights)
        replaced = [line for line in proc.stderr.splitlines() if line.startswith("augssl:")]
        assert replaced == ([f"augssl: replacing the model card {notes} of an earlier export"] if again else [])
        assert notes.read_text().startswith("---\nlibrary_name: pytorch\ntags: [self-supervised, augssl]\n---\n")


def test_the_model_card_shows_only_accuracies_measured_on_the_exported_encoder(two_checkpoints, tmp_path, capsys):
    out = two_checkpoints
    older, newest = complete_checkpoints(out)
    weights = tmp_path / "encoder.safetensors"
    card = weights.with_suffix(".md")

    def export(ckpt=newest) -> str:
        main(["export", str(out), "--out", str(weights), "--checkpoint", str(ckpt)])
        return card.read_text()

    eval_main([str(out), "--checkpoint", str(older)])  # eval.json holds the older checkpoint's accuracies
    report = json.loads((out / "eval.json").read_text())
    measured = f"test accuracy (`augssl eval`, fast): {json.dumps(report['accuracies'])}"
    text = export()
    assert measured not in text and f"not measured on this checkpoint (`augssl eval --checkpoint {newest}`)" in text
    assert measured in export(older)
    del report["encoder_blake2b"]  # a report that does not name the encoder it measured is not trusted
    (out / "eval.json").write_text(json.dumps(report))
    assert "test accuracy: not measured" in export(older)
    eval_main([str(out)])
    report = json.loads((out / "eval.json").read_text())
    assert f"test accuracy (`augssl eval`, fast): {json.dumps(report['accuracies'])}" in export()


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_export_writes_the_chosen_encoder_under_the_students_key_names(tmp_path, fmnist_shards, capsys, which):
    out = teacher_run(tmp_path, fmnist_shards)
    weights = tmp_path / "encoder.safetensors"
    capsys.readouterr()
    main(["export", str(out), "--out", str(weights), "--encoder", which])
    assert json.loads(capsys.readouterr().out)["encoder"] == which
    got, other = load_file(weights), encoder_weights(out, "teacher" if which == "student" else "student")
    expected = encoder_weights(out, which)  # the checkpoint's tensors, its prefix stripped
    assert sorted(got) == sorted(expected) == sorted(other) and len(got) > 4
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert any(not torch.equal(got[k], other[k]) for k in got)  # the EMA teacher is not the student
    with safe_open(str(weights), "pt") as f:
        assert f.metadata()["encoder"] == which
    model, _, _ = load_run(out)
    copy.deepcopy(model.encoder).load_state_dict(got, strict=True)  # the student's architecture takes either
    card = weights.with_suffix(".md").read_text()
    said = {"student": "- encoder: the student's", "teacher": "- encoder: the EMA teacher's"}
    assert said[which] in card and said["teacher" if which == "student" else "student"] not in card
    newest = complete_checkpoints(out)[-1]
    assert f"not measured on this checkpoint (`augssl eval --checkpoint {newest} --encoder {which}`)" in card


@pytest.mark.parametrize("evaluate", [None, "student", "teacher"])
def test_export_defaults_to_the_recipes_teacher_evaluate(tmp_path, fmnist_shards, capsys, evaluate):
    """BYOL's section does not say `evaluate_teacher`: without `teacher.evaluate` the student is exported."""
    out = teacher_run(tmp_path, fmnist_shards, teacher={"evaluate": evaluate})
    weights = tmp_path / "encoder.safetensors"
    capsys.readouterr()
    main(["export", str(out), "--out", str(weights)])
    which = evaluate or "student"
    assert json.loads(capsys.readouterr().out)["encoder"] == which
    expected = encoder_weights(out, which)
    assert all(torch.equal(v, expected[k]) for k, v in load_file(weights).items())


def test_export_of_the_teacher_of_a_run_without_one_is_refused_in_one_line(two_checkpoints, tmp_path, capsys):
    weights = tmp_path / "encoder.safetensors"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(two_checkpoints), "--out", str(weights), "--encoder", "teacher"])
    assert exit_.value.code == 2 and not weights.exists()
    assert capsys.readouterr().err.splitlines() == [
        "augssl: error: --encoder teacher: this run has no EMA teacher (no plugin of its recipe asks for one, hook "
        "teacher_modules); give --encoder student or leave --encoder out"
    ]
    main(["export", str(two_checkpoints), "--out", str(weights), "--encoder", "student"])
    assert json.loads(capsys.readouterr().out)["encoder"] == "student"


def test_the_model_card_shows_the_accuracies_of_the_encoder_measured(tmp_path, fmnist_shards):
    """`augssl eval --encoder teacher` measured the teacher: its accuracies go on the teacher's card only."""
    out = teacher_run(tmp_path, fmnist_shards)
    weights = tmp_path / "encoder.safetensors"
    eval_main([str(out), "--encoder", "teacher"])
    report = json.loads((out / "eval.json").read_text())
    measured = f"test accuracy (`augssl eval`, fast): {json.dumps(report['accuracies'])}"
    for which in ("teacher", "student"):
        main(["export", str(out), "--out", str(weights), "--encoder", which])
        assert (measured in weights.with_suffix(".md").read_text()) == (which == "teacher")
