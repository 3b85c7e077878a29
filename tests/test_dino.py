"""Plugins `dino`, `ibot` and `koleo` (self-distillation; docs/methods.md#dino): each hook's term against lightly's
implementation through the plugin itself, the views and masks they make and share, what the student and the
teacher encode, DINO's frozen last layer, the schedules they log, and the recipes they refuse in one line.

The losses themselves are checked against lightly in tests/test_distill_losses.py, their 1-process == 2-process
gradients in tests/test_distill_distributed.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from framework import Encoding
from framework.checkpoint import complete_checkpoints, model_weights_file
from framework.logging import read_metrics
from framework.manager import PluginError
from framework.model import Model
from framework.recipe.loading import RecipeError
from framework.startup import validate
from framework.teacher import evaluated_encoder
from framework.testing import run_steps, step_context, tiny_recipe
from plugins import dino, ibot, koleo
from plugins.blocks import Center, koleo_loss
from tests.helpers import DISTILL_HEAD, TINY_VIT, float64_constants, needs_lightly

TOL = 1e-10
NO_SHARDS = {"train": "none.tar", "test": "none.tar"}
VIT, HEAD = TINY_VIT, DISTILL_HEAD
CROPS = {"global": {"count": 2}, "local": {"count": 2, "size": 16}}
DINO = {**HEAD, "crops": CROPS}
DINOV2 = {"backbones": VIT, "dino": DINO, "ibot": {**HEAD, "masks": {"probability": 1.0}}, "koleo": {}}


def identity(view: torch.Tensor) -> Encoding:
    return Encoding(h=view)


# --- the terms, through the hooks, against lightly ------------------------------------------------------------


@needs_lightly
@pytest.mark.parametrize("step", [0, 5, 10])
def test_the_dino_hook_equals_lightly(step):
    """With the identity as encoder, teacher and heads, the term is lightly's DINOLoss of the global crops' teacher
    logits against every crop's student logits, at the teacher temperature of `step` (0.04 -> 0.07 over 10 steps,
    held after), and the centre moves as lightly's."""
    from lightly.loss import DINOLoss

    recipe = validate(tiny_recipe("/unused", NO_SHARDS, plugins={"backbones": VIT, "dino": DINO}), check_data=False)[0]
    recipe.train.steps = 20
    section = recipe.plugins["dino"]
    ramp = {"start": 0.04, "end": 0.07, "shape": "linear", "steps": 10}
    cfg = type(section).model_validate({**section.model_dump(by_alias=True), "teacher_temp": ramp})
    g = torch.Generator().manual_seed(step)
    views = {f"dino.{v}": torch.randn(6, 8, generator=g, dtype=torch.float64) for v in ("v1", "v2", "l1", "l2")}
    center = Center(8).double()
    center.center.copy_(torch.randn(1, 8, generator=g, dtype=torch.float64))
    own = nn.ModuleDict({"head": nn.Identity(), "center": center})
    teacher_modules = {"dino": nn.ModuleDict({"head": nn.Identity()})}
    ctx = step_context(recipe, views, encode=identity, teacher=identity, teacher_modules=teacher_modules, step=step)
    oracle = DINOLoss(8, warmup_teacher_temp=0.04, teacher_temp=0.07, student_temp=0.1).double()
    oracle.center.data.copy_(center.center.reshape(oracle.center.shape))
    temp = min(0.04 + 0.003 * step, 0.07)
    terms = dino.regularize(ctx=ctx.scoped("dino"), cfg=cfg, own=own)
    with float64_constants():
        expected = oracle([views["dino.v1"], views["dino.v2"]], list(views.values()), teacher_temp=temp)
    assert set(terms) == {"loss"} and abs(terms["loss"].item() - expected.item()) <= TOL
    assert (center.center - oracle.center.reshape(1, 8)).abs().max().item() <= TOL, "the centre moved as lightly's"


