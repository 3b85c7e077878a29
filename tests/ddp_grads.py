"""Run by tests: one DDP step on a fixed global batch; each rank dumps the gradients.

    python tests/ddp_grads.py OUT                                        (1 process, the whole batch)
    accelerate launch --multi_gpu --num_processes 2 tests/ddp_grads.py OUT   (each rank its half)

The model is the engine's: `framework.model.Model` with the conv28 encoder/decoder and
the `kl` plugin, built through `build_accelerator` and `prepare()`. BatchNorm is the one
part whose gradients depend on how the batch is split (its batch statistics are per
rank), so it is replaced by GroupNorm, which normalises each sample on its own; the
VAE's sampling noise is drawn for the whole batch from one seed and each rank takes its
rows, so both runs see the same noise. In float64 the averaged gradients of 2 x B then
equal those of 1 x 2B up to summation order. Writes `<OUT>/grads_rank<R>.pt`.
"""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.distributed import build_accelerator, rank, world_size  # noqa: E402
from framework.model import Model, weighted_total  # noqa: E402
from framework.startup import validate  # noqa: E402
from framework.testing import CONV28  # noqa: E402

GLOBAL_BATCH = 8


def without_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d | nn.BatchNorm1d):
            setattr(
                module,
                name,
                nn.GroupNorm(1, child.num_features) if isinstance(child, nn.BatchNorm2d) else nn.Identity(),
            )
        else:
            without_batchnorm(child)
    return module


if __name__ == "__main__":
    out = Path(sys.argv[1])
    recipe, hooks = validate(
        {
            "output_dir": str(out),
            "plugins": {"backbones": CONV28, "kl": {}},
            "train": {"steps": 1},
            "optim": {"lr": 1e-3},
            "data": {"train": "unused", "image_size": 28, "channels": 1, "mean": [0.5], "std": [0.25]},
        },
        check_data=False,
    )
    accelerator = build_accelerator(recipe.distributed, recipe.data, recipe.optim, recipe.output_dir)
    torch.manual_seed(0)
    model = without_batchnorm(Model(hooks, recipe)).double()
    model = accelerator.prepare(model)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(GLOBAL_BATCH, 1, 28, 28, generator=g, dtype=torch.float64)
    noise = torch.randn(GLOBAL_BATCH, CONV28["latent_dim"], generator=g, dtype=torch.float64)
    rows = slice(rank() * GLOBAL_BATCH // world_size(), (rank() + 1) * GLOBAL_BATCH // world_size())
    original_randn_like = torch.randn_like
    torch.randn_like = lambda t, **kw: (
        noise[rows].to(t.dtype) if t.shape == noise[rows].shape else original_randn_like(t, **kw)
    )
    terms, _ = model({"x": images[rows]}, {}, None, step=0)
    loss = weighted_total(terms, accelerator.unwrap_model(model).weights())
    accelerator.backward(loss)
    grads = {k: p.grad.detach().clone() for k, p in accelerator.unwrap_model(model).named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"grads": grads, "world_size": world_size()}, out / f"grads_rank{rank()}.pt")
