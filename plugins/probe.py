"""Plugin `probe`: the online linear probe (docs/methods.md#online-probe), a cheap accuracy signal while pretraining.

A Linear layer on the **detached** pooled features `ctx.encode("x").h`, trained with
cross-entropy on the batch's labels, one step per batch. Because the features are
detached, the term `probe.ce` sends gradient only into the probe, never into the
encoder, so adding it does not change what the encoder learns. Its accuracy on the
batch is logged as `probe.acc` (a metric, not optimised).

Labels < 0 mean "unlabelled" and are ignored; a batch with no labels gives a zero
term (still connected to the probe's weights, so DDP sees every parameter used).

Learning rate: docs/methods.md#online-probe trains the online probe with Adam at lr 1e-4: set
`plugins.probe.lr: 1.0e-4` (every plugin's `lr` gives its modules their own optimizer param
group, scaled and scheduled like `optim.lr`); unset, the probe trains at the run's `optim.lr`.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from framework import PluginConfig, StepContext, hookimpl, num_features


class ProbeConfig(PluginConfig):
    num_classes: int = Field(10, gt=1)
    view: str = "x"  # the view whose features are probed (the clean view by default; another's by full name)


@hookimpl
def config_schema() -> type[PluginConfig]:
    return ProbeConfig


@hookimpl
def build_modules(cfg: ProbeConfig, encoder: nn.Module) -> dict[str, nn.Module]:
    width = num_features(encoder)
    return {"linear": nn.Linear(width, cfg.num_classes)}


@hookimpl
def auxiliary_head(ctx: StepContext, cfg: ProbeConfig, own: nn.ModuleDict) -> dict[str, torch.Tensor]:
    features = ctx.encode(cfg.view).h.detach().float()  # detached: the probe never trains the encoder
    logits = own["linear"](features)
    labels = ctx.labels if ctx.labels is not None else torch.full(logits.shape[:1], -1, device=logits.device)
    labelled = (labels >= 0) & (labels < logits.shape[1])  # a label beyond num_classes teaches nothing, never crashes
    n = labelled.sum().clamp_min(1)
    ce = nn.functional.cross_entropy(logits, torch.where(labelled, labels, 0), reduction="none")
    correct = (logits.argmax(1) == labels) & labelled
    ctx.metrics["acc"] = (correct.sum() / n).detach()  # 0 on an unlabelled batch
    # no host sync: masked mean instead of indexing; an unlabelled batch gives 0 * logits (graph kept)
    return {"ce": (ce * labelled).sum() / n + 0 * logits.sum()}