@needs_lightly
def test_the_ibot_hook_equals_lightly():
    """With the identity as heads, the term is lightly's IBOTPatchLoss of the masked patches, and the centre moves
    with the masked teacher patches as lightly's. The fake encoders give each image's patch logits by its row id
    (the views hold it), so the global crops may be encoded in one call, as the context groups them."""
    from lightly.loss import IBOTPatchLoss

    recipe = validate(tiny_recipe("/unused", NO_SHARDS, plugins=DINOV2), check_data=False)[0]
    g = torch.Generator().manual_seed(0)
    b, n, k = 4, 9, 8
    student_patches = torch.randn(2 * b, n, k, generator=g, dtype=torch.float64)  # v1's images, then v2's
    teacher_patches = student_patches + torch.randn(2 * b, n, k, generator=g, dtype=torch.float64)
    masks = torch.rand(2 * b, n, generator=g) < 0.6
    masks &= masks.cumsum(1) <= int(0.5 * n)  # at most the ratio cap's 4 of 9, as the workers draw them
    masks[0] = False  # an image without a masked patch counts in the mean
    assert int(masks.sum(1).max()) == int(0.5 * n)
    ids = torch.arange(2 * b, dtype=torch.float64).view(2, b, 1, 1, 1)
    views = {"dino.v1": ids[0].expand(b, 1, 4, 4), "dino.v2": ids[1].expand(b, 1, 4, 4)}
    params = {"dino.v1": masks[:b].double(), "dino.v2": masks[b:].double()}
    seen: list[bool] = []

    def rows(view: torch.Tensor) -> torch.Tensor:
        return view[:, 0, 0, 0].long()

    def student(view, mask=None):
        seen.append(mask is not None and torch.equal(mask, masks[rows(view)]))
        return Encoding(h=view.flatten(1), patches=student_patches[rows(view)])

    def teacher(view):
        return Encoding(h=view.flatten(1), patches=teacher_patches[rows(view)])

    own = nn.ModuleDict({"head": nn.Identity(), "center": Center(k).double()})
    heads = {"ibot": nn.ModuleDict({"head": nn.Identity()})}
    ctx = step_context(recipe, views, params=params, encode=student, teacher=teacher, teacher_modules=heads)
    terms = ibot.regularize(modules=nn.ModuleDict(), ctx=ctx.scoped("ibot"), cfg=recipe.plugins["ibot"], own=own)
    assert seen == [True], "one student call on the global crops, with their masks"
    oracle = IBOTPatchLoss(k, teacher_temp=0.04, student_temp=0.1, center_momentum=0.9).double()
    t, s = teacher_patches[masks], student_patches[masks]
    with float64_constants():
        expected = oracle(t, s, masks.reshape(2 * b, 3, 3), teacher_temp=0.04)
    assert abs(terms["loss"].item() - expected.item()) <= TOL
    assert (own["center"].center - oracle.center.value).abs().max().item() <= TOL
    assert abs(ctx.metrics["ibot.masked"].item() - masks.float().mean().item()) < 1e-7


def test_the_koleo_hook_sums_each_global_crops_koleo():
    recipe = validate(tiny_recipe("/unused", NO_SHARDS, plugins=DINOV2), check_data=False)[0]
    g = torch.Generator().manual_seed(0)
    views = {f"dino.{v}": torch.randn(5, 6, generator=g, dtype=torch.float64) for v in ("v1", "v2")}
    params = {name: torch.zeros(5, 49) for name in views}
    ctx = step_context(recipe, views, params=params, encode=lambda view, mask=None: identity(view))
    terms = koleo.regularize(ctx=ctx.scoped("koleo"))
    assert abs(terms["loss"].item() - (koleo_loss(views["dino.v1"]) + koleo_loss(views["dino.v2"])).item()) <= TOL
    assert recipe.plugins["koleo"].weight == 0.1  # DINOv2's koleo_loss_weight


# --- views, masks, encodings ------------------------------------------------------------------------------------


