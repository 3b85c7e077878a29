"""Surviving the cluster, on real processes: a signal ends a run after a checkpoint of exactly that
step (one process, and 2 ranks through `accelerate launch`, whose status 75 reaches the batch
script), a second signal while it stops still exits 75, a signal before the first batch stops the
run, a batch larger than the shards is refused, a data worker killed by the OOM killer is named
after a checkpoint, the Slurm script requeues itself on its pre-timeout signal, an elastic launch
restarts a group that lost a rank, a stalled rank is named, and what a run logs (the lr of
`optim.lr`, one line per log when not on a terminal, no DeepSpeed).
"""

from __future__ import annotations

import os
import random
import shutil
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
from framework.data import shard_urls
from framework.logging import read_metrics
from framework.preemption import EXIT_PREEMPTED
from framework.testing import free_port, run_steps, tiny_recipe, write_recipe
from tests.helpers import ENV, ROOT, logged_steps, newest_step, one_line, wait_for_step

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
            tmp_path / run, fmnist_shards, train={"steps": 6}, checkpoint={"every": 1000}, data={"num_workers": 2}
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
        recipe = tiny_recipe(tmp_path / run, fmnist_shards, train={"steps": 40}, checkpoint={"every": 1000})
        runs[run] = write_recipe(tmp_path / f"{run}.yaml", recipe)

    status = tmp_path / "exit_status"

    def launch(path: Path) -> subprocess.Popen:
        cmd = [
            *LAUNCH,
            *DDP2,
            "--main_process_port",
            str(free_port()),
            str(ROOT / "tests" / "dist_train.py"),
            str(path),
        ]
        env = {**ENV, "AUGSSL_EXIT_STATUS_FILE": str(status)}
        return subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )

    whole = launch(runs["whole"])
    assert whole.wait(timeout=300) == 0, whole.communicate()[1][-3000:]
    assert status.read_text() == "0\n"
    stopped, out = launch(runs["stopped"]), tmp_path / "stopped" / "run"
    wait_for_step(out, 3, stopped)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    assert "stopped by SIGTERM after step" in err, err[-3000:]
    # torchrun's agent exits 128 + SIGTERM whatever its ranks return; rank 0's 75 is in the status file
    assert stopped.returncode == 128 + signal.SIGTERM and status.read_text() == f"{EXIT_PREEMPTED}\n"
    step = newest_step(out)
    assert 3 <= step < 40 and logged_steps(out)[-1] == step
    resumed = launch(runs["stopped"])
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-3000:]
    assert logged_steps(out) == list(range(1, 41))
    a, b = final_weights(tmp_path / "whole" / "run"), final_weights(out)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_the_same_request_arriving_twice_does_not_stop_the_run_at_once():
    """Under Slurm a rank gets SIGTERM from Slurm and again from torchrun's agent, milliseconds apart:
    the second must not be taken for "stop now" (which would lose the checkpoint). Once stopping, the
    process ignores further SIGTERMs (a scheduler's repeated one must not turn its exit 75 into a death
    by signal); SIGINT gets its handler back."""
    from framework.preemption import StopRequests

    try:
        with StopRequests() as stop:
            stop.defer()  # the run holds a batch: a request waits for the vote
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # within SAME_REQUEST_SECONDS: the same request
            time.sleep(0.05)
            assert stop.signum == signal.SIGTERM, "still alive, and asked to stop after this step"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


