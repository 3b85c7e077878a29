"""What a user sees while a run trains: a progress bar, TensorBoard scalars, metrics.jsonl.

Every rank adds each micro-step's loss, terms and metrics to running sums on its device
(`RunLogger.accumulate`); once per `log.every` steps every rank reduces them to the
interval's means (`RunLogger.interval_record`) and the main process writes the record
(`RunLogger.log`). `read_metrics` reads `metrics.jsonl` back.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from accelerate import Accelerator

    from framework.data.stream import StreamPosition


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `<output_dir>/metrics.jsonl`."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def logged_lrs(
    plugins: Mapping[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any, lr: float
) -> dict[str, float]:
    """`lr`: the learning rate of `optim.lr` now (`lr`, scheduled); `lr/<plugin>` for each plugin whose
    section (in `plugins`) sets its own `lr` (e.g. the online probe), as the scheduler set its param group."""
    own = {name for name, cfg in plugins.items() if getattr(cfg, "lr", None) is not None}
    groups = zip((g.get("plugin") for g in optimizer.param_groups), scheduler.get_last_lr(), strict=False)
    return {"lr": lr, **{f"lr/{plugin}": value for plugin, value in groups if plugin in own}}


class RunLogger:
    """Progress bar + Accelerate trackers + `<output_dir>/metrics.jsonl` (one JSON object per log),
    and the log interval's running sums."""

    def __init__(self, accelerator: Accelerator, output_dir: str | Path, total_steps: int, start_step: int) -> None:
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = Path(output_dir) / "metrics.jsonl"
        # On a terminal a progress bar; written to a file or a pipe (a cluster's job log) one line per log
        # instead, since every carriage-return update of a bar would be kept there.
        self.lines = self.main and not sys.stderr.isatty()
        self.total = total_steps
        self.bar = tqdm(
            total=total_steps, initial=start_step, disable=not self.main or self.lines, unit="step", dynamic_ncols=True
        )
        self._t0 = time.perf_counter()
        self._images = 0
        self._running: dict[str, torch.Tensor] = {}
        self._summed = 0  # micro-steps in `_running` (skipped non-finite ones are not)

    def accumulate(self, values: dict[str, torch.Tensor]) -> None:
        """Add one micro-step's values (loss, terms, metrics) to the interval's sums: device ops, no sync."""
        for name, value in values.items():
            self._running[name] = self._running.get(name, 0) + value.detach().float()
        self._summed += 1

    def interval_record(self, position: StreamPosition) -> dict[str, float]:
        """The interval's mean of every running sum over all ranks and the micro-steps summed, and
        the data counters summed over ranks (`data.bad_records`, `data.seen`); starts the next
        interval. Every rank calls it: one all-reduce, one `.tolist()`."""
        names = sorted(self._running)
        counts = torch.tensor([float(position.bad_total), float(position.seen_total)])
        stats = torch.cat([torch.stack([self._running[n] for n in names]), counts.to(self.accelerator.device)])
        values = self.accelerator.reduce(stats, "sum").tolist()  # sync point: one per log interval
        n = self.accelerator.num_processes * self._summed
        self._running, self._summed = {}, 0
        return {
            **{name: v / n for name, v in zip(names, values, strict=False)},
            "data.bad_records": values[-2],
            "data.seen": values[-1],
        }

    def count_images(self, n: int) -> None:
        self._images += n

    def images_per_second(self) -> float:
        """Images/s over every process since the last call (resets the window)."""
        now = time.perf_counter()
        rate = self._images * self.accelerator.num_processes / max(now - self._t0, 1e-9)
        self._t0, self._images = now, 0
        return rate

    def log(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, **values}
        self.accelerator.log(values, step=step)
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            main_terms = {
                k: f"{v:.4g}" for k, v in values.items() if k in ("epoch", "loss", "images/s") or k.count(".") == 1
            }
            if self.lines:
                terms = " ".join(f"{k}={v}" for k, v in main_terms.items())
                print(f"augssl: step {step}/{self.total} {terms}", file=sys.stderr, flush=True)
            self.bar.set_postfix(main_terms, refresh=False)

    def preview(self, step: int, rows: dict[str, Any], mean: Any, std: Any) -> None:
        """`<output_dir>/previews/step_<N>.png`: the views and the plugins' preview images."""
        if self.main:
            from framework.plots import save_preview

            save_preview(self.path.parent / "previews" / f"step_{step:08d}.png", rows, mean, std)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
