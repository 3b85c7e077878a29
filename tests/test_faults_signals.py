"""Surviving the cluster, on real processes: a signal ends a run after a checkpoint of exactly that
step (one process, and 2 ranks through `accelerate launch`), the Slurm script requeues itself on its
pre-timeout signal, an elastic launch restarts a group that lost a rank, a stalled rank is named,
and what a run logs (the lr of `train.lr`, one line per log when not on a terminal, no DeepSpeed).
"""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from framework import checkpoint
from framework.logging import read_metrics
from framework.preemption import EXIT_PREEMPTED
from framework.testing import free_port, run_steps, tiny_recipe, write_recipe
from tests.helpers import ENV, ROOT

DDP2 = [
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "weights_rank0.pt")


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [r["step"] for r in read_metrics(out)] if path.exists() else []


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while max(logged_steps(out), default=0) < step:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.05)


def newest_step(out: Path) -> int:
    return int(checkpoint.complete_checkpoints(out)[-1].name.removeprefix("step_"))


# ---------------------------------------------------------------------------
# 1. Signals: finish the step, checkpoint it, exit 75; resume is exact
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["TERM", "INT", "USR1"])
def test_a_signal_between_checkpoints_checkpoints_that_step_and_the_resumed_run_ends_bit_identical(
    tmp_path, fmnist_shards, name
):
    """The signal reaches the whole process group (trainer and its 2 data workers, as Ctrl-C or
    Slurm's do) at the end of step K, after that step's vote, so step K + 1 is the one in progress
    when the run sees it (no periodic checkpoint before the end): exit 75, one line naming the
    checkpoint of step K + 1, and `train.resume=auto` ends with an uninterrupted run's weights."""
    signal_at = random.randint(2, 4)
    stop_at = signal_at + 1
    paths = {}
    for run in ("whole", "stopped"):
        recipe = tiny_recipe(
            tmp_path / run, fmnist_shards, train={"steps": 6, "checkpoint_every": 1000}, data={"num_workers": 2}
        )
        paths[run] = write_recipe(tmp_path / f"{run}.yaml", recipe)
    script = [sys.executable, str(ROOT / "tests" / "kill_train.py")]
    env = {**ENV, "AUGSSL_TEST_SIGNAL": name}
    assert subprocess.run([*script, str(paths["whole"]), "0"], env=env, cwd=ROOT, timeout=180).returncode == 0
    proc = subprocess.run(
        [*script, str(paths["stopped"]), str(signal_at)],
        env=env,
        cwd=ROOT,
        timeout=180,
        capture_output=True,
        text=True,
        start_new_session=True,
    )
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f"augssl: stopped by SIG{name} after step {stop_at}; checkpoint ")
        and "Traceback" not in proc.stderr
    )
    out = tmp_path / "stopped" / "run"
    assert newest_step(out) == stop_at and logged_steps(out) == list(range(1, stop_at + 1))
    resumed = subprocess.run(
        [*script, str(paths["stopped"]), "0"], env=ENV, cwd=ROOT, timeout=180, capture_output=True, text=True
    )
    assert resumed.returncode == 0 and f"at step {stop_at}" in resumed.stdout, resumed.stderr[-3000:]
    assert logged_steps(out) == list(range(1, 7))
    whole, again = final_weights(tmp_path / "whole" / "run"), final_weights(out)
    assert [k for k in whole if not torch.equal(whole[k], again[k])] == []


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_both_ranks_after_the_same_step_and_resume_is_exact(tmp_path, fmnist_shards):
    """`accelerate launch` (torchrun's agent) passes SIGTERM on to both ranks at slightly different
    moments; the stop request rides on the per-step vote, so both stop after the same step, whose
    checkpoint the resumed launch continues to the end of an uninterrupted 2-process run."""
    runs = {}
    for run in ("whole", "stopped"):
        recipe = tiny_recipe(tmp_path / run, fmnist_shards, train={"steps": 40, "checkpoint_every": 1000})
        runs[run] = write_recipe(tmp_path / f"{run}.yaml", recipe)

    def launch(path: Path) -> subprocess.Popen:
        cmd = [
            *LAUNCH,
            *DDP2,
            "--main_process_port",
            str(free_port()),
            str(ROOT / "tests" / "dist_train.py"),
            str(path),
        ]
        return subprocess.Popen(
            cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )

    whole = launch(runs["whole"])
    assert whole.wait(timeout=300) == 0, whole.communicate()[1][-3000:]
    stopped, out = launch(runs["stopped"]), tmp_path / "stopped" / "run"
    wait_for_step(out, 3, stopped)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    assert "stopped by SIGTERM after step" in err, err[-3000:]
    step = newest_step(out)
    assert 3 <= step < 40 and logged_steps(out)[-1] == step
    resumed = launch(runs["stopped"])
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-3000:]
    assert logged_steps(out) == list(range(1, 41))
    a, b = final_weights(tmp_path / "whole" / "run"), final_weights(out)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_the_same_request_arriving_twice_does_not_stop_the_run_at_once():
    """Under Slurm a rank gets SIGTERM from Slurm and again from torchrun's agent, milliseconds apart:
    the second must not be taken for "stop now" (which would lose the checkpoint)."""
    from framework.preemption import StopRequests

    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # within SAME_REQUEST_SECONDS: the same request
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM, "still alive, and asked to stop after this step"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handlers are restored"


FAKE_SRUN = """#!/bin/bash
# srun for one node: drop srun's options, run the task here as node 0
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
  show) echo 127.0.0.1 ;;
  *) echo "$@" >> "$FAKE_SLURM_LOG" ;;
esac
"""


