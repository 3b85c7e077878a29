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

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from framework.recipe.schema import SECTION_CONFIG, OptimConfig


class Scheduled(BaseModel):
    """A value that follows a schedule over the run's optimizer steps (a plugin section's field type).

    In a recipe a plain number is a constant; a mapping says `start` (the value at step 0, after
    any warm-up), `end` (the value at the last step; not for `constant`), `shape` (`constant`,
    `linear` or `cosine`, the default) and `warmup_steps` (a linear ramp from 0 up to `start`
    first, as the lr's warm-up: `start x (step + 1) / warmup_steps`; default 0) and `steps` (the step
    at which the path reaches `end`, to hold it from then on: DINO's teacher temperature, 0.04 -> 0.07
    over its first 30 epochs, is `{start: 0.04, end: 0.07, shape: linear, steps: <30 epochs>}`; default:
    the run's last step). Unknown keys, a path without an `end`, a constant with a different one or
    with `steps` are one-line recipe errors.
    """

    model_config = ConfigDict(**SECTION_CONFIG, frozen=True)  # unknown keys and non-finite numbers are errors

    start: float
    end: float | None = None
    shape: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    steps: int | None = Field(None, gt=0)  # where the path ends and holds; None: the run's last step

    @model_validator(mode="before")
    @classmethod
    def _number_is_a_constant(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return {"start": value, "shape": "constant"}
        return value

    @model_validator(mode="after")
    def _end_fits_the_shape(self) -> Scheduled:
        if self.shape == "constant" and self.end is not None and self.end != self.start:
            raise ValueError(
                f"a constant schedule has no end (start {self.start}, end {self.end}): shape linear or cosine"
            )
        if self.shape != "constant" and self.end is None:
            raise ValueError(f"a {self.shape} schedule needs an end (its value at the last step)")
        if self.shape == "constant" and self.steps is not None:
            raise ValueError(f"a constant schedule has no steps (got steps {self.steps}): shape linear or cosine")
        if self.steps is not None and self.steps <= self.warmup_steps:
            raise ValueError(f"steps {self.steps} must be after the warm-up's {self.warmup_steps} steps")
        return self

    @property
    def varies(self) -> bool:
        """Whether the value changes over the run (a warm-up, or a path to another `end`)."""
        return self.warmup_steps > 0 or (self.end is not None and self.end != self.start)

    def at(self, step: int, total_steps: int) -> float:
        """The value at optimizer step `step` (0-based) of `total_steps`; `end` from `steps` (default
        `total_steps`) on."""
        if step < self.warmup_steps:
            return self.start * (step + 1) / self.warmup_steps
        if self.shape == "constant" or self.end is None:
            return self.start
        span = max(1, (self.steps or total_steps) - self.warmup_steps)
        done = min(step - self.warmup_steps, span)
        if self.shape == "linear":
            return self.start + (self.end - self.start) * done / span
        return self.end - (self.end - self.start) * (math.cos(math.pi * done / span) + 1) / 2


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


def scheduled_values(optim: OptimConfig, plugins: Mapping[str, Any], step: int, steps: int) -> dict[str, float]:
    """What the log shows of the schedules at `step` of `steps`: `wd` when scheduled, and `<plugin>.<field>`
    for every field of a plugin section (`plugins`) that is a `Scheduled` that varies (constants are in
    recipe.yaml)."""
    out = {}
    if (wd := weight_decay_schedule(optim)) is not None:
        out["wd"] = wd.at(step, steps)
    for plugin, section in plugins.items():
        for field in type(section).model_fields if isinstance(section, BaseModel) else ():
            value = getattr(section, field)
            if isinstance(value, Scheduled) and value.varies:
                out[f"{plugin}.{field}"] = value.at(step, steps)
    return out
