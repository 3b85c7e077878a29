"""Scheduled hyper-parameters: the lr's factor, the weight decay's cosine, and plugins' `Scheduled` values.

One formula serves them all (`Scheduled.at`): an optional linear warm-up from 0 to `start`, then a
constant, linear or cosine path from `start` to `end` that reaches `end` at the run's last step.
- the lr: `lr_schedule(optim)` is the factor `LambdaLR` multiplies every param group's lr by
  (1 -> 0 cosine, or constant 1, after `optim.warmup_steps`);
- the weight decay: with `optim.weight_decay_end` set, a cosine from `optim.weight_decay` to it over
  `train.steps` (DINO's and solo-learn's schedule), written into the decay param groups before every
  optimizer step (`set_weight_decay`); groups marked `no_decay` stay at 0;
- a plugin's: a section field typed `Scheduled` takes a number (a constant) or a mapping
  `{start, end, shape, warmup_steps}` in the recipe; the plugin reads `cfg.<field>.at(step, steps)`.
  BYOL's momentum, `1 - (1 - base) * (cos(pi k / K) + 1) / 2`, is `{start: base, end: 1, shape: cosine}`.

The engine logs, at every log step, the weight decay (`wd`, when scheduled) and every plugin's
`Scheduled` field that varies as `<plugin>.<field>` (`scheduled_values`), at the step about to be
taken, as the logged `lr` is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel

from framework.recipe.schema import OptimConfig, Scheduled, TeacherConfig

__all__ = ["Scheduled", "lr_schedule", "scheduled_values", "set_weight_decay", "weight_decay_schedule"]


def lr_schedule(cfg: OptimConfig) -> Scheduled:
    """The lr's factor: linear warm-up over `warmup_steps`, then constant 1 or cosine 1 -> 0 at `steps`."""
    cosine = cfg.schedule == "cosine"
    return Scheduled(start=1.0, end=0.0 if cosine else None, shape=cfg.schedule, warmup_steps=cfg.warmup_steps)


def weight_decay_schedule(cfg: OptimConfig) -> Scheduled | None:
    """`weight_decay` -> `weight_decay_end` by a cosine over `steps`; None when the weight decay is constant."""
    if cfg.weight_decay_end is None:
        return None
    return Scheduled(start=cfg.weight_decay, end=cfg.weight_decay_end, shape="cosine")


def set_weight_decay(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int, steps: int) -> None:
    """Write step `step`'s weight decay (`weight_decay`, or its cosine to `weight_decay_end` at `steps`) into
    every decay param group (host arithmetic only). Written every step, it is the recipe's and not a restored
    optimizer's: a resume may change either key."""
    schedule = weight_decay_schedule(cfg)
    value = cfg.weight_decay if schedule is None else schedule.at(step, steps)
    for group in optimizer.param_groups:
        if not group.get("no_decay", False):
            group["weight_decay"] = value


def scheduled_values(
    optim: OptimConfig, plugins: Mapping[str, Any], step: int, steps: int, teacher: TeacherConfig | None = None
) -> dict[str, float]:
    """What the log shows of the schedules at `step` of `steps`: `wd` when scheduled, `teacher.momentum` when
    the run has a teacher (`teacher`), and `<plugin>.<field>` for every field of a plugin section (`plugins`)
    that is a `Scheduled` that varies (constants are in recipe.yaml)."""
    out = {}
    if (wd := weight_decay_schedule(optim)) is not None:
        out["wd"] = wd.at(step, steps)
    if teacher is not None:
        out["teacher.momentum"] = teacher.momentum.at(step, steps)
    for plugin, section in plugins.items():
        for field in type(section).model_fields if isinstance(section, BaseModel) else ():
            value = getattr(section, field)
            if isinstance(value, Scheduled) and value.varies:
                out[f"{plugin}.{field}"] = value.at(step, steps)
    return out