def test_dino_makes_the_shared_crops_and_masks_its_global_crops_when_ibot_asks():
    from framework.engine import build_views

    cfg, hooks = validate(tiny_recipe("/unused", NO_SHARDS, plugins={"backbones": VIT, "dino": DINO}), check_data=False)
    plain = build_views(cfg, hooks)
    assert sorted(plain) == ["dino.l1", "dino.l2", "dino.v1", "dino.v2", "x"]
    cfg, hooks = validate(tiny_recipe("/unused", NO_SHARDS, plugins=DINOV2), check_data=False)
    views = build_views(cfg, hooks)
    assert sorted(views) == sorted(plain)
    from PIL import Image

    image = Image.new("L", (28, 28), 128)
    torch.manual_seed(0)
    for name in ("dino.v1", "dino.v2"):
        out, mask = views[name].transform(image)
        assert out.shape == (1, 28, 28) and mask.shape == (49,) and 0 < mask.sum() < 49  # probability 1: masked
    for name in ("dino.l1", "dino.l2"):
        assert not isinstance(views[name].transform(image), tuple), "local crops carry no mask"


def test_a_dinov2_step_masks_the_students_global_crops_and_the_teacher_sees_them_whole(tmp_path, fmnist_shards):
    """One encoder call per crop size for the student (the masked global crops, then the local ones), shared by
    dino, ibot and koleo; one teacher call, on the global crops only, unmasked; the terms are all there."""
    cfg, hooks = validate(tiny_recipe(tmp_path, fmnist_shards, plugins=DINOV2), check_data=False)
    model = Model(hooks, cfg).train()
    student, teacher = [], []
    model.plugins["backbones"]["encoder"].register_forward_pre_hook(
        lambda m, args, kwargs: student.append((tuple(args[0].shape), kwargs.get("mask") is not None)),
        with_kwargs=True,
    )
    model.teacher.plugins["backbones"]["encoder"].register_forward_pre_hook(
        lambda m, args, kwargs: teacher.append((tuple(args[0].shape), kwargs.get("mask") is not None)),
        with_kwargs=True,
    )
    views = {"x": torch.randn(4, 1, 28, 28), "dino.v1": torch.randn(4, 1, 28, 28), "dino.v2": torch.randn(4, 1, 28, 28)}
    views |= {"dino.l1": torch.randn(4, 1, 16, 16), "dino.l2": torch.randn(4, 1, 16, 16)}
    params = {f"dino.v{i}": (torch.rand(4, 49) < 0.3).float() for i in (1, 2)}
    terms, metrics = model(views, params, step=0)
    assert student == [((8, 1, 28, 28), True), ((8, 1, 16, 16), False)]
    assert teacher == [((8, 1, 28, 28), False)]
    assert sorted(terms) == ["dino.loss", "ibot.loss", "koleo.loss"] and all(t.isfinite() for t in terms.values())
    assert sorted(model.teacher.plugins["dino"]) == ["head"] and sorted(model.teacher.plugins["ibot"]) == ["head"]
    assert "mask_token" in model.plugins["backbones"], "ibot needs patch tokens: backbones builds the mask token"


def test_dino_freezes_its_last_layer_for_the_first_steps_and_logs_its_schedules(tmp_path, fmnist_shards):
    section = {**DINO, "freeze_last_layer_steps": 1, "teacher_temp": {"start": 0.04, "end": 0.07, "shape": "linear"}}
    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins={"backbones": VIT, "dino": section}, checkpoint={"every": 1})
    out = run_steps(recipe, steps=2)
    first, second = (load_file(str(model_weights_file(c))) for c in complete_checkpoints(out))
    last = "plugins.dino.head.last_layer.weight_v"
    # step 1 left the last layer alone (the teacher's copy, an EMA of it, is still equal); step 2 moved it
    torch.testing.assert_close(first[last], first[f"teacher.{last}"], rtol=1e-6, atol=0)  # m x + (1 - m) x
    assert not torch.equal(first["plugins.dino.head.mlp.0.weight"], first["teacher.plugins.dino.head.mlp.0.weight"])
    assert not torch.equal(second[last], first[last])
    records = read_metrics(out)
    assert [r["dino.teacher_temp"] for r in records] == pytest.approx([0.055, 0.07])  # at the step about to run
    assert all(r["dino.loss"] > 0 for r in records) and "teacher.momentum" in records[0]


