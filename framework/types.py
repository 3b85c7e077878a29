"""The values that hooks exchange: recipe sections, views and encodings.

These are part of the public plugin API (re-exported by `framework`), and the
built-in plugins use nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """A recipe section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class PluginConfig(Strict):
    """Base of every plugin's recipe section (`plugins.<name>:`).

    `weight` multiplies every loss term the plugin returns (`total = sum(weight * term)`).
    `lr`, when set, is the learning rate of the plugin's own modules (their own optimizer
    param group, scaled and scheduled like `train.lr`); unset, they train at `train.lr`.
    Subclass it and return the subclass from the plugin's `config_schema` hook.
    """

    weight: float = 1.0
    lr: float | None = Field(None, gt=0)


@dataclass(frozen=True)
class View:
    """A named view transform returned by an `augment` hook.

    `transform` is a picklable callable run per sample in the data workers. With
    `source=None` it receives the decoded PIL image; with `source="<view name>"` it
    receives that view's output tensor (e.g. the affine head transforms SimCLR's first
    view). It returns a tensor, or `(tensor, params)` where `params` is a 1-D float
    tensor of the random parameters it drew (batched as `ctx.params[name]`).
    """

    transform: Callable[[Any], Any]
    source: str | None = None


@dataclass
class Encoding:
    """What the `encode` hook returns for one batch of one view.

    `h`: pooled backbone features (B, D), the representation probes use.
    `mu`, `logvar`, `z`: the Gaussian posterior q(z|x) and a reparameterised sample,
    present when the encoder has a VAE head, else None.
    """

    h: torch.Tensor
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    z: torch.Tensor | None = None
