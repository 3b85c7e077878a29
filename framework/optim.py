"""The optimisation: param groups per plugin, the lr scaled by the global batch, the optimizers, LARS.

`build_optimizer` gives every plugin's trainable modules their own param group (a plugin's
`lr` is scaled like `optim.lr`); with `optim.exclude_norm_bias_from_wd` (always under `lars`)
each plugin's group is split in two: the parameters that decay, and the biases and normalisation
weights (every parameter with `ndim <= 1`, and those a module names in its `no_weight_decay()`, timm's
convention: a ViT's position embedding and class token) in a group marked `no_decay` with weight decay 0, which
LARS also leaves unadapted. Both halves keep the plugin's name (`plugin`) and lr. `lr_factor` is the
multiplier `LambdaLR` applies per step (`framework.schedules.lr_schedule`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from framework.model import Model
from framework.recipe.schema import OptimConfig
from framework.schedules import lr_schedule


def effective_lr(cfg: OptimConfig, global_batch: int) -> float:
    """`optim.lr`, or with `optim.lr_scaling: linear` lr x global_batch / 256."""
    return cfg.lr * global_batch / 256 if cfg.lr_scaling == "linear" else cfg.lr


def decays(param: torch.Tensor, declared: frozenset[int] = frozenset()) -> bool:
    """Whether weight decay (and LARS' trust ratio) applies: not to biases and normalisation weights,
    told apart as solo-learn does by their shape (`ndim <= 1`: every bias, BatchNorm/LayerNorm/GroupNorm
    weight, and any scalar such as a learnt temperature), nor to the parameters in `declared` (the ids
    `declared_no_decay` finds)."""
    return param.ndim > 1 and id(param) not in declared


def declared_no_decay(modules: torch.nn.Module) -> frozenset[int]:
    """The ids of the parameters a submodule lists by name in its `no_weight_decay()` (timm's models do:
    a ViT's `pos_embed` and `cls_token`, which timm's and DINO's optimisers exclude from weight decay)."""
    ids: set[int] = set()
    for module in modules.modules():
        declare = getattr(module, "no_weight_decay", None)
        names = declare() if callable(declare) else ()
        params = dict(module.named_parameters())
        ids.update(id(params[n]) for n in names if n in params)
    return frozenset(ids)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"): SGD with momentum where
    each parameter's step is scaled by a trust ratio, as SimCLR, BYOL and Barlow Twins train and as
    solo-learn implements it (`solo/utils/lars.py`). For a parameter `w` with gradient `g`, in a group
    with lr, weight decay `wd`, momentum `m`, trust coefficient `eta`:

        d = g + wd * w
        r = eta * ||w|| / (||g|| + wd * ||w|| + eps)   if ||w|| > 0 and ||g|| > 0, else 1
        r = min(r / lr, 1)                             with clip (solo-learn's clip_lr: the lr is capped)
        buf = m * buf + r * d                          (buf = r * d at the first step)
        w = w - lr * buf

    Plain momentum (no dampening, not Nesterov), as solo-learn and the papers. A group with `no_decay`
    true (biases, normalisation weights) gets neither the weight decay nor the ratio: `d = g`, `r = 1`.
    Unlike solo-learn, a parameter whose weight or gradient norm is 0 still decays (`r = 1`, as the
    SimCLR code's LARS); solo-learn skips its decay. The ratio stays a device tensor (`torch.where`),
    so a step reads nothing back to the host.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 1e-3,
        clip: bool = False,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0 or eps < 0:
            raise ValueError(f"LARS: lr {lr}, momentum {momentum}, weight_decay {weight_decay}, eta {eta}, eps {eps}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "clip": clip,
            "eps": eps,
            "no_decay": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, adapt = group["lr"], group["momentum"], not group.get("no_decay", False)
            wd = group["weight_decay"] if adapt else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if adapt:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    if group["clip"]:
                        ratio = torch.clamp(ratio / lr, max=1.0)
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    d = d.add(p, alpha=wd).mul_(ratio)
                if momentum:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(d)
                    d = state["momentum_buffer"]
                p.add_(d, alpha=-lr)
        return loss


def param_groups(model: Model, cfg: OptimConfig, plugins: Mapping[str, Any], lr: float) -> list[dict[str, Any]]:
    """One param group per plugin at its lr (a plugin's `lr` in `plugins`, its recipe section, scaled by
    `lr / optim.lr`), split into a decaying group and a `no_decay` one (weight decay 0) under
    `exclude_norm_bias_from_wd` or LARS."""
    split = cfg.exclude_norm_bias_from_wd or cfg.optimizer == "lars"
    groups = []
    for name, modules in model.plugins.items():
        own = getattr(plugins.get(name), "lr", None)
        group_lr = lr if own is None else own * lr / cfg.lr
        params = [p for p in modules.parameters() if p.requires_grad]
        parts = [(params, False)]
        if split:
            declared = declared_no_decay(modules)
            decaying = [p for p in params if decays(p, declared)]
            parts = [(decaying, False), ([p for p in params if not decays(p, declared)], True)]
        for members, no_decay in parts:
            if members:
                wd = 0.0 if no_decay else cfg.weight_decay
                groups.append(
                    {"params": members, "lr": group_lr, "weight_decay": wd, "no_decay": no_decay, "plugin": name}
                )
    return groups


def build_optimizer(
    model: Model, cfg: OptimConfig, plugins: Mapping[str, Any], lr: float | None = None
) -> torch.optim.Optimizer:
    """The `optim` section's optimizer over the trainable parameters (`param_groups`; `plugins`: the recipe's
    plugin sections), at `lr` (default `optim.lr`).

    A plugin's `lr` (e.g. the online probe's) is scaled by the same factor as `optim.lr`
    (`lr / optim.lr`), so `optim.lr_scaling` moves every group alike.
    """
    lr = cfg.lr if lr is None else lr
    groups = param_groups(model, cfg, plugins, lr)
    if cfg.optimizer == "lars":
        return LARS(
            groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta, clip=cfg.lars_clip
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: OptimConfig, steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant or cosine to 0 at `steps` (`schedules.lr_schedule`)."""
    return lr_schedule(cfg).at(step, steps)
