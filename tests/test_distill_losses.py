"""The self-distillation blocks (plugins/blocks/distill.py) against lightly's implementations (issue 25).

Oracles (lightly 1.6.0, MIT, installed as for tests/test_loss_oracle.py):
- `lightly.loss.DINOLoss`: `dino_loss` with `Center.probabilities`, and `Center.update`;
- `lightly.loss.IBOTPatchLoss`: `ibot_patch_loss` with a `Center` of the masked teacher patches;
- `lightly.loss.KoLeoLoss`: `koleo_loss`;
- `lightly.loss.swav_loss.sinkhorn`: `sinkhorn_knopp`. It is SwAV's Sinkhorn-Knopp, which DINOv2's
  `sinkhorn_knopp_teacher` copies and adds a division by K after each row normalisation: a uniform factor the
  column normalisation that follows cancels, so the two are equal. (lightly's `capi_loss.sinkhorn_knopp`
  balances each sequence position and adds 1e-8 to its denominators; `msn_loss.sinkhorn` takes probabilities.)

As in tests/test_loss_oracle.py: float64 random inputs, several seeds and sizes, values and gradients with
respect to the student's inputs to TOL = 1e-10, and a control per loss showing that another convention is at
least APART from the oracle. lightly makes some of its constants tensors of the default dtype (the teacher's
temperature `torch.tensor(teacher_temp)`, iBOT's weights `1.0 / masked patches`), float32 values off by
~1e-8: the oracles run with float64 as the default dtype (`_float64_constants`), so they compute their maths in
float64 throughout.

tests/dist_distill.py runs `Center.update` and `sinkhorn_knopp` in 2 real processes (gloo, CPU) and the test
below compares them with one process on the whole batch to 1e-12.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from plugins.blocks import Center, DINOHead, WeightNormLinear, dino_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp
from tests.helpers import float64_constants, needs_lightly

TOL = 1e-10
APART = 1e-3  # the controls: a different convention is at least this far from the oracle
SEEDS = (0, 1, 2)
TEACHER_TEMPS = (0.04, 0.07)  # DINO's range (0.04, warmed up to 0.07)
STUDENT_TEMP = 0.1
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("dist_distill.py")
WORLD = 2


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def _leaves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _max_difference(value, grads, oracle_value, oracle_grads) -> float:
    assert value.dtype == torch.float64 and oracle_value.dtype == torch.float64
    diffs = [(value - oracle_value).abs().item()]
    diffs += [(a - b).abs().max().item() for a, b in zip(grads, oracle_grads, strict=True)]
    return max(diffs)


# --- DINO: dino_loss + Center -----------------------------------------------------------------------


def _crops(seed: int, b: int, k: int, globals_: int, locals_: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's logits of the global crops and the student's of every crop (the global ones first),
    correlated with the teacher's, with a common offset per prototype (what the centre takes out)."""
    g = torch.Generator().manual_seed(seed)
    offset = _randn(g, 1, k, scale=0.5)
    teacher = [offset + _randn(g, b, k) for _ in range(globals_)]
    student = [t + _randn(g, b, k, scale=0.5) for t in teacher]
    student += [teacher[i % globals_] + _randn(g, b, k) for i in range(locals_)]
    return teacher, student


@needs_lightly
@pytest.mark.parametrize("teacher_temp", TEACHER_TEMPS)
@pytest.mark.parametrize("b, k, globals_, locals_", [(2, 3, 2, 0), (8, 16, 2, 4), (32, 64, 2, 6), (4, 8, 1, 3)])
@pytest.mark.parametrize("seed", SEEDS)
def test_dino_loss_and_center_equal_lightly(seed, b, k, globals_, locals_, teacher_temp):
    # lightly's DINOLoss takes the teacher's logits, centres them (a (1, 1, K) buffer, momentum 0.9),
    # softmax / teacher_temp, cross-entropy of every (teacher j, student i != j) pair averaged over the batch
    # and the pairs, then updates its centre with the mean of the teacher's rows. Three steps, so that the
    # centre is not zero after the first; the student's gradients are compared at every step.
    from lightly.loss import DINOLoss

    oracle = DINOLoss(k, warmup_teacher_temp=teacher_temp, teacher_temp=teacher_temp, student_temp=STUDENT_TEMP)
    oracle = oracle.double()
    center = Center(k, momentum=0.9).double()
    for step in range(3):
        teacher, student = _crops(100 * seed + step, b, k, globals_, locals_)
        ours = _leaves(student)
        value = dino_loss(ours, [center.probabilities(t, teacher_temp) for t in teacher], STUDENT_TEMP)
        grads = torch.autograd.grad(value, ours)
        center.update(torch.cat(teacher))
        theirs = _leaves(student)
        with float64_constants():
            oracle_value = oracle(teacher, theirs, teacher_temp=teacher_temp)
        oracle_grads = torch.autograd.grad(oracle_value, theirs)
        assert _max_difference(value, grads, oracle_value, oracle_grads) <= TOL, f"step {step}"
        assert (center.center - oracle.center.reshape(1, k)).abs().max().item() <= TOL, f"centre after step {step}"
    # control: the pairs of a crop with itself (i == j) counted too
    teacher, student = _crops(seed, b, k, globals_, locals_)
    probabilities = [center.probabilities(t, teacher_temp) for t in teacher]
    with_diagonal = sum(
        -(p * F.log_softmax(s / STUDENT_TEMP, dim=-1)).sum(-1).mean() for p in probabilities for s in student
    ) / (len(probabilities) * len(student))
    with float64_constants():
        oracle_value = oracle(teacher, student, teacher_temp=teacher_temp)
    assert abs(with_diagonal.item() - oracle_value.item()) > APART