@pytest.mark.slow
def test_a_second_sigterm_while_the_run_stops_still_exits_75_with_one_line(tmp_path, fmnist_shards):
    """The first SIGTERM at the end of step 2; step 3, the step in progress, is slow to end (its hook
    sleeps 20 s, as a big checkpoint on a slow disk would); a second SIGTERM 3 s later stops at once
    (it used to kill the process by the signal: status -15, which no scheduler takes for "requeue").
    Step 3 is not checkpointed; the line names the newest checkpoint, which resumes."""
    recipe = tiny_recipe(tmp_path, fmnist_shards, train={"steps": 6}, checkpoint={"every": 2}, data={"num_workers": 2})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    env = {**ENV, "AUGSSL_TEST_SIGNAL": "TERM", "AUGSSL_TEST_SLOW_STOP": "20"}
    script = [sys.executable, str(ROOT / "tests" / "kill_train.py"), str(path)]
    proc = subprocess.Popen(
        [*script, "2"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out = tmp_path / "run"
    wait_for_step(out, 2, proc)
    time.sleep(3)  # past the 2 s in which a repeated signal counts as the same request
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("augssl: ") and not line.startswith("augssl: step ")]
    newest = checkpoint.complete_checkpoints(out)[-1]
    assert proc.returncode == EXIT_PREEMPTED and "Traceback" not in err, err[-3000:]
    assert lines == [
        f"augssl: stopped by SIGTERM at once on a second request (at step 3); checkpoint {newest} "
        "(train.resume: auto continues from it)"
    ], err[-3000:]
    assert newest.name == "step_00000002"
    resumed = subprocess.run([*script, "0"], env=ENV, cwd=ROOT, timeout=180, capture_output=True, text=True)
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout, resumed.stderr[-3000:]


def bare_shards(tmp_path: Path, spec: str) -> str:
    """A copy of the shards of `spec` without their manifest: nothing tells how many records they hold."""
    folder = tmp_path / "bare"
    folder.mkdir()
    for url in shard_urls(spec):
        shutil.copy(url, folder)
    return str(folder / Path(spec).name)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_sigterm_before_the_first_batch_stops_the_run_at_once(tmp_path, fmnist_shards, num_workers):
    """A batch of 10^9 from 192 records (shards without a manifest, so nothing refuses it) never
    comes; SIGTERM while the trainer waits for it used to print "stopping after this step" and wait
    on: now exit 75, one line, no checkpoint (there was no step)."""
    shards = {"train": bare_shards(tmp_path, fmnist_shards["train"]), "test": fmnist_shards["test"]}
    recipe = tiny_recipe(tmp_path, shards, data={"num_workers": num_workers, "batch_size": 10**9})
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), str(write_recipe(tmp_path / "r.yaml", recipe))]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    while "augssl: global batch" not in (line := proc.stdout.readline()):  # the run is set up
        assert line, proc.communicate()[1][-3000:]
    time.sleep(3)  # waiting for its first batch
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "augssl: stopped by SIGTERM before the first step; no checkpoint yet (a rerun starts at step 0)"
    )
    assert not checkpoint.complete_checkpoints(tmp_path / "run")


@pytest.mark.slow
def test_a_batch_larger_than_the_shards_hold_is_refused_in_one_line(tmp_path, fmnist_shards):
    """192 records by their manifest: a batch of 97 on each of 2 processes, or of 10^9, cannot be filled."""
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards))
    error = one_line([path, "data.batch_size=1000000000"])
    assert error == (
        f"augssl: error: data.batch_size=1000000000 is more than the 192 records data.train holds "
        f"({fmnist_shards['train']}): lower data.batch_size"
    )
    assert not (tmp_path / "run").exists(), "refused before the run folder is made"


def data_workers(launcher: int) -> dict[int, list[psutil.Process]]:
    """The data workers of each rank of an `accelerate launch` (torch names them pt_data_worker), by rank."""
    ranks = [p for p in psutil.Process(launcher).children() if "train.py" in " ".join(p.cmdline())]
    workers = {int(r.environ()["RANK"]): [w for w in r.children() if w.name() == "pt_data_worker"] for r in ranks}
    return {rank: sorted(found, key=lambda w: (w.create_time(), w.pid)) for rank, found in workers.items()}


