"""Run by tests/test_distill_distributed.py: two training steps of the engine's model for DINO, iBOT and DINOv2 on a
fixed global batch; each rank dumps the gradients it applies, the centres, the loss terms and its masks.

    python tests/distill_grads.py OUT METHOD...                                   (1 process, the whole batch)
    accelerate launch --multi_gpu --num_processes 2 tests/distill_grads.py OUT METHOD...   (each rank its half)

METHOD (`METHODS`): `dino_center` (DINO's moving centre, all-reduced, with 2 local crops), `dino_sinkhorn`
(DINOv2's distributed Sinkhorn-Knopp), `ibot_sinkhorn` (DINO's centre + iBOT on masked global crops, every image
masked, its patch Sinkhorn-Knopp over the masked patches of the global batch: the ranks hold different numbers of
them), `ibot_center` (DINO's Sinkhorn-Knopp + iBOT's patch centre, all-reduced), `ibot_shared` (iBOT on DINO's
head) or `dinov2` (DINO and iBOT with Sinkhorn-Knopp + KoLeo).

The model is the engine's (`framework.model.Model`, built through `build_accelerator` and `prepare()`: DDP on 2
processes) with the tiny ViT of the DINOv2 tests, in float64 (a ViT has no BatchNorm: every row is computed on
its own, so only the batch statistics the plugins all-reduce couple the rows). The crops and masks of the
global batch are drawn from fixed seeds, the same on every rank, and each rank takes its rows; a step is
`forward`, `backward`, SGD and the teacher's EMA, as the engine's.

KoLeo is per rank by definition (DINOv2 computes it per GPU). In one process `dinov2` therefore computes its
KoLeo term as the 2 processes do: the mean of `plugins.koleo.regularize` on each half of the batch (the same
student encoder on the same masked crops); `koleo_whole` records KoLeo on the whole batch for contrast.

Writes `<OUT>/<METHOD>_rank<R>.pt`: `{"grads": [{name: tensor} per step], "centers": [{name: tensor} per step],
"terms": [{term: float} per step], "masked": [masked patches of this rank's rows per step], "koleo_whole": [float
per step] (1 process, dinov2), "teacher": {name: tensor} after the last step, "world_size": W}`; the gradients
are those the optimizer applies (DDP's average).
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models import vision_transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.distributed import build_accelerator, ends_without_finalizing, rank, world_size  # noqa: E402
from framework.model import Model, weighted_total  # noqa: E402
from framework.startup import validate  # noqa: E402
from plugins import koleo  # noqa: E402
from plugins.blocks import MaskedView, PatchMasks  # noqa: E402
from tests.helpers import DISTILL_HEAD, TINY_VIT  # noqa: E402

GLOBAL_BATCH, SIZE, LOCAL_SIZE, STEPS = 8, 28, 16, 2
VIT, HEAD = TINY_VIT, DISTILL_HEAD
PATCH = VIT["timm_kwargs"]["patch_size"]
CROPS = {"global": {"count": 2}, "local": {"count": 2, "size": LOCAL_SIZE}}
TEMP = {"start": 0.04, "end": 0.07, "shape": "linear", "steps": STEPS}  # a teacher temperature that moves
MASKS = {"probability": 1.0}  # every image masked
DINO = {**HEAD, "crops": {"global": {"count": 2}}, "teacher_temp": TEMP}  # 2 global crops, float64 throughout
METHODS = {
    "dino_center": {"dino": {**DINO, "crops": CROPS, "centering": "center"}},
    "dino_sinkhorn": {"dino": {**DINO, "centering": "sinkhorn"}},
    "ibot_sinkhorn": {
        "dino": {**DINO, "centering": "center"},
        "ibot": {**HEAD, "centering": "sinkhorn", "masks": MASKS, "teacher_temp": TEMP},
    },
    "ibot_center": {
        "dino": {**DINO, "centering": "sinkhorn"},
        "ibot": {**HEAD, "centering": "center", "masks": MASKS, "teacher_temp": TEMP},
    },
    "ibot_shared": {  # iBOT on DINO's head (iBOT's --shared_head): one head trained by both terms
        "dino": {**DINO, "centering": "center"},
        "ibot": {**HEAD, "head": "shared", "centering": "center", "masks": MASKS, "teacher_temp": TEMP},
    },
    "dinov2": {
        "dino": {**DINO, "centering": "sinkhorn"},
        "ibot": {**HEAD, "centering": "sinkhorn", "masks": MASKS, "teacher_temp": TEMP},
        "koleo": {},
    },
}
METHODS["dino_center_float64"] = METHODS["dino_center"]  # timm's position-embedding resampling kept in float64
LR, MOMENTUM = 0.1, 0.9  # SGD and the teacher's EMA: large enough that step 2 sees what step 1 did


def resample_in_float64(posemb, new_size, old_size, num_prefix_tokens=1, **_):
    """timm's `resample_abs_pos_embed` (bicubic, antialiased) without its cast to float32, which rounds the
    position embedding of every local crop (and its gradient) to float32 even in a float64 model."""
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    grid = grid.reshape(1, *old_size, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode="bicubic", antialias=True).permute(0, 2, 3, 1)
    return torch.cat([prefix, grid.reshape(1, -1, posemb.shape[-1])], dim=1)


def recipe_of(method: str, out: Path):
    return validate(
        {
            "output_dir": str(out),
            "plugins": {"backbones": VIT, **METHODS[method]},
            "train": {"steps": STEPS},
            "optim": {"lr": LR},
            "data": {"train": "unused", "image_size": SIZE, "channels": 1, "mean": [0.5], "std": [0.25]},
        },
        check_data=False,
    )


def global_batch(model: Model, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The views and patch masks of step `step`'s whole batch (the same on every rank): float64 crops at their
    size; a mask per global crop and image, drawn by the plugin's `MaskedView` from a seed of its own."""
    cfg = model.config.plugins["dino"]
    globals_, locals_ = cfg.crop_names()
    g = torch.Generator().manual_seed(100 + step)
    views = {
        f"dino.{name}": torch.randn(GLOBAL_BATCH, 1, size, size, generator=g, dtype=torch.float64)
        for names, size in ((globals_, SIZE), (locals_, LOCAL_SIZE))
        for name in names
    }
    params = {}
    if "ibot" in model.config.plugins:
        spec: PatchMasks = model.config.plugins["ibot"].masks
        draw = MaskedView(lambda image: image, SIZE // PATCH, spec).draw
        for v, name in enumerate(globals_):
            masks = []
            for i in range(GLOBAL_BATCH):
                torch.manual_seed(10_000 * step + 100 * v + i)
                masks.append(draw().flatten().double())
            params[f"dino.{name}"] = torch.stack(masks)
    return views, params


def centers(model: Model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("center.center")}


def koleo_per_half(model: Model, views: dict, params: dict, step: int) -> tuple[torch.Tensor, float]:
    """One process: KoLeo as 2 processes compute it (the mean over the two halves of the batch, each half's own
    term) and, for contrast, on the whole batch (no gradient)."""
    half = GLOBAL_BATCH // 2
    terms = []
    for rows in (slice(0, half), slice(half, GLOBAL_BATCH)):
        ctx = model.context({k: v[rows] for k, v in views.items()}, {k: v[rows] for k, v in params.items()}, None, step)
        terms.append(koleo.regularize(ctx)["loss"])
    with torch.no_grad():
        whole = koleo.regularize(model.context(views, params, None, step))["loss"].item()
    return torch.stack(terms).mean(), whole


def run(method: str, out: Path) -> dict:
    recipe, hooks = recipe_of(method, out)
    accelerator = build_accelerator(recipe.distributed, recipe.data, recipe.optim, recipe.output_dir)
    torch.manual_seed(0)
    model = Model(hooks, recipe).double()
    assert model.teacher is not None
    model.teacher.initialise(model.plugins)
    wrapped = accelerator.prepare(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    b = GLOBAL_BATCH // world_size()
    rows = slice(rank() * b, (rank() + 1) * b)
    weight = model.weights()
    record: dict = {
        "grads": [],
        "centers": [],
        "terms": [],
        "masked": [],
        "koleo_whole": [],
        "world_size": world_size(),
    }
    for step in range(STEPS):
        views, params = global_batch(model, step)
        terms, _ = wrapped({k: v[rows] for k, v in views.items()}, {k: v[rows] for k, v in params.items()}, None, step)
        if "koleo" in METHODS[method] and world_size() == 1:
            terms["koleo.loss"], whole = koleo_per_half(model, views, params, step)
            record["koleo_whole"].append(whole)
        optimizer.zero_grad()
        accelerator.backward(weighted_total(terms, weight))
        record["grads"].append({k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None})
        record["centers"].append(centers(model))
        record["terms"].append({k: v.item() for k, v in terms.items()})
        record["masked"].append(int(sum((p[rows] > 0.5).sum() for p in params.values())))
        optimizer.step()
        model.teacher.update(model.plugins, MOMENTUM)
    record["teacher"] = {k: v.detach().clone() for k, v in model.teacher.state_dict().items() if v.is_floating_point()}
    return record


def main(out: Path, methods: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    original = vision_transformer.resample_abs_pos_embed
    for method in methods:
        exact = method.endswith("_float64")
        vision_transformer.resample_abs_pos_embed = resample_in_float64 if exact else original
        torch.save(run(method, out), out / f"{method}_rank{rank()}.pt")
    vision_transformer.resample_abs_pos_embed = original


if __name__ == "__main__":
    with ends_without_finalizing():  # as launch/train.py
        main(Path(sys.argv[1]), sys.argv[2:])
