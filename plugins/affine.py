"""Plugin `affine`: predict a random affine transformation, an auxiliary head (docs/methods.md#affine-head).

`x1` is one augmented view of the base method, as in the paper (its code applies the affine to the
first of SimCLR's two views). `source` unset, it is the first view declared by a plugin of the recipe
that makes augmented views (capability "augmented_view", in recipe order): `simclr.v1`, `byol.v1`,
`barlow.v1`, `aavae.aug`, `consistency.t`; a recipe with none (`kl` alone) is refused in one line
(set `source: x` to use the clean view). `source` set names the view itself (`"x"`, `"aavae.aug"`, ...).
This plugin's view `affine.view` is `A(x1)`, `A` a random affine (`plugins.blocks.AffineWithParams`:
rotation +-90 deg, whole-pixel translation +-25 %, scale 0.7-1.3, shear +-25 deg, nearest, black fill)
whose normalised 6-vector `[angle/360, tx/W, ty/H, scale, shear_x/25, shear_y/25]` is the target.

    r1 = h(x1), r2 = h(A(x1))      pooled backbone features, before any projection head;
                                   both keep their gradients (the encoder learns from both)
    a  = r1 - r2 ("diff", default) | cat(r1, r2) ("concat", the ablation)
    loss = MSE(head(a)[:, enabled], target[:, enabled])
    head = Linear(in, hidden) + BatchNorm1d + ReLU + Linear(hidden, 6), hidden 512

`components` switches target components off (they are also held at identity in `A`);
the head keeps 6 outputs so every parameter is used (DDP) whatever the subset. The
term is `mse` (logged `affine.mse`), multiplied by `weight` (docs/methods.md#affine-head: 1 for SimCLR
and BYOL, 10 for Barlow Twins). The head's input size is the encoder's `num_features`
(twice that for "concat").
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from framework import PluginConfig, Recipe, StepContext, View, at_least_float32, hookimpl, num_features
from plugins.blocks import AFFINE_COMPONENTS, AffineWithParams, AugmentedViews


class AffineConfig(PluginConfig):
    source: str | None = None  # the view x1 that A transforms; None: the recipe's first augmented view
    components: list[str] = Field(default_factory=lambda: list(AFFINE_COMPONENTS))
    aggregation: Literal["diff", "concat"] = "diff"
    hidden: int = Field(512, gt=0)

    @field_validator("components")
    @classmethod
    def _known_components(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(AFFINE_COMPONENTS))
        if unknown:
            raise ValueError(f"unknown components {unknown}; choose from {list(AFFINE_COMPONENTS)}")
        if not value:
            raise ValueError("at least one component is needed")
        return [c for c in AFFINE_COMPONENTS if c in value]  # canonical order, no duplicates


def aggregate(r1: torch.Tensor, r2: torch.Tensor, how: str) -> torch.Tensor:
    """`r1 - r2` (B, D) or `cat(r1, r2)` (B, 2D)."""
    return r1 - r2 if how == "diff" else torch.cat([r1, r2], dim=1)


def make_head(in_dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, len(AFFINE_COMPONENTS)),
    )


def component_index(components: list[str]) -> list[int]:
    return [AFFINE_COMPONENTS.index(c) for c in components]


@functools.lru_cache(maxsize=16)
def _component_index_on(components: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """`component_index` as a tensor on `device`, made once (indexing with a list copies it each step)."""
    return torch.tensor(component_index(list(components)), device=device)


@hookimpl
def config_schema() -> type[PluginConfig]:
    return AffineConfig


@hookimpl
def build_modules(cfg: AffineConfig, encoder: nn.Module) -> dict[str, nn.Module]:
    dim = num_features(encoder)
    return {"head": make_head(dim if cfg.aggregation == "diff" else 2 * dim, cfg.hidden)}


def source_of(cfg: AffineConfig, recipe: Recipe) -> str:
    """The view x1 (its full name): `source`, else the first view that a plugin of the recipe declares as its
    augmented one (capability `AugmentedViews`), the paper's choice."""
    if cfg.source is not None:
        return cfg.source
    for name, section in recipe.providers(AugmentedViews).items():
        return f"{name}.{section.augmented_view}"
    raise ValueError(
        "source: no plugin of the recipe makes an augmented view for x1 (the paper's); "
        "set source: x to transform the clean view"
    )


@hookimpl
def augment(config: Recipe, cfg: AffineConfig) -> dict[str, View]:
    source = source_of(cfg, config)
    owner = source.split(".", 1)[0]
    if source != "x" and (owner not in config.plugins or config.plugins[owner] is cfg):
        raise ValueError(f"source: no other plugin {owner!r} in the recipe to provide {source!r}")
    transform = AffineWithParams(config.data.mean, config.data.std, cfg.components)
    return {"view": View(transform, source=source)}


@hookimpl
def auxiliary_head(ctx: StepContext, cfg: AffineConfig, own: nn.ModuleDict) -> dict[str, torch.Tensor]:
    r1 = ctx.encode(source_of(cfg, ctx.config)).h
    r2 = ctx.encode("view").h
    pred = own["head"](aggregate(r1, r2, cfg.aggregation))
    idx = _component_index_on(tuple(cfg.components), pred.device)
    pred, target = at_least_float32(pred), at_least_float32(ctx.params["view"])  # never cast the target down
    return {"mse": F.mse_loss(pred.index_select(1, idx), target.index_select(1, idx))}
