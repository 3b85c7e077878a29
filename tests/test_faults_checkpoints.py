"""Attacks on a run folder and its checkpoints, each with real processes and real files: a second
run on a busy folder, a stale lock, resume=never/fresh, an incompatible recipe, damaged, truncated
and missing checkpoint files, stray folders, a full disk during a save, bad paths; a 2-process run
that checkpoints, verifies and falls back; and `augssl eval` / `augssl export` reading a damaged
checkpoint, one with non-finite weights, and one pruned by the run training in the folder."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from framework import checkpoint, runfolder
from framework.logging import read_metrics
from framework.testing import run_steps, tiny_recipe, write_recipe
from tests.helpers import ENV, LAUNCH, ROOT, augssl, ddp_args, final_weights, one_line

TRAIN = ROOT / "launch" / "train.py"


def train(args: list[str], script=TRAIN, timeout: int = 180, **popen) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT, **popen)


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The single line a refused run prints on stderr (exit 2, no traceback)."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("augssl: error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0].removeprefix("augssl: error: ")


def snapshot(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def finite_losses(out) -> bool:
    return all(math.isfinite(r["loss"]) for r in read_metrics(out))


@pytest.fixture
def trained(tmp_path, fmnist_shards):
    """A recipe file and its run folder trained 3 steps with a checkpoint at every step (2 kept)."""
    recipe = tiny_recipe(tmp_path, fmnist_shards, train={"steps": 3}, log={"trackers": []}, checkpoint={"every": 1})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    out = run_steps(recipe)
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step_00000002", "step_00000003"]
    return path, out


@pytest.mark.slow
def test_a_second_run_on_a_busy_folder_stops_at_once_and_the_first_finishes_alone(tmp_path, fmnist_shards):
    recipe = tiny_recipe(
        tmp_path, fmnist_shards, train={"steps": 150}, log={"every": 50, "trackers": []}, checkpoint={"every": 50}
    )
    path, out = write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, str(TRAIN), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 120
    while not (out / runfolder.LOCK_FILE).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    holder = json.loads((out / runfolder.LOCK_FILE).read_text())
    assert holder["pid"] == first.pid and {"host", "started"} <= holder.keys()
    second = train([path, "optim.lr=0.5", "train.steps=2"])
    assert first.poll() is None, "the first run was still training when the second stopped"
    error = one_error(second)
    assert error.startswith(f"{out} is in use by another run (pid {first.pid} on "), error
    _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err[-3000:]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["optim"]["lr"] == 1e-3, "the first run's recipe"
    assert [r["step"] for r in read_metrics(out)] == [50, 100, 150], "the first run's metrics only"
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step_00000100", "step_00000150"]
    assert not (out / runfolder.LOCK_FILE).exists(), "released at the end"


@pytest.mark.slow
def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, fmnist_shards):
    recipe = tiny_recipe(tmp_path, fmnist_shards, log={"trackers": []})
    path, out = write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "run"
    gone = subprocess.Popen(["true"])
    gone.wait()
    out.mkdir()
    (out / runfolder.LOCK_FILE).write_text(
        json.dumps({"host": os.uname().nodename, "pid": gone.pid, "started": "then"})
    )
    proc = train([path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"taking over the stale lock of a run that is gone (pid {gone.pid} on" in proc.stdout
    assert [r["step"] for r in read_metrics(out)] == [1, 2] and not (out / runfolder.LOCK_FILE).exists()


@pytest.mark.slow
def test_resume_never_refuses_a_folder_with_checkpoints(trained):
    path, out = trained
    before = snapshot(out)
    error = one_error(train([path, "train.resume=never"]))
    assert error.startswith(f"train.resume=never: {out} holds another run's checkpoints (newest step_00000003)")
    assert "train.resume=fresh" in error
    assert snapshot(out) == before, "nothing written"


@pytest.mark.slow
def test_resume_fresh_moves_the_previous_run_aside_and_starts_at_step_0(trained):
    path, out = trained
    before = snapshot(out)
    proc = train([path, "train.resume=fresh", "train.steps=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (moved,) = (out / runfolder.PREVIOUS).iterdir()
    assert f"moved the previous run in {out} to {moved}" in proc.stdout and "resumed" not in proc.stdout
    assert snapshot(moved) == before, "the old run, whole, in previous/<time>/"
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step_00000001", "step_00000002"]
    assert checkpoint.find_resume(moved, "auto").name == "step_00000003", "still a run folder eval/export read"


@pytest.mark.slow
def test_an_incompatible_recipe_is_refused_naming_the_key_and_recipe_yaml_is_kept(trained):
    path, out = trained
    before = snapshot(out)
    error = one_error(train([path, "train.steps=5", "plugins.backbones.latent_dim=32"]))
    assert error.startswith(
        "train.resume: checkpoint step_00000003 was trained with plugins.backbones.latent_dim=16, this recipe has 32: "
    ), error
    error = one_error(train([path, "train.steps=5", "data.num_workers=2", "plugins.probe={}"]))
    assert "holds the modules of plugins ['backbones'], this recipe builds ['backbones', 'probe']" in error
    error = one_error(train([path, "train.steps=5", "data.num_workers=2"]))
    assert "was trained with data.num_workers=0, this recipe has 2" in error
    assert snapshot(out) == before, "recipe.yaml (and everything else) untouched"
    proc = train([path, "train.steps=4", "optim.lr=0.002", "log.every=2", "eval.batch_size=32"])
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-3000:]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["optim"]["lr"] == 0.002, "allowed changes are taken"


@pytest.mark.slow
def test_resuming_an_older_checkpoint_moves_the_later_ones_aside_and_never_prunes_its_start(tmp_path, fmnist_shards):
    """A run of 9 steps keeps step_6 and step_9; `train.resume=<run>/checkpoints/step_6` with 8 steps
    used to prune step_6 itself at its next save and keep the abandoned step_9, which auto-resume,
    eval and export then took for the newest. Now step_9 goes to previous/<time>/checkpoints/, and
    step_6 is kept even with checkpoint.keep=1."""
    recipe = tiny_recipe(tmp_path, fmnist_shards, train={"steps": 9}, log={"trackers": []}, checkpoint={"every": 3})
    path, out = write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "run"
    assert train([path]).returncode == 0
    root = checkpoint.checkpoint_root(out)
    six, nine = root / "step_00000006", root / "step_00000009"
    assert checkpoint.complete_checkpoints(out) == [six, nine]
    abandoned = snapshot(nine)
    proc = train([path, f"train.resume={six}", "train.steps=8", "checkpoint.every=1", "checkpoint.keep=1"])
    assert proc.returncode == 0 and f"resumed from {six} at step 6" in proc.stdout, proc.stderr[-3000:]
    (moved,) = (out / runfolder.PREVIOUS).iterdir()
    assert f"augssl: train.resume={six}: moved the later checkpoints (step_00000009) to {moved / 'checkpoints'}" in (
        proc.stdout
    )
    assert snapshot(moved / "checkpoints" / nine.name) == abandoned, "the abandoned branch, whole"
    assert checkpoint.complete_checkpoints(out) == [six, root / "step_00000008"], "its start is never pruned"
    assert checkpoint.find_resume(out, "auto").name == "step_00000008", "what eval, export and auto take"
    proc = train([path, "train.steps=10"])
    assert proc.returncode == 0 and f"resumed from {root / 'step_00000008'} at step 8" in proc.stdout


@pytest.mark.slow
def test_a_step_that_leaves_a_weight_non_finite_is_never_checkpointed(trained):
    """Step 4's loss is finite but its gradients are NaN (tests/dist_train.py's `AUGSSL_TEST_NAN=0:0:grad`,
    as an overflow in backward gives), so its update fills the weights with NaN. With a checkpoint due
    at every step, step 4's used to be written with them (and named "last good" 10 skipped steps
    later). Now the run stops at that checkpoint, one line, exit 1, naming the tensor and the last
    good (finite) checkpoint; nothing of step 4 is written."""
    path, out = trained
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "dist_train.py"), str(path), "train.steps=8"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**ENV, "AUGSSL_TEST_NAN": "0:0:grad"},
        cwd=ROOT,
    )
    newest = checkpoint.complete_checkpoints(out)[-1]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("augssl: error: ")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith("augssl: error: step 4 left ") and errors[0].endswith(
        "non-finite (non-finite gradients, or an optim.lr / weight_decay too large for its dtype): it is not "
        f"checkpointed; last good checkpoint: {newest}"
    ), errors[0]
    assert newest.name == "step_00000003" and checkpoint.finite_weights(newest)


def damage(ckpt, how: str) -> str:
    """Damage one file of a checkpoint; returns what verify should say."""
    if how == "random bytes":
        weights = ckpt / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)
        weights.write_bytes(bytes(data))
        return "model.safetensors does not match its checksum"
    if how == "truncated":
        optimizer = ckpt / "optimizer.bin"
        size = optimizer.stat().st_size
        optimizer.write_bytes(optimizer.read_bytes()[: size // 3])
        return f"optimizer.bin has {size // 3} bytes, {size} were written"
    (ckpt / "random_states_0.pkl").unlink()
    return "random_states_0.pkl is missing"


@pytest.mark.parametrize("how", ["random bytes", "truncated", "missing"])
@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_named_kept_aside_and_the_previous_one_resumed(
    trained, tmp_path, fmnist_shards, how
):
    path, out = trained
    newest = checkpoint.complete_checkpoints(out)[-1]
    why = damage(newest, how)
    assert checkpoint.verify(newest) == why and checkpoint.verify(newest.with_name("step_00000002")) is None
    proc = train([path, "train.steps=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if " is damaged " in line]
    assert lines == [
        f"augssl: checkpoint {newest} is damaged ({why}): kept as step_00000003.damaged; resuming from step_00000002"
    ]
    assert f"resumed from {newest.with_name('step_00000002')} at step 2" in proc.stdout
    assert (newest.with_name("step_00000003.damaged")).is_dir(), "never deleted"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 3, 4] and finite_losses(out)
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step_00000003", "step_00000004"]
    if how == "random bytes":  # the fallback is exact: the same weights as an uninterrupted run
        # ... run the same way: steps 1-2 in this process, 3-4 in a subprocess (float results
        # depend on the thread count, which differs between the two)
        recipe = tiny_recipe(tmp_path / "whole", fmnist_shards, log={"trackers": []}, checkpoint={"every": 1})
        whole = run_steps(recipe, steps=2)
        assert train([write_recipe(tmp_path / "whole.yaml", recipe), "train.steps=4"]).returncode == 0
        a, b = final_weights(whole), final_weights(out)
        assert not [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
def test_every_checkpoint_damaged_stops_with_one_line_and_renames_nothing(trained):
    path, out = trained
    for ckpt in checkpoint.complete_checkpoints(out):
        damage(ckpt, "truncated")
    error = one_error(train([path, "train.steps=4"]))
    assert error.startswith(
        f"train.resume=auto: every checkpoint in {out / 'checkpoints'} is damaged (newest "
        "step_00000003: optimizer.bin has "
    ), error
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step_00000002", "step_00000003"]


@pytest.mark.slow
def test_an_explicit_damaged_or_missing_resume_path_stops_before_anything_is_created(trained, tmp_path):
    path, out = trained
    error = one_error(train([path, "train.resume=/no/such/step_1", f"output_dir={tmp_path / 'new'}"]))
    assert error == (
        "train.resume: /no/such/step_1 is not a complete checkpoint (no such folder); give a "
        "checkpoints/step_<N> folder, or train.resume=auto"
    )
    newest = checkpoint.complete_checkpoints(out)[-1]
    why = damage(newest, "random bytes")
    error = one_error(train([path, f"train.resume={newest}", f"output_dir={tmp_path / 'new'}", "train.steps=4"]))
    assert error.startswith(f"train.resume: checkpoint {newest} is damaged ({why})")
    assert not (tmp_path / "new").exists(), "nothing created"


@pytest.mark.slow
def test_eval_of_a_missing_checkpoint_is_one_line(trained, tmp_path):
    _, out = trained
    proc = train([out, "--checkpoint", tmp_path / "nope"], script=ROOT / "launch" / "evaluate.py")
    assert "not a complete checkpoint" in one_error(proc)


@pytest.mark.slow
def test_stray_folders_and_files_in_checkpoints_are_ignored(trained):
    path, out = trained
    root = checkpoint.checkpoint_root(out)
    newest = checkpoint.complete_checkpoints(out)[-1]
    subprocess.run(["cp", "-r", str(newest), str(root / "step_00000009.bak")], check=True)
    (root / "step_x").mkdir()
    (root / "step_x" / checkpoint.STATE_FILE).write_text("{}")
    (root / "step_00000010").write_text("not a folder")
    (root / "notes.txt").write_text("hi")
    proc = train([path, "train.steps=5"])
    assert proc.returncode == 0 and f"resumed from {newest} at step 3" in proc.stdout, proc.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == [
        "notes.txt",
        "step_00000004",
        "step_00000005",
        "step_00000009.bak",
        "step_00000010",
        "step_x",
    ]


@pytest.mark.slow
def test_a_full_disk_during_a_save_removes_the_partial_folder_keeps_the_previous_ones_and_stops(trained):
    path, out = trained
    proc = train(["5", path, "train.steps=6"], script=ROOT / "tests" / "fault_train.py")
    error = one_error(proc)
    tmp = checkpoint.checkpoint_root(out) / "step_00000005.tmp"
    assert error.startswith(
        f"checkpoint step_00000005 could not be written (ENOSPC (No space left on device): {tmp}/"
    ), error
    assert error.endswith(
        f"removed {tmp}; the previous checkpoints are kept (newest step_00000004, where "
        "train.resume=auto continues); free space (or fix the folder) and rerun"
    )
    assert not tmp.exists()
    kept = checkpoint.complete_checkpoints(out)
    assert [p.name for p in kept] == ["step_00000003", "step_00000004"] and all(
        checkpoint.verify(p) is None for p in kept
    )
    proc = train([path, "train.steps=6"])
    assert proc.returncode == 0 and "at step 4" in proc.stdout, proc.stderr[-3000:]
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step_00000005", "step_00000006"]


def launch2(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [*LAUNCH, *ddp_args(2), str(TRAIN), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)


@pytest.mark.slow
def test_two_processes_checkpoint_with_checksums_fall_back_and_stop_together_on_a_busy_folder(tmp_path, fmnist_shards):
    """DDP on 2 processes (gloo): checksums cover both ranks' files; a damaged newest checkpoint is
    skipped on both ranks alike; a folder locked by another process stops both ranks, one line."""
    recipe = tiny_recipe(tmp_path, fmnist_shards, train={"steps": 2}, log={"trackers": []}, checkpoint={"every": 1})
    path, out = write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "run"
    proc = launch2([path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    newest = checkpoint.complete_checkpoints(out)[-1]
    files = json.loads((newest / checkpoint.CHECKSUMS_FILE).read_text())["files"]
    assert {"data_rank0.json", "data_rank1.json", "model.safetensors", "random_states_1.pkl"} <= files.keys()
    damage(newest, "random bytes")
    proc = launch2([path, "train.steps=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("is damaged (model.safetensors does not match its checksum)") == 1
    assert f"resumed from {newest.with_name('step_00000001')} at step 1" in proc.stdout
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step_00000002", "step_00000003"]
    assert finite_losses(out)
    lock = runfolder.RunLock.acquire(out)  # another live run (this process) holds the folder
    try:
        proc = launch2([path, "train.steps=4"])
    finally:
        lock.release()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("augssl: error: ")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert f"{out} is in use by another run (pid {os.getpid()} on" in errors[0]
    assert checkpoint.complete_checkpoints(out)[-1].name == "step_00000003"


# ---------------------------------------------------------------------------
# The read side: augssl eval and augssl export
# ---------------------------------------------------------------------------


def notes(proc: subprocess.CompletedProcess) -> list[str]:
    """The `augssl:` lines a successful command printed on stderr."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("augssl:")]