@pytest.mark.slow
def test_the_slurm_script_requeues_the_job_on_its_pre_timeout_signal(tmp_path, fmnist_shards):
    """launch/slurm/pretrain.sbatch run by bash with stand-ins for srun and scontrol (one node, 2
    CPU processes): SIGUSR1 to the batch script (what `--signal=B:USR1@180` sends) reaches both
    ranks as SIGTERM, the step is checkpointed, and the script runs `scontrol requeue <job>`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards, train={"steps": 60}))
    env = {
        **ENV,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node0",
        "SLURM_NNODES": "1",
        "GPUS_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "FAKE_SLURM_LOG": str(tmp_path / "slurm.log"),
        "OMP_NUM_THREADS": "1",
    }
    job = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "slurm" / "pretrain.sbatch"), str(recipe)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out = tmp_path / "run"
    wait_for_step(out, 2, job)
    job.send_signal(signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=120)
    assert "requeueing job 4242" in stdout and (tmp_path / "slurm.log").read_text() == "requeue 4242\n"
    assert "stopped by SIGTERM after step" in stderr, stderr[-3000:]
    assert 2 <= newest_step(out) < 60 and logged_steps(out)[-1] == newest_step(out)


# ---------------------------------------------------------------------------
# 2. Elastic restart
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_an_elastic_launch_restarts_a_group_that_lost_a_rank_and_finishes_the_run(tmp_path, fmnist_shards):
    """`--max_restarts 2 --rdzv_backend c10d`: SIGKILL one of 2 ranks mid-run; the agent restarts the
    group, which resumes from the newest checkpoint (`train.resume: auto`) and trains to the last step.
    (Without `distributed.init_restarted_group` the restarted ranks read the dead attempt's addresses
    from the agent's store and failed to connect in 2 of 3 runs here.)"""
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards, train={"steps": 30, "checkpoint_every": 2})
    )
    cmd = [
        *LAUNCH,
        *DDP2,
        "--max_restarts",
        "2",
        "--monitor_interval",
        "1",
        "--rdzv_backend",
        "c10d",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        str(ROOT / "tests" / "dist_train.py"),
        str(recipe),
    ]
    job = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "run"
    wait_for_step(out, 5, job)
    ranks = [p for p in psutil.Process(job.pid).children() if "dist_train.py" in " ".join(p.cmdline())]  # the agent's
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    victim = random.choice(ranks)
    victim.kill()
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, "\n".join(line for line in stderr.splitlines() if "rror" in line or "augssl" in line)
    assert "resumed from" in stdout and newest_step(out) == 30 and logged_steps(out)[-1] == 30
    assert (out / "weights_rank0.pt").is_file() and (out / "weights_rank1.pt").is_file()


# ---------------------------------------------------------------------------
# 3. A stalled rank is named
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_rank_that_stops_answering_makes_the_others_stop_with_a_line_naming_it(tmp_path, fmnist_shards):
    """Rank 1 stalls for 12 s in step 2 (a dead storage mount, a hung kernel); with
    `distributed.timeout_seconds: 3` rank 0 stops within seconds saying which collective waited."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards, distributed={"timeout_seconds": 3}))
    cmd = [
        *LAUNCH,
        *DDP2,
        "--main_process_port",
        str(free_port()),
        str(ROOT / "tests" / "dist_train.py"),
        str(recipe),
        "train.steps=4",
    ]
    started = time.monotonic()
    proc = subprocess.run(
        cmd, env={**ENV, "AUGSSL_TEST_SLEEP": "1:1:12"}, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and time.monotonic() - started < 60
    assert (
        "augssl: error: rank 0 of 2: step 2: the non-finite/stop vote: the other ranks did not answer within "
        "distributed.timeout_seconds"
    ) in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------------------
# 10-11. What a run logs
# ---------------------------------------------------------------------------


def test_the_logged_lr_is_train_lrs_and_each_plugin_lr_is_logged_by_name(tmp_path, fmnist_shards):
    """The online probe trains at its own lr (1e-4); `lr` used to be the first param group's."""
    plugins = {
        "probe": {"lr": 1e-4},
        "backbones": {"encoder": "conv28", "latent_dim": 16, "decoder": "conv28"},
        "kl": {},
    }
    out = run_steps(
        tiny_recipe(tmp_path, fmnist_shards, plugins=plugins, train={"lr": 1e-3, "warmup_steps": 4}), steps=2
    )
    records = read_metrics(out)
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * 2 / 4, 1e-3 * 3 / 4])
    assert [r["lr/probe"] for r in records] == pytest.approx([1e-4 * 2 / 4, 1e-4 * 3 / 4])
    assert not any(k.startswith("lr/") and k != "lr/probe" for k in records[0])


@pytest.mark.slow
def test_a_run_logged_to_a_file_writes_one_line_per_log_and_never_imports_deepspeed(tmp_path, fmnist_shards):
    """stderr to a file (a cluster's job log): no progress-bar redraws, one line per `train.log_every`
    steps; a run without DeepSpeed does not import it (its "Setting accelerator to CPU" warning)."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards, train={"steps": 4, "log_every": 2}))
    code = (
        "import sys; from framework.cli import train_main; train_main(sys.argv[1:]); "
        "print('deepspeed imported:', 'deepspeed' in sys.modules)"
    )
    with (tmp_path / "log.txt").open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(recipe)],
            env=ENV,
            cwd=ROOT,
            stderr=log,
            stdout=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    text = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0 and "deepspeed imported: False" in proc.stdout, text[-2000:]
    assert "\r" not in text and "Setting accelerator" not in text
    assert [line.split()[2] for line in text.splitlines() if line.startswith("augssl: step ")] == ["2/4", "4/4"]