def test_dino_and_ibot_evaluate_the_teacher_by_default_and_byol_the_student():
    for plugins, expected in ((DINOV2, "teacher"), ({"backbones": VIT, "dino": DINO}, "teacher")):
        recipe = validate(tiny_recipe("/unused", NO_SHARDS, plugins=plugins), check_data=False)[0]
        assert evaluated_encoder(recipe, has_teacher=True) == expected
    byol = {"backbones": VIT, "byol": {"proj_hidden_dim": 8, "proj_output_dim": 4, "pred_hidden_dim": 8}}
    recipe = validate(tiny_recipe("/unused", NO_SHARDS, plugins=byol), check_data=False)[0]
    assert evaluated_encoder(recipe, has_teacher=True) == "student"


# --- recipes refused in one line --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plugins", "error", "message"),
    [
        ({"backbones": VIT, "ibot": HEAD}, PluginError, "needs exactly one plugin making the shared crops"),
        ({"backbones": VIT, "koleo": {}}, PluginError, "needs exactly one plugin making the shared crops"),
        (
            {**DINOV2, "backbones": {"encoder": "conv28", "latent_dim": None}},
            RecipeError,
            "patch_tokens: conv28 gives no patch tokens",
        ),
        ({**DINOV2, "backbones": {**VIT, "patch_tokens": False}}, RecipeError, "patch_tokens: false, and plugins ibot"),
        ({**DINOV2, "dino": {**DINO, "centering": "mean"}}, RecipeError, "plugins.dino.centering: Input should be"),
    ],
)
def test_a_recipe_the_terms_cannot_train_is_refused_in_one_line(tmp_path, fmnist_shards, plugins, error, message):
    with pytest.raises(error) as info:
        run_steps(tiny_recipe(tmp_path, fmnist_shards, plugins=plugins), steps=1)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run" / "recipe.yaml").exists(), "refused before the run folder"


def test_a_masked_view_on_an_encoder_without_tokens_is_one_line():
    from framework.manager import PluginHooks

    hooks = PluginHooks(["backbones"])
    recipe = validate(tiny_recipe("/unused", NO_SHARDS), check_data=False)[0]
    own = {"backbones": nn.ModuleDict({"encoder": nn.Flatten()})}
    with pytest.raises(PluginError, match="a masked view needs patch tokens"):
        hooks.encode(nn.ModuleDict(own), torch.zeros(2, 1, 4, 4), None, recipe, torch.zeros(2, 1, dtype=torch.bool))


def test_ibot_may_share_dinos_head(tmp_path, fmnist_shards):
    """`head: shared` (iBOT's ViT-S/16 runs): no head of its own, DINO's head (and the teacher's copy of it) on the
    patch tokens too, so DINO's head gets both terms' gradients; a width other than the shared head's is one line."""
    plugins = {**DINOV2, "ibot": {**HEAD, "head": "shared"}}
    cfg, hooks = validate(tiny_recipe(tmp_path, fmnist_shards, plugins=plugins), check_data=False)
    model = Model(hooks, cfg).train()
    assert sorted(model.plugins["ibot"]) == ["center"] and "ibot" not in model.teacher.plugins
    views = {"x": torch.randn(4, 1, 28, 28), "dino.v1": torch.randn(4, 1, 28, 28), "dino.v2": torch.randn(4, 1, 28, 28)}
    views |= {"dino.l1": torch.randn(4, 1, 16, 16), "dino.l2": torch.randn(4, 1, 16, 16)}
    params = {f"dino.v{i}": torch.ones(4, 49) for i in (1, 2)}  # every patch masked: the patch term alone moves it
    terms, _ = model(views, params, step=0)
    head = model.plugins["dino"]["head"].mlp[0].weight
    (alone,) = torch.autograd.grad(terms["ibot.loss"], head, retain_graph=True)
    assert alone.abs().sum() > 0, "the patch term trains DINO's head"
    wrong = {**DINOV2, "ibot": {**HEAD, "out_dim": 32, "head": "shared"}}
    with pytest.raises(PluginError, match=r"out_dim 32 is not the shared head's \(dino's 64\)"):
        run_steps(tiny_recipe(tmp_path / "wrong", fmnist_shards, plugins=wrong), steps=1)


