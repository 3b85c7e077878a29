"""Run by tests under `accelerate launch` (DeepSpeed ZeRO-3 included): train a BYOL recipe and
record, after every step, BYOL's target (the run's EMA teacher) and online parameters in full (gathered).

    accelerate launch --use_deepspeed ... tests/dist_byol_ema.py RECIPE [key=value ...]

Writes `<output_dir>/ema_rank<R>.pt`: `{step: {"target": vector, "online": vector}}`, recorded right after each
EMA update (`Teacher.update`, wrapped here: a plugin's hooks do not see the teacher's modules).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework import distributed  # noqa: E402
from framework.engine import train  # noqa: E402
from framework.startup import load_recipe  # noqa: E402
from framework.teacher import Teacher  # noqa: E402


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().cpu().reshape(-1) for p in module.parameters()])


RECORDS: dict[int, dict] = {}
UPDATE = Teacher.update


def recording_update(self: Teacher, online: torch.nn.Module, momentum: float) -> None:
    UPDATE(self, online, momentum)
    pairs = self.pairs(online)
    partitioned = sum(p.numel() for t, _ in pairs for p in t.parameters())  # 0 when ZeRO-3 partitions them
    with distributed.full_parameters(*(m for pair in pairs for m in pair)):
        RECORDS[len(RECORDS) + 1] = {
            "target": torch.cat([flat(t) for t, _ in pairs]),
            "online": torch.cat([flat(o) for _, o in pairs]),
            "partitioned": partitioned,
        }


if __name__ == "__main__":
    recipe, hooks = load_recipe(sys.argv[1], sys.argv[2:])
    Teacher.update = recording_update  # type: ignore[method-assign]
    with distributed.ends_without_finalizing():  # as launch/train.py
        train(recipe, hooks)
        torch.save(RECORDS, Path(recipe.output_dir) / f"ema_rank{distributed.rank()}.pt")