@pytest.mark.slow
def test_a_data_worker_killed_by_sigkill_stops_both_ranks_after_a_checkpoint_in_one_line(tmp_path, fmnist_shards):
    """2 ranks x 2 data workers; one of rank 1's workers is SIGKILLed (as the out-of-memory killer
    does). It used to take the trainer down with a traceback and no checkpoint (torch raises from
    its SIGCHLD handler wherever the trainer is); now both ranks checkpoint the last completed step
    and stop, one line naming the worker and the likely cause, and the run resumes from there."""
    recipe = tiny_recipe(
        tmp_path, fmnist_shards, train={"steps": 500}, checkpoint={"every": 1000}, data={"num_workers": 2}
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)
    cmd = [*LAUNCH, *DDP2, "--main_process_port", str(free_port()), str(ROOT / "launch" / "train.py"), str(path)]
    job = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "run"
    wait_for_step(out, 3, job)
    workers = data_workers(job.pid)[1]
    worker = random.randrange(len(workers))
    victim = workers[worker]
    victim.kill()
    _, err = job.communicate(timeout=180)
    errors = [line for line in err.splitlines() if line.startswith("augssl: error: ")]
    newest = checkpoint.complete_checkpoints(out)[-1]
    step = newest_step(out)
    launcher_only = err.count("Traceback") == err.count("ChildFailedError:")  # torchrun's report of a failed rank
    assert len(errors) == 1 and launcher_only and job.returncode != 0, err[-3000:]
    assert errors[0] == (
        f"augssl: error: rank 1, data worker {worker} (pid {victim.pid}) was killed by SIGKILL, most likely by "
        "the out-of-memory killer (the kernel's log or the job's memory accounting says so): lower "
        "data.batch_size, data.shuffle_buffer or data.num_workers, or give the job more memory; "
        f"checkpoint {newest} holds step {step} (train.resume: auto continues from it)"
    )
    assert 3 <= step < 500 and logged_steps(out)[-1] == step, "the last completed step"
    resumed = subprocess.run(
        [
            *LAUNCH,
            *DDP2,
            "--main_process_port",
            str(free_port()),
            str(ROOT / "launch" / "train.py"),
            str(path),
            f"train.steps={step + 2}",
        ],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout, resumed.stderr[-3000:]
    assert logged_steps(out)[-3:] == [step, step + 1, step + 2]


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
@pytest.mark.parametrize("name", ["USR1", "TERM"])
def test_the_slurm_script_exits_75_and_requeues_the_job_on_its_pre_timeout_signal(tmp_path, fmnist_shards, name):
    """launch/slurm/pretrain.sbatch run by bash with stand-ins for srun and scontrol (one node, 2
    CPU processes of launch/train.py under `accelerate launch`): SIGUSR1 to the batch script (what
    `--signal=B:USR1@180` sends) or SIGTERM (preemption, scancel) reaches both ranks as SIGTERM, the
    step is checkpointed, and the script exits 75, rank 0's status (`accelerate launch` exits 143);
    after SIGUSR1 it runs `scontrol requeue <job>` first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / tool).write_text(text)
        (bin_dir / tool).chmod(stat.S_IRWXU)
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
        "TMPDIR": str(tmp_path),
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
    job.send_signal(getattr(signal, f"SIG{name}"))
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == EXIT_PREEMPTED, stderr[-3000:]
    requeued = name == "USR1"
    assert ("requeueing job 4242" in stdout) == requeued
    assert (tmp_path / "slurm.log").exists() == requeued and (
        not requeued or (tmp_path / "slurm.log").read_text() == "requeue 4242\n"
    )
    assert "stopped by SIGTERM after step" in stderr, stderr[-3000:]
    assert 2 <= newest_step(out) < 60 and logged_steps(out)[-1] == newest_step(out)
    assert not list(tmp_path.glob("augssl-exit-status-*")), "the status file is removed"


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
        tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards, train={"steps": 30}, checkpoint={"every": 2})
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
        tiny_recipe(tmp_path, fmnist_shards, plugins=plugins, optim={"lr": 1e-3, "warmup_steps": 4}), steps=2
    )
    records = read_metrics(out)
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * 2 / 4, 1e-3 * 3 / 4])
    assert [r["lr/probe"] for r in records] == pytest.approx([1e-4 * 2 / 4, 1e-4 * 3 / 4])
    assert not any(k.startswith("lr/") and k != "lr/probe" for k in records[0])


@pytest.mark.slow
def test_a_run_logged_to_a_file_writes_one_line_per_log_and_never_imports_deepspeed(tmp_path, fmnist_shards):
    """stderr to a file (a cluster's job log): no progress-bar redraws, one line per `log.every`
    steps; a run without DeepSpeed does not import it (its "Setting accelerator to CPU" warning)."""
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_recipe(tmp_path, fmnist_shards, train={"steps": 4}, log={"every": 2})
    )
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
