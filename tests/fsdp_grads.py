"""Run by tests/test_fsdp.py: one step of the engine's model on a fixed global batch, sharded with FSDP2 as the
engine shards it (`framework.engine.start`); rank 0 dumps every parameter's whole gradient.

    python tests/fsdp_grads.py OUT METHOD                          (1 process, no sharding: the reference)
    accelerate launch --config_file launch/accelerate/fsdp2.yaml --num_processes 2 --mixed_precision no \\
        tests/fsdp_grads.py OUT METHOD                             (FSDP2, each rank its half of the batch)

METHOD: `resnet` (a ResNet-18 whose stages are the units, SimCLR: its loss gathers over the ranks), `vit` (a
small timm ViT whose blocks are the units, SimCLR) or `byol` (the ViT, BYOL: an EMA target sharded like the
encoder). In float64, with BatchNorm replaced by GroupNorm as in tests/ddp_grads.py (its batch statistics are
per rank), FSDP2's reduce-scattered gradients of 2 x B equal those of 1 x 2B up to summation order. Writes
`<OUT>/grads.pt`: `{"grads": {name: tensor}, "world_size": W, "sharded": [names of the DTensor parameters]}`.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.distributed import (  # noqa: E402
    build_accelerator,
    ends_without_finalizing,
    fsdp_options,
    rank,
    using_fsdp,
    world_size,
)
from framework.engine import block_units, build_views  # noqa: E402
from framework.model import Model, weighted_total  # noqa: E402
from framework.sharding import one_rank_group, shard  # noqa: E402
from framework.startup import validate  # noqa: E402
from tests.ddp_grads import without_batchnorm  # noqa: E402

GLOBAL_BATCH = 8
VIT = {"encoder": "timm/vit_tiny_patch16_224", "timm_kwargs": {"patch_size": 8, "embed_dim": 16, "depth": 3}}
ENCODERS = {
    "resnet": ({"encoder": "resnet18", "stem": "cifar"}, "simclr"),
    "vit": ({**VIT, "timm_kwargs": {**VIT["timm_kwargs"], "num_heads": 2}}, "simclr"),
    "byol": ({**VIT, "timm_kwargs": {**VIT["timm_kwargs"], "num_heads": 2}}, "byol"),
}


def main(out: Path, method: str) -> None:
    encoder, plugin = ENCODERS[method]
    method_cfg = (
        {"proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 32}
        if plugin == "byol"
        else {"output_dim": 16}
    )
    recipe, hooks = validate(
        {
            "output_dir": str(out),
            "plugins": {"backbones": encoder, plugin: method_cfg},
            "train": {"steps": 1},
            "optim": {"lr": 1e-3},
            "data": {"train": "unused", "image_size": 16, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
        },
        check_data=False,
    )
    accelerator = build_accelerator(recipe.distributed, recipe.data, recipe.optim, recipe.output_dir)
    torch.manual_seed(0)
    model = without_batchnorm(Model(hooks, recipe)).double()
    if model.teacher is not None:  # BYOL: the target (the EMA teacher) starts as the online net, as in the engine
        model.teacher.initialise(model.plugins)
    if using_fsdp():  # as the engine's start()
        units = block_units(recipe, hooks, model, fsdp=True)
        shard(model, units, accelerator.device, "no", fsdp_options(recipe.distributed))
    g = torch.Generator().manual_seed(1)
    rows = slice(rank() * GLOBAL_BATCH // world_size(), (rank() + 1) * GLOBAL_BATCH // world_size())
    views = {
        name: torch.rand(GLOBAL_BATCH, 3, 16, 16, generator=g, dtype=torch.float64)[rows]
        for name in build_views(recipe, hooks)
    }
    model.train()
    terms, _ = model(views, {}, None, step=0)
    weighted_total(terms, model.weights()).backward()
    grads, sharded = {}, []
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        full = getattr(param.grad, "full_tensor", None)  # a collective: every rank, in the same order
        grads[name] = (full() if callable(full) else param.grad).detach().clone()
        sharded += [name] if callable(full) else []
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"grads": grads, "world_size": world_size(), "sharded": sharded}, out / "grads.pt")


if __name__ == "__main__":
    with ends_without_finalizing(), one_rank_group(using_fsdp()):  # as launch/train.py (pytorch/pytorch#190489)
        main(Path(sys.argv[1]), sys.argv[2])
