"""What a user sees while a run trains: a progress bar, TensorBoard scalars, metrics.jsonl.

All of it happens on the main process only, once per `train.log_every` steps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from accelerate import Accelerator


class RunLogger:
    """Progress bar + Accelerate trackers + `<output_dir>/metrics.jsonl` (one JSON object per log)."""

    def __init__(self, accelerator: Accelerator, output_dir: str | Path, total_steps: int, start_step: int) -> None:
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = Path(output_dir) / "metrics.jsonl"
        # On a terminal a progress bar; written to a file or a pipe (a cluster's job log) one line per log
        # instead, since every carriage-return update of a bar would be kept there.
        self.lines = self.main and not sys.stderr.isatty()
        self.total = total_steps
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not self.main or self.lines, unit="step",
                        dynamic_ncols=True)  # fmt: skip
        self._t0 = time.perf_counter()
        self._images = 0

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
            main_terms = {k: f"{v:.4g}" for k, v in values.items() if k in ("epoch", "loss", "images/s") or k.count(".") == 1}
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