@pytest.mark.slow
def test_eval_and_export_read_the_previous_checkpoint_past_a_damaged_newest_and_stop_on_a_damaged_explicit_one(
    trained, tmp_path
):
    _, out = trained
    previous, newest = checkpoint.complete_checkpoints(out)
    why = damage(newest, "random bytes")
    note = f"augssl: checkpoint {newest} is damaged ({why}): reading {previous.name} instead"
    proc = augssl("export", out, "--out", tmp_path / "encoder.safetensors")
    assert notes(proc) == [note] and json.loads(proc.stdout)["checkpoint"] == str(previous)
    proc = augssl("eval", out)
    assert notes(proc) == [note] and json.loads((out / "eval.json").read_text())["checkpoint"] == str(previous)
    report = (out / "eval.json").read_bytes()

    refusal = f"--checkpoint {newest} is damaged ({why}); give another checkpoint, or leave --checkpoint out for"
    assert refusal in one_line(["eval", out, "--checkpoint", newest], script="augssl")
    assert refusal in one_line(["export", out, "--checkpoint", newest, "--out", tmp_path / "e.st"], script="augssl")
    damage(previous, "truncated")  # its optimizer state: the model it holds is intact, and read
    assert notes(augssl("export", out, "--out", tmp_path / "e.st")) == [
        f"augssl: checkpoint {newest} is damaged ({why}): reading {previous.name} instead"
    ]
    damage(previous, "random bytes")
    error = one_line(["eval", out], script="augssl")
    assert error.startswith(
        f"augssl: error: every checkpoint in {out / 'checkpoints'} is damaged (newest step_00000003: {why})"
    ), error
    assert (out / "eval.json").read_bytes() == report, "kept"
    assert sorted(p.name for p in out.joinpath("checkpoints").iterdir()) == [previous.name, newest.name], "no rename"


