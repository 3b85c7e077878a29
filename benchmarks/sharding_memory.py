"""Per-rank training state and step time of DDP, FSDP2 (augssl's own sharding), DeepSpeed ZeRO-2 and ZeRO-3,
2 CPU processes (gloo), a timm ViT (default ViT-B/16, 224 px), SimCLR, AdamW, float32.

    python benchmarks/sharding_memory.py [--model vit_base_patch16_224] [--image-size 224] [--batch 2]
        [--warmup 1] [--steps 3] [--rounds 2] [--large] -> benchmarks/results/sharding_memory.json

Every setting is the real engine under `accelerate launch` (`launch/train.py`'s `train_main`), one after the
other in one invocation, `--rounds` times (every other round in reverse order): DDP (`--multi_gpu`), FSDP2
(`launch/accelerate/fsdp2.yaml`), ZeRO-2 and ZeRO-3 (`launch/accelerate/deepspeed_zero{2,3}.yaml`), each with
`--num_processes 2 --mixed_precision no`, on the same synthetic JPEG shards, `--batch` images per rank, data
loaded in the training process. Each process runs this script in its worker mode, which wraps
`framework.engine.train_step` (timing it) and registers a global optimizer-step pre-hook (the gradients as the
AdamW that steps sees them), then calls `train_main`. After `--warmup` + `--steps` optimizer steps every rank
writes its figures and the launch ends (no checkpoint). `--large` measures ViT-L/16 too.

What a rank holds, in bytes, counted by tensor storage (a storage shared by two tensors, e.g. ZeRO-3's
float32 partition and its model partition, or the padded flat buffer an FSDP2 shard is a view of, once):

- parameters: the model's parameters as this rank holds them (FSDP2: each DTensor's local shard; ZeRO-3:
  `ds_tensor`, and the small parameters it keeps whole) and the optimizer's own copies (ZeRO-2's
  `single_partition_of_fp32_groups`, ZeRO-3's `fp32_partitioned_groups_flat`: the params AdamW steps);
- gradients: at the AdamW step of the last timed step, the `.grad` of every parameter AdamW steps (DDP: whole;
  FSDP2: local shards; ZeRO: the flat partition) and ZeRO's gradient partitions (`averaged_gradients`,
  `grads_in_partition`, ZeRO-3's `grad_partitions_flat_buffer`). DDP's own reducer buckets (as large as the
  gradients again, `gradient_as_bucket_view=False`) are not reachable from Python and not counted;
  ZeRO's reduce buckets (`ipg_buckets`, `reduce_bucket_size` elements, allocated with `torch.empty`, touched
  only as far as gradients go through them) are reported apart, as `zero_reduce_bucket_bytes`;
- optimizer state: AdamW's `exp_avg`, `exp_avg_sq`, `step` (local shards) after the last timed step.

Also per rank: the process's peak RSS (`ru_maxrss`) and its RSS after the last step, which include what the
counts leave out (activations, all-gathered parameters, DDP's buckets, the Python heap, the libraries) and what
the allocator keeps: glibc's malloc raises its mmap threshold (up to 32 MiB) to the size of each mmapped block
freed, so the blocks FSDP2 gathers and frees per transformer block (ViT-B: 27 MiB) then come from the heap and
stay in it, while larger ones (ViT-L: 48 MiB) are mapped and unmapped, page-faulted anew, every time. glibc's
MALLOC_* variables in the environment reach the launches and are recorded (`allocator`);
MALLOC_MMAP_THRESHOLD_=65536 returns every freed large block to the system. A launch is stopped (an error in
the report) when the machine's available memory falls under `--min-available-gib`.

Step time: `train_step` (forward, the vote, backward with its reduction, AdamW), the slower rank's per step,
median over the timed steps of every round after each launch's warm-up. Ratios are each setting's figure over
DDP's from the same invocation, the step time's also per round (launches next to each other).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import RESULTS, write_report  # noqa: E402

PORT = ["--main_process_port"]
LAUNCHES = {  # setting: accelerate launch arguments (2 processes, float32 and the port added by `launch`)
    "ddp": ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"],
    "fsdp2": ["--config_file", str(ROOT / "launch" / "accelerate" / "fsdp2.yaml")],
    "zero2": ["--config_file", str(ROOT / "launch" / "accelerate" / "deepspeed_zero2.yaml")],
    "zero3": ["--config_file", str(ROOT / "launch" / "accelerate" / "deepspeed_zero3.yaml")],
}
GOALS = {"fsdp2_state_over_ddp_at_most": 0.55, "fsdp2_step_time_over_ddp_at_most": 1.2}
CATEGORIES = ("parameters", "gradients", "optimizer_state")


# ---- the worker: one process of a launch ----------------------------------------------------------------------


def tensors(value: Any) -> Iterable[torch.Tensor]:
    """Every tensor in `value` (a tensor, or lists / tuples / dicts of them, at any depth)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors(item)


