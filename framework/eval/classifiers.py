"""Classifiers fitted on frozen features (or raw pixels): each returns the test accuracy.

- `fit_linear` (protocol `fast`): multinomial logistic regression by full-batch L-BFGS on
  standardised features (seconds).
- `fit_sgd_linear` (protocol `linear`): the offline protocol of docs/methods.md#offline-evaluation, a Linear
  layer trained by SGD (Nesterov, momentum 0.9, lr 0.1 x batch/256, cosine to 0).
- `knn_accuracy` (protocol `knn`): weighted k-NN (cosine similarity, votes weighted by
  exp(sim / temperature)), as solo-learn and lightly report it.

Each is a function of its inputs alone, so N processes that gather the same features fit the
same classifier as one process: the linear classifiers start from zero weights (not from the
global RNG, whose state depends on what ran before), and a dimension constant over the train
set (a raw-pixel border) is centred but not scaled, as scikit-learn's StandardScaler does. Scaled
by a clamped std of 1e-6, such a dimension multiplied the test images' deviations by a million,
into weights that no train sample constrains: the prediction then hung on the initial weights
and on float rounding (1 and 2 processes disagreed on 2 of 96 test images).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def _standardiser(train_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and scale of each dimension over the train set; scale 1 where it is constant (std <= 1e-6)."""
    mean, std = train_x.mean(0), train_x.std(0)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def _zero_linear(dim: int, classes: int, device: torch.device) -> torch.nn.Linear:
    """A Linear layer with zero weights and bias: the fit's start, the same in every process."""
    linear = torch.nn.Linear(dim, classes, device=device)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    return linear


def fit_linear(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    l2: float = 1e-4,
    iters: int = 100,
) -> float:
    """Multinomial logistic regression (L-BFGS, full batch, standardised inputs, from zero weights); returns
    test accuracy."""
    mean, std = _standardiser(train_x)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    linear = _zero_linear(train_x.shape[1], classes, train_x.device)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (linear(test_x).argmax(1) == test_y).float().mean().item()


def fit_sgd_linear(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    epochs: int = 90,
    batch_size: int = 256,
    lr: float | None = None,
    weight_decay: float = 0.0,
    reextract: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    seed: int = 0,
) -> float:
    """The offline linear protocol: SGD (Nesterov, m=0.9, lr 0.1 x batch/256 unless given), cosine schedule
    over every step, from zero weights; returns test accuracy.

    Inputs are standardised with the first epoch's train statistics (a fixed affine map: the same
    model class, better conditioned). `reextract(epoch)` returns fresh (features, labels) of the
    augmented train set for epochs after the first.
    """
    g = torch.Generator().manual_seed(seed)
    mean, std = _standardiser(train_x)
    classes = int(max(train_y.max(), test_y.max())) + 1
    linear = _zero_linear(train_x.shape[1], classes, train_x.device)
    lr = 0.1 * batch_size / 256 if lr is None else lr
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_y) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for epoch in range(epochs):
        if reextract is not None and epoch > 0:
            train_x, train_y = reextract(epoch)
        order = torch.randperm(len(train_y), generator=g).to(train_x.device)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = torch.nn.functional.cross_entropy(linear((train_x[idx] - mean) / std), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (linear((test_x - mean) / std).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    k: int = 200,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted k-NN on L2-normalised features: the k most cosine-similar train samples vote with
    weight exp(sim / temperature) (solo-learn / lightly); returns test accuracy."""
    train_x = torch.nn.functional.normalize(train_x.float(), dim=1)
    test_x = torch.nn.functional.normalize(test_x.float(), dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_y))
    correct = 0
    for i in range(0, len(test_y), chunk):
        sim, idx = (test_x[i : i + chunk] @ train_x.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), classes, device=sim.device).scatter_add_(
            1, train_y[idx], (sim / temperature).exp()
        )
        correct += int((votes.argmax(1) == test_y[i : i + chunk]).sum().item())
    return correct / len(test_y)