def nan_in_encoder(ckpt) -> str:
    """Write a NaN into the encoder's first weight of checkpoint `ckpt`, checksums rewritten to match (as a
    run that committed a non-finite step would have saved it); returns that tensor's name in the encoder."""
    weights = load_file(ckpt / checkpoint.WEIGHTS_FILE)
    name = next(k for k in weights if k.startswith("plugins.backbones.encoder.") and k.endswith("weight"))
    weights[name].view(-1)[0] = math.nan
    save_file(weights, str(ckpt / checkpoint.WEIGHTS_FILE), metadata={"format": "pt"})
    checkpoint.write_checksums(ckpt)
    return name.removeprefix("plugins.backbones.encoder.")


@pytest.mark.slow
def test_eval_and_export_refuse_an_encoder_with_non_finite_weights_naming_the_checkpoint_and_tensor(trained, tmp_path):
    _, out = trained
    newest = checkpoint.complete_checkpoints(out)[-1]
    name = nan_in_encoder(newest)
    assert checkpoint.verify(newest) is None, "intact on disk: its numbers are what is wrong"
    refusal = f"augssl: error: checkpoint {newest}: the encoder's {name} holds non-finite values (1 NaN, 0 infinite"
    assert one_line(["export", out, "--out", tmp_path / "encoder.safetensors"], script="augssl").startswith(refusal)
    assert one_line(["eval", out], script="augssl").startswith(refusal)
    assert not list(tmp_path.glob("encoder*")) and not (out / "eval.json").exists(), "nothing written"