def storages(values: Iterable[torch.Tensor]) -> dict[int, int]:
    """{storage address: bytes} of the storages behind `values` (DTensors: their local shard); freed ones
    (FSDP2's unsharded parameters between uses, ZeRO-3's released ones) have no address and are left out."""
    from framework.sharding import local_shard

    held: dict[int, int] = {}
    for value in values:
        storage = local_shard(value).untyped_storage()
        if storage.data_ptr() and storage.nbytes():
            held[storage.data_ptr()] = storage.nbytes()
    return held


class Probe:
    """What a rank holds and how long its steps take, read from the engine's `Run` and the stepping AdamW."""

    ZERO_GRADIENTS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer")

    def __init__(self) -> None:
        self.times: list[float] = []
        self.zero: Any = None  # DeepSpeed's ZeRO optimizer, if any
        self.gradients: dict[int, int] = {}
        self.buckets: dict[int, int] = {}
        self.stepped: list[torch.optim.Optimizer] = []

    def start(self, run: Any) -> None:
        """Before a step: forget the previous step's gradients; find ZeRO's optimizer (DeepSpeed's engine's)."""
        self.gradients, self.buckets, self.stepped = {}, {}, []
        self.zero = getattr(run.model, "optimizer", None) if run.deepspeed else None

    def before_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """Global optimizer pre-hook: the gradients of the parameters AdamW is about to step (ZeRO-3 steps
        one sub-group at a time: the union over its calls), and ZeRO's gradient partitions and buckets."""
        if not isinstance(optimizer, torch.optim.AdamW):
            return
        self.stepped.append(optimizer)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.gradients.update(storages(grads))
        if self.zero is not None:
            for name in self.ZERO_GRADIENTS:
                self.gradients.update(storages(tensors(getattr(self.zero, name, None))))
            buckets = getattr(self.zero, "ipg_buckets", {})
            self.buckets.update(storages(tensors([getattr(b, "buffer", None) for b in buckets.values()])))

    def held(self, run: Any) -> dict[str, dict[int, int]]:
        """Each category's storages on this rank after a step (gradients: as `before_step` saw them)."""
        params: list[torch.Tensor] = []
        for p in run.unwrapped.parameters():
            part = getattr(p, "ds_tensor", None)  # ZeRO-3's partition; p.data is whole only for persistent ones
            params.extend([p.data] if part is None else [part, p.data])
        optimizers = self.stepped or [getattr(run.optimizer, "optimizer", run.optimizer)]
        params.extend(p for o in optimizers for group in o.param_groups for p in group["params"])
        state = [t for o in optimizers for s in o.state.values() for t in tensors(s)]
        held = {"parameters": storages(params), "gradients": dict(self.gradients), "optimizer_state": storages(state)}
        taken: set[int] = set()
        for name in CATEGORIES:  # a storage counted once, in the first category that holds it
            held[name] = {ptr: size for ptr, size in held[name].items() if ptr not in taken}
            taken.update(held[name])
        return held

    def report(self, run: Any, warmup: int) -> dict[str, Any]:
        held = self.held(run)
        counts = {f"{name}_bytes": sum(held[name].values()) for name in CATEGORIES}
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {
            **counts,
            "state_bytes": sum(counts.values()),
            "zero_reduce_bucket_bytes": sum(self.buckets.values()),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
            "rss_after_step_bytes": rss,
            "step_seconds": self.times[warmup:],
            "warmup_step_seconds": self.times[:warmup],
            "threads": torch.get_num_threads(),
        }


def worker(dump: Path, warmup: int, timed: int, train_args: list[str]) -> None:
    """Train as `launch/train.py train_args` would; after `warmup + timed` steps write this rank's figures to
    `dump/rank<R>.json` and end the process (every rank at the same step: no collective is left waiting)."""
    import torch.distributed as dist
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from framework import engine
    from framework.cli import train_main
    from framework.distributed import ends_without_finalizing

    probe, train_step = Probe(), engine.train_step

    def timed_step(run: Any, *args: Any) -> bool:
        probe.start(run)
        start = time.perf_counter()
        last = train_step(run, *args)
        if run.accelerator.sync_gradients:
            probe.times.append(time.perf_counter() - start)
        if len(probe.times) == warmup + timed:
            rank = dist.get_rank()
            (dump / f"rank{rank}.json").write_text(json.dumps(probe.report(run, warmup)))
            dist.barrier()
            sys.stdout.flush()
            os._exit(0)
        return last

    engine.train_step = timed_step
    register_optimizer_step_pre_hook(probe.before_step)
    with ends_without_finalizing():
        train_main(train_args)
    raise SystemExit(f"the run ended before {warmup + timed} steps")


