"""Run by tests under `accelerate launch` (DeepSpeed ZeRO-3 included): train a BYOL recipe and
record, after every step, BYOL's target and online parameters in full (gathered).

    accelerate launch --use_deepspeed ... tests/dist_byol_ema.py RECIPE [key=value ...]

Writes `<output_dir>/ema_rank<R>.pt`: `{step: {"target": vector, "online": vector}}`. The
recorder is registered after the recipe's plugins, so it sees the target after BYOL's update.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework import distributed, hookimpl  # noqa: E402
from framework.engine import train  # noqa: E402
from framework.startup import load_recipe  # noqa: E402
from plugins.byol import online_pairs  # noqa: E402


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().cpu().reshape(-1) for p in module.parameters()])


class RecordEMA:
    def __init__(self) -> None:
        self.records: dict[int, dict[str, torch.Tensor]] = {}

    @hookimpl
    def on_train_step_end(self, modules, step, config, encoder):
        pairs = online_pairs(modules["byol"], encoder)
        partitioned = sum(p.numel() for t, _ in pairs for p in t.parameters())  # 0 when ZeRO-3 partitions them
        with distributed.full_parameters(*(m for pair in pairs for m in pair)):
            self.records[step] = {
                "target": torch.cat([flat(t) for t, _ in pairs]),
                "online": torch.cat([flat(o) for _, o in pairs]),
                "partitioned": partitioned,
            }
        if step == config.train.steps:
            torch.save(self.records, Path(config.output_dir) / f"ema_rank{distributed.rank()}.pt")


if __name__ == "__main__":
    recipe, hooks = load_recipe(sys.argv[1], sys.argv[2:], extra_plugins={"record": RecordEMA()})
    with distributed.ends_without_finalizing():  # as launch/train.py
        train(recipe, hooks)
