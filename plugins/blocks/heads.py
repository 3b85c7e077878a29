"""Projection and prediction heads shared by the joint-embedding plugins (SimCLR, BYOL, Barlow Twins)."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, bias: bool = True) -> nn.Sequential:
    """`layers - 1` x (Linear + BatchNorm1d + ReLU), then Linear(hidden_dim, out_dim); `bias=False` drops every
    Linear's bias (facebookresearch/barlowtwins' projector).

    SimCLR's projector is `mlp(h, h, 128)`, BYOL's projector and predictor `mlp(., 4096, 256)`,
    Barlow Twins' projector `mlp(h, 2048, 2048, layers=3)` on CIFAR-sized runs.
    """
    body: list[nn.Module] = []
    for i in range(layers - 1):
        body += [
            nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim, bias=bias),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
        ]
    body.append(nn.Linear(hidden_dim if layers > 1 else in_dim, out_dim, bias=bias))
    return nn.Sequential(*body)