def test_a_checkpoint_pruned_while_it_is_read_is_no_fault_and_the_newest_is_read(trained, monkeypatch, capsys):
    """The run training in the folder saves two checkpoints and prunes the one eval reads meanwhile: its
    files go one by one (the weights first, here), then the folder. Eval reads the newest, and says
    nothing of damage; a pruned `--checkpoint` stops in one line."""
    _, out = trained
    read = checkpoint._read_checked
    prune: list[Path] = [checkpoint.complete_checkpoints(out)[-1]]  # the next to go while it is read

    def pruned_meanwhile(path):
        if path in prune:
            prune.remove(path)
            step = int(path.name.removeprefix("step_"))
            for saved in (step + 1, step + 2):
                shutil.copytree(path, path.with_name(f"step_{saved:08d}"))
            (path / checkpoint.WEIGHTS_FILE).unlink()
            threading.Timer(0.5, shutil.rmtree, [path]).start()
        return read(path)

    monkeypatch.setattr(checkpoint, "_read_checked", pruned_meanwhile)
    assert checkpoint.load_run(out)[2].name == "step_00000005"
    assert "damaged" not in capsys.readouterr().err
    newest = checkpoint.complete_checkpoints(out)[-1]
    prune.append(newest)
    with pytest.raises(checkpoint.CheckpointError, match=f"--checkpoint {newest} went away while it was read"):
        checkpoint.load_run(out, newest)


@pytest.mark.slow
def test_eval_reads_a_folder_while_its_run_saves_and_prunes_a_checkpoint_every_step(tmp_path, fmnist_shards):
    """A real run saving every step and keeping one checkpoint, read again and again meanwhile: every
    read gives a model (before, a read failed within seconds: a checkpoint pruned between the listing
    and the read has "no model weights", and a listing that runs into a save's rename sees none)."""
    recipe = tiny_recipe(
        tmp_path,
        fmnist_shards,
        train={"steps": 400},
        log={"every": 100, "trackers": []},
        checkpoint={"every": 1, "keep": 1},
    )
    out = tmp_path / "run"
    trainer = subprocess.Popen(
        [sys.executable, str(TRAIN), str(write_recipe(tmp_path / "r.yaml", recipe))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    steps = set()
    try:
        while trainer.poll() is None:
            if checkpoint.complete_checkpoints(out):
                steps.add(checkpoint.load_run(out)[2].name)
    finally:
        _, err = trainer.communicate(timeout=300)
    assert trainer.returncode == 0, err[-3000:]
    assert len(steps) >= 10, f"read while the run saved: {len(steps)} checkpoints"
