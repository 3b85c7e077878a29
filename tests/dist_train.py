"""Run by tests under `accelerate launch`: train a recipe and dump each rank's weights.

    accelerate launch --multi_gpu --num_processes 2 tests/dist_train.py RECIPE [key=value ...]

A plugin (tests/helpers.py's `DumpWeights`) saves every rank's modules after the last step to
`<output_dir>/weights_rank<R>.pt`, so a test can check that the ranks agree; another can make
one rank's loss NaN at one micro-step, drop one head's gradients (`AUGSSL_TEST_FREEZE=1`, `FrozenHead`), add a
view that splits (`AUGSSL_TEST_BRIGHT=1`, `DeviceBright`), or
record the autocast state the hooks run under
(environment variables, see `NaNOnRank`).
"""

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework import distributed, hookimpl  # noqa: E402
from framework.cli import train_or_exit  # noqa: E402
from framework.preemption import exit_status_file  # noqa: E402
from framework.startup import load_recipe  # noqa: E402
from tests.helpers import DeviceBright, DumpWeights, FrozenHead  # noqa: E402


class NaNOnRank:
    """`AUGSSL_TEST_NAN=R:K`: a term that is NaN on rank R at forward K (0-based micro-steps), else 0;
    `AUGSSL_TEST_NAN=R:K:grad`: a term that is 0 there but whose gradient is NaN;
    `AUGSSL_TEST_SLEEP=R:K:S`: rank R sleeps S seconds at forward K (a stalled rank);
    `AUGSSL_TEST_AUTOCAST=path`: write the autocast state seen inside the hooks on the first forward (and
    the output dtype of the encoder's first Linear, when it has one)."""

    def __init__(self) -> None:
        rank, call, *grad = os.environ.get("AUGSSL_TEST_NAN", "-1:-1").split(":")
        self.rank, self.call, self.calls, self.grad = int(rank), int(call), 0, bool(grad)

    @hookimpl
    def regularize(self, ctx):
        x = ctx.views["x"]
        if (path := os.environ.get("AUGSSL_TEST_AUTOCAST")) and self.calls == 0:
            h = ctx.encode("x").h
            state = {
                "enabled": torch.is_autocast_enabled(x.device.type),
                "h": str(h.dtype),
                "dtype": str(torch.get_autocast_dtype(x.device.type)),
            }
            linear = next((m for m in ctx.encoder.modules() if isinstance(m, torch.nn.Linear)), None)
            if linear is not None:  # e.g. a ViT, whose pooled h leaves a float32 LayerNorm: its first matmul
                seen = []
                handle = linear.register_forward_hook(lambda module, args, out: seen.append(str(out.dtype)))
                ctx.encode_tensor(x)
                handle.remove()
                state["first_linear"] = seen[0]
            Path(path).with_name(f"{Path(path).name}.rank{distributed.rank()}").write_text(json.dumps(state))
        bad = distributed.rank() == self.rank and self.calls == self.call
        if sleep := os.environ.get("AUGSSL_TEST_SLEEP"):  # R:K:S: rank R sleeps S seconds at forward K
            rank, call, seconds = sleep.split(":")
            if distributed.rank() == int(rank) and self.calls == int(call):
                time.sleep(float(seconds))
        self.calls += 1
        if bad and self.grad:  # d sqrt(u)/du at u = 0 is inf; times d(h * 0)/dh = 0: NaN gradients
            return {"nan": torch.sqrt((ctx.encode("x").h * 0).sum())}
        return {"nan": torch.full((), math.nan if bad else 0.0, device=x.device)}


if __name__ == "__main__":
    extra = {"dump": DumpWeights(), "nan": NaNOnRank()}
    if os.environ.get("AUGSSL_TEST_FREEZE"):  # a plugin dropping one head's gradients in on_after_backward
        extra["freeze"] = FrozenHead()
    if os.environ.get("AUGSSL_TEST_BRIGHT"):  # a view that splits, its device step's draws written per rank
        extra["bright"] = DeviceBright()
    recipe, hooks = load_recipe(sys.argv[1], sys.argv[2:], extra_plugins=extra)
    with distributed.ends_without_finalizing(), exit_status_file():  # as launch/train.py
        train_or_exit(recipe, hooks)
