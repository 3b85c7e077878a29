"""Plugin `barlow`: Barlow Twins (docs/methods.md#barlow-twins).

Two SimCLR-style views, the backbone's `h`, a projector of three Linear layers (the
first two followed by BatchNorm1d + ReLU, as in the paper). The embeddings of every
rank are gathered with gradient (`framework.distributed.gather_with_grad`), normalised
along the batch over the **global** batch of N samples (zero mean, unit biased
variance, as the paper's `BatchNorm1d(affine=False)`), and their cross-correlation
`C = z1n.T @ z2n / N` gives the loss

    sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2      (term `loss`)

`crops` may set the pair's size and scale (docs/methods.md#multi-crop), not more crops: the loss is defined
on one pair, and solo-learn's Barlow Twins takes only its two large crops (`z1, z2 = out["z"]`), so a
recipe with local crops or other than two global ones is refused at validation.

Every rank computes the same value on the same global C; the gather sums the gradient
of every rank's copy and DDP averages over ranks, so W processes with batch B train
exactly like one process with batch W*B (tests/test_contrastive_distributed.py).
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import nn

from framework import PluginConfig, Recipe, StepContext, View, hookimpl, num_features
from plugins.blocks import MultiCrop, TwoViewsConfig, barlow_twins_loss, crop_views, encode_crops, mlp


class BarlowConfig(TwoViewsConfig):
    lambda_offdiag: float = Field(5e-3, ge=0)  # Barlow Twins paper (~5e-3, or 1/dim): docs/methods.md#barlow-twins
    proj_hidden_dim: int = Field(2048, gt=0)  # paper: 8192 on ImageNet; 2048 is the common CIFAR size
    proj_output_dim: int = Field(2048, gt=0)
    # the projector's Linear layers have biases (solo-learn); the official code has none (main.py: bias=False)
    proj_bias: bool = True
    eps: float = Field(1e-5, ge=0)  # added to the variance when normalising (BatchNorm1d's default)

    @field_validator("crops")
    @classmethod
    def _two_global_crops(cls, value: MultiCrop | None) -> MultiCrop | None:
        if value is not None and (value.global_.count != 2 or value.local.count):
            raise ValueError(
                "Barlow Twins is defined on one pair of views: crops needs global.count 2 and local.count 0 "
                "(solo-learn's loss too takes only its two large crops)"
            )
        return value


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------


@hookimpl
def config_schema() -> type[PluginConfig]:
    return BarlowConfig


@hookimpl
def build_modules(cfg: BarlowConfig, encoder: nn.Module) -> dict[str, nn.Module]:
    width = num_features(encoder)
    return {"projector": mlp(width, cfg.proj_hidden_dim, cfg.proj_output_dim, layers=3, bias=cfg.proj_bias)}


@hookimpl
def augment(config: Recipe, cfg: BarlowConfig) -> dict[str, View]:
    return crop_views(config, cfg)


@hookimpl
def regularize(ctx: StepContext, cfg: BarlowConfig, own: nn.ModuleDict) -> dict[str, torch.Tensor]:
    projector = own["projector"]
    z1, z2 = (projector(encoding.h) for encoding in encode_crops(ctx, cfg, ["v1", "v2"]))
    return {"loss": barlow_twins_loss(z1, z2, cfg.lambda_offdiag, cfg.eps)}