# ---- the driver: one launch per setting ---------------------------------------------------------------------


def recipe(out: Path, spec: str, args: argparse.Namespace, model: str) -> Path:
    """A SimCLR recipe on timm's `model`, AdamW, `args.batch` images per rank, no logging or checkpoint on the way."""
    from framework.testing import write_recipe

    steps = args.warmup + args.steps + 1  # the runs end after warmup + steps: the last step's checkpoint never comes
    return write_recipe(
        out / "recipe.yaml",
        {
            "output_dir": str(out / "run"),
            "data": {
                "train": spec,
                "image_size": args.image_size,
                "channels": 3,
                "mean": [0.5, 0.5, 0.5],
                "std": [0.25, 0.25, 0.25],
                "batch_size": args.batch,
                "num_workers": 0,
                "shuffle_buffer": 0,
            },
            "train": {"steps": steps, "seed": 0},
            "optim": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05},
            "log": {"every": 10 * steps, "preview_every": 0, "trackers": []},
            "checkpoint": {"every": 10 * steps},
            "plugins": {"backbones": {"encoder": f"timm/{model}"}, "simclr": {}},
        },
    )


def shards(root: Path, args: argparse.Namespace) -> str:
    """Synthetic JPEGs at the image size, enough for every step of both ranks, in 4 shards."""
    from framework.data import write_shards
    from framework.testing import synthetic_samples

    n = 4 * args.batch * (args.warmup + args.steps + 2)
    samples = synthetic_samples(n, args.image_size, 3)
    return write_shards(samples, str(root / "train-%06d.tar"), maxcount=n // 4, fmt="jpg")["pattern"]


def available_gib() -> float:
    """The memory the machine can still give (`MemAvailable`), in GiB."""
    with open("/proc/meminfo") as meminfo:
        kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
    return kib / 2**20


def watch(proc: subprocess.Popen, floor_gib: float) -> float | None:
    """Wait for the launch `proc` (its own session); should the machine's available memory fall under `floor_gib`
    first, kill the launch and its ranks (before the kernel's OOM killer picks a process, maybe another's) and
    return what was left."""
    while proc.poll() is None:
        if (left := available_gib()) < floor_gib:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return left
        time.sleep(0.5)
    return None


def launch(setting: str, recipe_file: Path, dump: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One launch of `setting`; its ranks' figures, or the error it ended with."""
    from framework.testing import free_port

    dump.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *LAUNCHES[setting],
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        *PORT,
        str(free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        str(dump),
        str(args.warmup),
        str(args.steps),
        str(recipe_file),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as stderr:
        out = subprocess.DEVNULL
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=stderr, start_new_session=True)
        short = watch(proc, args.min_available_gib)
        stderr.seek(0)
        errors = stderr.read()
    if short is not None:
        return {"error": f"stopped: the machine's available memory fell to {short:.2f} GiB (--min-available-gib)"}
    ranks = [json.loads(p.read_text()) for p in sorted(dump.glob("rank*.json"))]
    if proc.returncode != 0 or len(ranks) != 2:
        return {"error": first_error(errors) or f"exit {proc.returncode}"}
    per_step = [max(times) for times in zip(*(r["step_seconds"] for r in ranks), strict=True)]
    return {
        "per_rank": ranks,
        "state_bytes_max_rank": max(r["state_bytes"] for r in ranks),
        "peak_rss_bytes_max_rank": max(r["peak_rss_bytes"] for r in ranks),
        "step_seconds": per_step,  # the slower rank's, per timed step
        "launch_seconds": round(time.perf_counter() - start, 1),
        "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)],  # at the launch's start and end
    }


def summary(launches: list[dict[str, Any]]) -> dict[str, Any]:
    """A setting's figures over its rounds: the state (the same every round), the highest peak RSS, the median
    step time over every timed step of every round."""
    failed = [launch for launch in launches if "error" in launch]
    if failed:
        return {"error": failed[0]["error"], "rounds": launches}
    states = {launch["state_bytes_max_rank"] for launch in launches}
    return {
        "state_bytes_max_rank": max(states),
        "state_bytes_same_every_round": len(states) == 1,
        "peak_rss_bytes_max_rank": max(launch["peak_rss_bytes_max_rank"] for launch in launches),
        "step_seconds_median": statistics.median(t for launch in launches for t in launch["step_seconds"]),
        "rounds": launches,
    }


def first_error(stderr: str) -> str | None:
    """The line a failed launch's rank ended with: augssl's one line, else an exception's last line."""
    lines = stderr.splitlines()
    ours = [ln for ln in lines if ln.startswith("augssl: error")]
    raised = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln) and "ChildFailedError" not in ln]
    return next(iter(ours or raised), None)


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each setting's state bytes, peak RSS and median step time over DDP's."""
    ddp = results.get("ddp", {})
    if "error" in ddp or not ddp:
        return {}
    out = {}
    for setting, result in results.items():
        if setting == "ddp" or "error" in result:
            continue
        out[f"{setting}_over_ddp"] = {
            key: round(result[key] / ddp[key], 3)
            for key in ("state_bytes_max_rank", "peak_rss_bytes_max_rank", "step_seconds_median")
        }
        out[f"{setting}_over_ddp"]["step_seconds_median_per_round"] = [  # launches next to each other
            round(statistics.median(mine["step_seconds"]) / statistics.median(theirs["step_seconds"]), 3)
            for mine, theirs in zip(result["rounds"], ddp["rounds"], strict=True)
        ]
    return out


def measure(model: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Every setting on `model`, one after the other, `args.rounds` times (every other round in reverse order, so
    that a load that comes and goes falls on every setting alike), on the same shards and recipe."""
    spec = shards(tmp / f"{model}_shards", args)
    launches: dict[str, list[dict[str, Any]]] = {setting: [] for setting in args.settings}
    for round_ in range(args.rounds):
        for setting in args.settings if round_ % 2 == 0 else args.settings[::-1]:
            out = tmp / f"{model}_{setting}_{round_}"
            out.mkdir()
            launches[setting].append(launch(setting, recipe(out, spec, args, model), out / "dump", args))
            brief = {k: v for k, v in launches[setting][-1].items() if k != "per_rank"}
            print(json.dumps({f"{model}/{setting}/round{round_}": brief}), flush=True)
    results = {setting: summary(runs) for setting, runs in launches.items()}
    found = ratios(results)
    fsdp2 = found.get("fsdp2_over_ddp")
    goals = {}
    if fsdp2:
        state, step = fsdp2["state_bytes_max_rank"], fsdp2["step_seconds_median"]
        goals = {
            "fsdp2_state_over_ddp": {"value": state, "goal": GOALS["fsdp2_state_over_ddp_at_most"]},
            "fsdp2_step_time_over_ddp": {"value": step, "goal": GOALS["fsdp2_step_time_over_ddp_at_most"]},
        }
        for goal in goals.values():
            goal["met"] = goal["value"] <= goal["goal"]
    with torch.device("meta"):
        import timm

        params = sum(p.numel() for p in timm.create_model(model, num_classes=0, img_size=args.image_size).parameters())
    return {"encoder": f"timm/{model}", "encoder_params": params, "results": results, "ratios": found, "goals": goals}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, dump, warmup, timed, *train_args = sys.argv
        worker(Path(dump), int(warmup), int(timed), train_args)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224", help="a timm model name")
    ap.add_argument("--large", action="store_true", help="also measure timm's vit_large_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2, help="images per rank and step (x 2 SimCLR views)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps after the warm-up")
    ap.add_argument("--settings", nargs="+", choices=list(LAUNCHES), default=list(LAUNCHES))
    ap.add_argument("--rounds", type=int, default=2, help="launches of every setting (step times pooled)")
    ap.add_argument(
        "--min-available-gib",
        type=float,
        default=1.25,
        help="stop a launch (its result: an error) when the machine's available memory falls under this",
    )
    ap.add_argument("--out", default=str(RESULTS / "sharding_memory.json"))
    args = ap.parse_args()
    if "ddp" not in args.settings:
        ap.error("--settings must include ddp: every ratio is over DDP's")
    models = [args.model, *(["vit_large_patch16_224"] if args.large else [])]
    report: dict[str, Any] = {
        "benchmark": "sharding_memory",
        "what": "SimCLR training step (2 views, projector, NT-Xent, backward, AdamW), CPU, float32, 2 processes",
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "backend": "gloo",
        "processes": 2,
        "threads_per_process": 1,
        "image_size": args.image_size,
        "batch_per_rank": args.batch,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "rounds": args.rounds,
        "allocator": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "glibc's defaults",
        "goals": GOALS,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            report["models"][model] = measure(model, args, Path(tmp))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))  # a later model's failure keeps this one
    report["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