def test_dino_loss_needs_two_crops():
    one = [torch.randn(2, 3)]
    with pytest.raises(ValueError, match="no pair"):
        dino_loss(one, [one[0].softmax(-1)], STUDENT_TEMP)


def test_center_keeps_its_dtype_and_takes_no_gradient():
    center = Center(4)
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    center.update(logits)
    assert center.center.dtype == torch.float32 and not center.center.requires_grad
    torch.testing.assert_close(center.center, 0.1 * logits.detach().mean(0, keepdim=True).float())
    assert center.probabilities(logits, 0.04).dtype == torch.float64
    assert center.probabilities(logits.bfloat16(), 0.04).dtype == torch.float32


# --- iBOT: ibot_patch_loss ------------------------------------------------------------------------


def _patches(seed: int, b: int, side: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and student patch logits (B, side * side, K) and a mask (B, side * side) in which image 0 has
    no masked patch, image 1 every patch, the others about 40 %."""
    g = torch.Generator().manual_seed(seed)
    n = side * side
    teacher = _randn(g, 1, 1, k, scale=0.5) + _randn(g, b, n, k)
    student = teacher + _randn(g, b, n, k, scale=0.7)
    masks = torch.rand(b, n, generator=g) < 0.4
    masks[0] = False
    masks[1] = True
    return teacher, student, masks


@needs_lightly
@pytest.mark.parametrize("teacher_temp", TEACHER_TEMPS)
@pytest.mark.parametrize("b, side, k", [(2, 2, 3), (4, 3, 16), (8, 4, 64)])
@pytest.mark.parametrize("seed", SEEDS)
def test_ibot_patch_loss_and_center_equal_lightly(seed, b, side, k, teacher_temp):
    # lightly's IBOTPatchLoss takes the masked patches' logits (rows in the mask's order) and the mask
    # (B, H, W): each masked patch's cross-entropy weighted by 1 / (its image's masked patches, >= 1), summed,
    # divided by B (images without a masked patch count), then its Center (1, K) takes the mean of the masked
    # teacher rows. As DINOv2's `forward_masked`. Ours takes every patch and the mask.
    from lightly.loss import IBOTPatchLoss

    oracle = IBOTPatchLoss(k, teacher_temp=teacher_temp, student_temp=STUDENT_TEMP, center_momentum=0.9).double()
    center = Center(k, momentum=0.9).double()
    for step in range(3):
        teacher, student, masks = _patches(100 * seed + step, b, side, k)
        (ours,) = _leaves([student])
        value = ibot_patch_loss(ours, center.probabilities(teacher, teacher_temp), masks, STUDENT_TEMP)
        (grad,) = torch.autograd.grad(value, ours)
        center.update(teacher, masks)  # the masked rows, counted without reading them back
        (theirs,) = _leaves([student])
        with float64_constants():
            oracle_value = oracle(
                teacher[masks], theirs[masks], masks.reshape(b, side, side), teacher_temp=teacher_temp
            )
        (oracle_grad,) = torch.autograd.grad(oracle_value, theirs)
        assert _max_difference(value, [grad], oracle_value, [oracle_grad]) <= TOL, f"step {step}"
        assert (center.center - oracle.center.value).abs().max().item() <= TOL, f"centre after step {step}"
    # control: dividing by the images that have a masked patch instead of by B
    teacher, student, masks = _patches(seed, b, side, k)
    value = ibot_patch_loss(student, center.probabilities(teacher, teacher_temp), masks, STUDENT_TEMP)
    masked_images = masks.any(dim=1).sum().item()
    with float64_constants():
        oracle_value = oracle(teacher[masks], student[masks], masks.reshape(b, side, side), teacher_temp=teacher_temp)
    assert abs(value.item() * b / masked_images - oracle_value.item()) > APART


def test_ibot_patch_loss_ignores_unmasked_patches():
    teacher, student, masks = _patches(0, 4, 3, 8)
    probabilities = teacher.softmax(-1)
    value = ibot_patch_loss(student, probabilities, masks, STUDENT_TEMP)
    changed = torch.where(masks.unsqueeze(-1), student, torch.full_like(student, 1e3))
    assert ibot_patch_loss(changed, probabilities, masks, STUDENT_TEMP).item() == value.item()
    no_mask = torch.zeros_like(masks)
    assert ibot_patch_loss(student, probabilities, no_mask, STUDENT_TEMP).item() == 0.0


# --- KoLeo -------------------------------------------------------------------------------------------


@needs_lightly
@pytest.mark.parametrize("b, d", [(2, 3), (8, 16), (64, 128)])
@pytest.mark.parametrize("seed", SEEDS)
def test_koleo_loss_equals_lightly(seed, b, d):
    # lightly's KoLeoLoss is DINOv2's: F.normalize with eps, nearest other row by the dot product,
    # PairwiseDistance(2, eps), -log(distance + eps) averaged over the rows.
    from lightly.loss import KoLeoLoss

    g = torch.Generator().manual_seed(seed)
    x = _randn(g, b, d) * torch.logspace(-1, 1, b, dtype=torch.float64).unsqueeze(1)  # norms are normalised away
    (ours,) = _leaves([x])
    value = koleo_loss(ours)
    (grad,) = torch.autograd.grad(value, ours)
    (theirs,) = _leaves([x])
    oracle_value = KoLeoLoss()(theirs)
    (oracle_grad,) = torch.autograd.grad(oracle_value, theirs)
    assert _max_difference(value, [grad], oracle_value, [oracle_grad]) <= TOL
    # control: the distances of the raw rows, not of the normalised ones
    nearest = (F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T).fill_diagonal_(-2).argmax(1)
    raw = -(F.pairwise_distance(x, x[nearest], eps=1e-8) + 1e-8).log().mean()
    assert abs(raw.item() - oracle_value.item()) > APART


# --- Sinkhorn-Knopp ----------------------------------------------------------------------------------


@needs_lightly
@pytest.mark.parametrize("iterations", [1, 3, 10])
@pytest.mark.parametrize("b, k", [(2, 3), (16, 8), (64, 256)])
@pytest.mark.parametrize("seed", SEEDS)
def test_sinkhorn_knopp_equals_lightly(seed, b, k, iterations):
    from lightly.loss.swav_loss import sinkhorn

    g = torch.Generator().manual_seed(seed)
    logits = _randn(g, 1, k, scale=0.5) + _randn(g, b, k)
    temp = 0.05
    ours = sinkhorn_knopp(logits, temp, iterations=iterations)
    oracle = sinkhorn(logits, iterations=iterations, epsilon=temp)
    assert ours.dtype == torch.float64 and ours.shape == (b, k)
    assert (ours - oracle).abs().max().item() <= TOL
    given_rows = sinkhorn_knopp(logits, temp, iterations=iterations, rows=torch.tensor(b))
    assert (given_rows - oracle).abs().max().item() <= TOL
    torch.testing.assert_close(ours.sum(dim=1), torch.ones(b, dtype=torch.float64), rtol=0, atol=1e-12)
    # control: the teacher's plain softmax, no balancing
    assert (F.softmax(logits / temp, dim=-1) - oracle).abs().max().item() > APART


def test_sinkhorn_knopp_is_stable_and_keeps_precision():
    # prototypes whose logits / temp reach ~2000 (exp overflows float64, DINOv2's float32 from ~88) over a
    # per-sample spread of a few units: finite, thanks to the shift by each prototype's maximum
    g = torch.Generator().manual_seed(0)
    logits = 100 * _randn(g, 1, 16) + _randn(g, 32, 16)
    for x in (logits, logits.float()):
        q = sinkhorn_knopp(x, 0.05)
        assert torch.isfinite(q).all() and q.dtype == x.dtype
        torch.testing.assert_close(q.sum(dim=1), torch.ones_like(q[:, 0]))
    assert sinkhorn_knopp(logits.bfloat16(), 0.05).dtype == torch.float32
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn_knopp(logits, 0.05, iterations=0)


# --- Two processes ------------------------------------------------------------------------------------


def _script():
    spec = importlib.util.spec_from_file_location("dist_distill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_center_and_sinkhorn_over_two_processes_equal_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    proc = subprocess.run(
        [*cmd, str(SCRIPT), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    script = _script()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for split in script.SPLITS:
        single = script.run(split)  # no process group: every row
        for r, result in enumerate(ranks):
            got = result[split]
            assert (got["center"] - single["center"]).abs().max().item() <= 1e-12, (split, r)
            first = script.FIRST.get(split, script.ROWS // WORLD)
            rows = slice(0, first) if r == 0 else slice(first, script.ROWS)
            for key in ("sinkhorn", "sinkhorn_rows"):
                assert got[key].shape == (rows.stop - rows.start, script.K), (split, r, key)
                if rows.stop > rows.start:
                    assert (got[key] - single["sinkhorn"][rows]).abs().max().item() <= 1e-12, (split, r, key)
    # control: one rank's rows alone (no all-reduce) give another centre and other probabilities
    single, half = script.run("even"), slice(0, script.ROWS // WORLD)
    first, _ = script.fixed_batches()
    assert (sinkhorn_knopp(first[half], script.TEMP) - single["sinkhorn"][half]).abs().max().item() > APART
    alone = Center(script.K).double()
    for batch in script.fixed_batches():
        alone.update(batch[half])
    assert (alone.center - single["center"]).abs().max().item() > APART


# --- DINOHead ---------------------------------------------------------------------------------------------


def _row_norms(layer: WeightNormLinear, in_dim: int) -> torch.Tensor:
    """The norms of the effective weight's rows, read through the layer's forward."""
    eye = torch.eye(in_dim, dtype=layer.weight_v.dtype)
    return layer(eye).norm(dim=0)  # layer(I) = W.T: column j is row j of W


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_dino_head_shape_and_deepcopy(layers):
    torch.manual_seed(0)
    head = DINOHead(12, 40, hidden_dim=24, bottleneck_dim=8, layers=layers).double()
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == layers and len(head.mlp) == 2 * layers - 1
    assert linears[0].in_features == 12 and linears[-1].out_features == 8
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    x = torch.randn(5, 12, dtype=torch.float64)
    out = head(x)
    assert out.shape == (5, 40) and out.dtype == torch.float64
    twin = copy.deepcopy(head)
    assert torch.equal(twin(x), out)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(head.parameters(), twin.parameters(), strict=True))
    # the logits are cosines (an L2-normalised bottleneck against unit rows): |logit| <= 1
    assert out.abs().max().item() <= 1 + 1e-12


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_last_layer_rows_have_norm_weight_g(norm_last_layer):
    torch.manual_seed(0)
    head = DINOHead(6, 20, hidden_dim=16, bottleneck_dim=4, norm_last_layer=norm_last_layer).double()
    last = head.last_layer
    assert isinstance(last, WeightNormLinear)
    assert last.weight_v.shape == (20, 4) and last.weight_g.shape == (20, 1)
    assert last.weight_g.requires_grad is not norm_last_layer
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        head(torch.randn(8, 6, dtype=torch.float64)).pow(3).sum().backward()
        optimizer.step()
    if norm_last_layer:
        assert last.weight_g.grad is None and torch.equal(last.weight_g, torch.ones_like(last.weight_g))
    else:
        assert not torch.equal(last.weight_g, torch.ones_like(last.weight_g))  # trained
    assert not torch.allclose(last.weight_v.norm(dim=1), torch.ones(20, dtype=torch.float64))
    torch.testing.assert_close(_row_norms(last, 4), last.weight_g.detach().abs().squeeze(1), rtol=0, atol=1e-12)


def test_dino_head_parameter_count_for_dinos_defaults():
    # in 384 (ViT-S/16), out 65536, hidden 2048, bottleneck 256, 3 layers:
    #   Linear(384, 2048):   384 * 2048 + 2048 =    788,480
    #   Linear(2048, 2048): 2048 * 2048 + 2048 =  4,196,352
    #   Linear(2048, 256):  2048 *  256 +  256 =    524,544
    #   weight_v:          65536 *  256        = 16,777,216
    #   weight_g:          65536 *    1        =     65,536 (not trained with norm_last_layer)
    head = DINOHead(384, 65536)
    assert sum(p.numel() for p in head.parameters()) == 22_352_128
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == 22_286_592
