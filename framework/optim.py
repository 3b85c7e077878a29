"""The optimisation: one param group per plugin, the lr scaled by the global batch, the schedule.

`build_optimizer` gives every plugin's trainable modules their own param group (a plugin's
`lr` is scaled like `train.lr`); `lr_factor` is the multiplier `LambdaLR` applies per step.
"""

from __future__ import annotations

import math

import torch

from framework.model import Model
from framework.recipe.schema import Recipe, TrainConfig


def effective_lr(cfg: TrainConfig, global_batch: int) -> float:
    """`train.lr`, or with `train.lr_scaling: linear` lr x global_batch / 256."""
    return cfg.lr * global_batch / 256 if cfg.lr_scaling == "linear" else cfg.lr


def build_optimizer(model: Model, recipe: Recipe, lr: float | None = None) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters, at `lr` (default `train.lr`).

    One param group per plugin: a plugin's `lr` (e.g. the online probe's) is scaled by the
    same factor as `train.lr` (`lr / train.lr`), so `train.lr_scaling` moves every group alike.
    """
    cfg = recipe.train
    lr = cfg.lr if lr is None else lr
    groups = []
    for name, modules in model.plugins.items():
        own = getattr(recipe.plugins.get(name), "lr", None)
        params = [p for p in modules.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr if own is None else own * lr / cfg.lr, "plugin": name})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then constant or cosine to 0 at `steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