def test_ibot_runs_its_heads_on_the_rows_that_can_be_masked_and_loses_no_masked_patch():
    """`masked_first` keeps each image's masked patches (masked first, in patch order) among its first
    `int(ratio_max x N)` rows, which bounds every mask `MaskedView` draws: the loss and its gradient are those of
    the heads on every patch, at (at most) half the rows for DINOv2's masks."""
    from plugins.blocks import MaskedView, PatchMasks, ibot_patch_loss
    from plugins.ibot import gather_rows, masked_first

    spec = PatchMasks(probability=1.0, ratio=(0.1, 0.5))
    draw = MaskedView(lambda image: image, 7, spec)
    torch.manual_seed(0)
    masks = torch.stack([draw(torch.zeros(1))[1] > 0.5 for _ in range(64)])  # (64, 49), as the workers draw
    rows = int(spec.ratio[1] * 49)
    assert int(masks.sum(1).max()) <= rows and int(masks.sum(1).max()) >= rows - 4
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(64, 49, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(64, 49, 5, generator=g, dtype=torch.float64).softmax(-1)
    head = nn.Linear(6, 5).double()
    dense = ibot_patch_loss(head(tokens), teacher, masks, 0.1)
    order = masked_first(masks, rows)
    picked, kept = gather_rows(tokens, order), torch.gather(masks, 1, order)
    sparse = ibot_patch_loss(head(picked), gather_rows(teacher, order), kept, 0.1)
    assert picked.shape == (64, rows, 6) and torch.equal(kept.sum(1), masks.sum(1))
    assert abs(dense.item() - sparse.item()) <= TOL
    (g_dense,) = torch.autograd.grad(dense, tokens)
    (g_sparse,) = torch.autograd.grad(sparse, tokens)
    assert (g_dense - g_sparse).abs().max().item() <= TOL


# --- attacks: what a user may get wrong -------------------------------------------------------------------------


def test_two_plugins_masking_or_making_the_crops_are_one_line(tmp_path, fmnist_shards):
    """Two terms asking for masks (two iBOT sections) would disagree on the masks; two plugins making the shared
    crops leave the terms no crops to read: each is refused before the run folder, naming the plugins."""
    with pytest.raises(PluginError, match=r"plugins ibot, ibot2 each mask the global crops: keep one$"):
        run_steps(tiny_recipe(tmp_path / "a", fmnist_shards, plugins=DINOV2), extra_plugins={"ibot2": ibot})
    assert not (tmp_path / "a" / "run").exists()
    plugins = {"backbones": VIT, "dino": DINO, "koleo": {}}
    with pytest.raises(PluginError, match=r"shared crops \(e\.g\. dino\), found dino, dino2$"):
        run_steps(tiny_recipe(tmp_path / "b", fmnist_shards, plugins=plugins), extra_plugins={"dino2": dino})
    assert not (tmp_path / "b" / "run").exists()


def test_a_resume_may_not_change_the_teachers_momentum(tmp_path, fmnist_shards):
    """The teacher in a checkpoint was averaged with its recipe's momentum: a resume with another is refused in
    one line (nothing written), as for every key the checkpoint's state depends on; `teacher.evaluate` may change."""
    from framework.checkpoint import CheckpointError

    plugins = {"backbones": VIT, "dino": DINO}
    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins=plugins, teacher={"momentum": 0.99})
    out = run_steps(recipe, steps=1)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match=r"was trained with teacher\.momentum") as info:
        run_steps(recipe, steps=2, overrides=["train.resume=auto", "teacher.momentum=0.9"])
    assert "\n" not in str(info.value) and sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    run_steps(recipe, steps=2, overrides=["train.resume=auto", "teacher.evaluate=student"])
    assert read_metrics(out)[-1]["step"] == 2
