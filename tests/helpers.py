"""What tests and the scripts they launch share (no test module imports another): the repository's
paths, the committed image shards and their samples, whether Fashion-MNIST is installed, the
environment and runner of `accelerate launch`, the runner of a command that must fail with one
line (`one_line`), a finished run's weights (its student's and teacher's encoders: `encoder_weights`, of a
`teacher_run`), `DumpWeights`, and `DeviceBright` (a view that splits, `data.augment_on`).

Fixtures built on these are in tests/conftest.py.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import v2

from framework import checkpoint, distributed, hookimpl
from framework.data import Sample, shard_urls, tar_records
from framework.data.sources import FASHION_MNIST_DIR
from framework.logging import read_metrics
from framework.testing import free_port, run_steps, tiny_recipe
from framework.types import OnDevice, View

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"  # written by tests/assets/make_assets.py
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ONE_NODE = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]

NEEDS_FASHION_MNIST = "needs Fashion-MNIST: apt-get install dataset-fashion-mnist"
needs_fashion_mnist = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason=NEEDS_FASHION_MNIST)


# The losses' independent oracle: scripts/test.sh sets AUGSSL_REQUIRE_ORACLES, so CI fails, never skips, without it.
needs_lightly = pytest.mark.skipif(
    os.environ.get("AUGSSL_REQUIRE_ORACLES") != "1" and importlib.util.find_spec("lightly") is None,
    reason="the oracle lightly is not installed (scripts/setup.sh: pip install --no-deps lightly==1.6.0)",
)
# A ViT small enough for a CPU step of self-distillation: patch 4 on the 28-px images (7 x 7 patches), local crops
# of 16 px (4 x 4) through its interpolated position embedding.
TINY_VIT = {
    "encoder": "timm/vit_tiny_patch16_224",
    "timm_kwargs": {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3, "dynamic_img_size": True},
    "latent_dim": None,
}
DISTILL_HEAD = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}  # a DINO / iBOT head as small
AUGSSL_CLI = "import sys; from framework.cli import main; sys.argv[0] = 'augssl'; main()"  # `augssl` uninstalled


def augssl(*args: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The `augssl` command (uninstalled: `AUGSSL_CLI`), run to its end with `env` (default `ENV`) in the repository."""
    command = [sys.executable, "-c", AUGSSL_CLI, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env or ENV, cwd=ROOT)


def one_line(args: list[Any], script: str = "train.py", env: dict[str, str] | None = None) -> str:
    """Run `launch/<script> args` (`script="augssl"`: the `augssl` command) with `env` (default `ENV`); assert it
    fails with exit 2 and one `augssl: error:` line, and return it."""
    command = ["-c", AUGSSL_CLI] if script == "augssl" else [str(ROOT / "launch" / script)]
    proc = subprocess.run(
        [sys.executable, *command, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env or ENV,
        cwd=ROOT,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("augssl: error: "), proc.stderr[-2000:]
    return lines[0]


def ddp_args(processes: int = 2) -> list[str]:
    """`accelerate launch` arguments of a DDP run of `processes` CPU processes on one machine, on a free port."""
    return ["--multi_gpu", "--num_processes", str(processes), *ONE_NODE, "--main_process_port", str(free_port())]


def small_size(raw: dict, cap: int = 32) -> int:
    """The image size a CPU test runs a (merged, raw) recipe at: its `data.image_size` up to `cap`, rounded down to
    a multiple of its timm ViT's patch (`timm_kwargs.patch_size`, else the `patch<N>` of the model's name), so a
    patch-14 ViT (DINOv2's) runs at 28 px with local crops of 14."""
    size = min(raw["data"]["image_size"], cap)
    backbone = raw.get("plugins", {}).get("backbones") or {}
    named = re.search(r"patch(\d+)", str(backbone.get("encoder", "")))
    patch = (backbone.get("timm_kwargs") or {}).get("patch_size") or (int(named.group(1)) if named else None)
    return size - size % patch if patch and size >= patch else size


def small_crops(raw: dict, size: int) -> list[str]:
    """Overrides that shrink a (merged, raw) recipe's multi-crop sizes for a CPU test at `size` px: global
    crops at the data's size, local crops at half of it, rounded down to a multiple of a timm ViT's patch
    (its `timm_kwargs.patch_size`, else the `patch<N>` of its name) so that the encoder takes them."""
    backbones = raw.get("plugins", {}).get("backbones") or {}
    named = re.search(r"patch(\d+)", str(backbones.get("encoder", "")))
    patch = (backbones.get("timm_kwargs") or {}).get("patch_size") or (int(named.group(1)) if named else 1)
    out = []
    for name, section in raw.get("plugins", {}).items():
        crops = (section or {}).get("crops") or {}
        if (crops.get("global") or {}).get("size") is not None:
            out.append(f"plugins.{name}.crops.global.size=null")
        if crops.get("local"):
            out.append(f"plugins.{name}.crops.local.size={max(patch, size // 2 // patch * patch)}")
    return out


def asset_specs(root: Path = ASSETS) -> dict[str, str]:
    """`{"train": spec, "test": spec}` of the asset shards under `root` (brace patterns, `data.train`)."""
    return {
        split: str(root / json.loads((root / f"{split}.json").read_text())["pattern"]) for split in ("train", "test")
    }


def asset_samples(split: str = "test") -> Iterator[Sample]:
    """The committed asset images of `split` ("train": 192, "test": 96), in shard order."""
    for url in shard_urls(asset_specs()[split]):
        for record in tar_records(url):
            yield Sample(record["__key__"], Image.open(io.BytesIO(record["png"])), int(record["cls"]))


def accelerate_launch(
    args: list[str],
    script_args: list[str],
    timeout: int = 300,
    env: dict[str, str] | None = None,
    script: str = "dist_train.py",
) -> subprocess.CompletedProcess:
    """`accelerate launch <args> tests/<script> <script_args>`, asserting it exits 0."""
    cmd = [*LAUNCH, *args, str(ROOT / "tests" / script), *script_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model (parameters and BatchNorm buffers) in the newest checkpoint."""
    return load_file(checkpoint.model_weights_file(checkpoint.complete_checkpoints(out)[-1]))


# the encoder's prefix in a checkpoint's model.safetensors: the student's, the EMA teacher's copy
ENCODER_PREFIX = {"student": "plugins.backbones.encoder.", "teacher": "teacher.plugins.backbones.encoder."}


def encoder_weights(out: Path, which: str) -> dict[str, torch.Tensor]:
    """The student's or the teacher's encoder in the newest checkpoint, from its model.safetensors, under the
    encoder's own key names (the prefix `ENCODER_PREFIX[which]` stripped)."""
    prefix = ENCODER_PREFIX[which]
    return {k.removeprefix(prefix): v for k, v in final_weights(out).items() if k.startswith(prefix)}


def teacher_run(tmp_path: Path, shards: dict[str, str], **sections: Any) -> Path:
    """A finished 2-step run with an EMA teacher (a small BYOL on `conv28`) in `tmp_path`: its teacher's encoder
    is an EMA of the student's, so the two differ. `sections` deep-merge into the recipe (`tiny_recipe`)."""
    byol = {"proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 32}
    plugins = {"backbones": {"encoder": "conv28", "latent_dim": None}, "byol": byol}
    return run_steps(tiny_recipe(tmp_path, shards, plugins=plugins, log={"trackers": []}, **sections), steps=2)


class DumpWeights:
    """A plugin saving every rank's modules after the last step to `<output_dir>/weights_rank<R>.pt`."""

    @hookimpl
    def on_train_step_end(self, modules, step, config):
        if step == config.train.steps:
            state = {k: v.detach().cpu().clone() for k, v in modules.named_parameters()}
            torch.save(state, Path(config.output_dir) / f"weights_rank{distributed.rank()}.pt")


class FrozenHead:
    """A plugin with two heads on detached features whose `on_after_backward` drops the gradients of `frozen`,
    so that no step changes it. `start`: its weights as `on_train_start` saw them (also saved, per rank, to
    `<output_dir>/start_rank<R>.pt`); `log`: (step, norm of its gradients, grad enabled) per call; the gradient of
    `free.weight` it saw, saved to `<output_dir>/grad_rank<R>_step<S>.pt`."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.log: list[tuple[int, float, bool]] = []

    @hookimpl
    def build_modules(self, encoder):
        return {"frozen": torch.nn.Linear(encoder.num_features, 3), "free": torch.nn.Linear(encoder.num_features, 3)}

    @hookimpl
    def on_train_start(self, own, config):
        self.start = {k: v.detach().cpu().clone() for k, v in own.state_dict().items()}
        torch.save(self.start, Path(config.output_dir) / f"start_rank{distributed.rank()}.pt")

    @hookimpl
    def auxiliary_head(self, own, ctx):
        h = ctx.encode("x").h.detach()
        return {"fit": (own["frozen"](h) - 1).pow(2).mean() + (own["free"](h) - 1).pow(2).mean()}

    @hookimpl
    def on_after_backward(self, step, own, config):
        norms = [p.grad.norm() for p in own.parameters()]  # every gradient is there
        self.log.append((step, torch.stack(norms).norm().item(), torch.is_grad_enabled()))
        grad = own["free"].weight.grad.cpu().clone()
        torch.save(grad, Path(config.output_dir) / f"grad_rank{distributed.rank()}_step{step}.pt")
        for p in own["frozen"].parameters():
            p.grad = None


def assert_only_frozen_kept(weights: dict[str, torch.Tensor], plugin: str, start: dict[str, torch.Tensor]) -> None:
    """`weights` (a state dict) holds `FrozenHead` `plugin`'s `frozen` weights of `start` (weight decay
    included), and trained `free` ones."""
    for key, before in start.items():
        after = weights[f"plugins.{plugin}.{key}"].cpu()
        if key.startswith("frozen."):
            assert torch.equal(after, before), f"{key} changed although its gradient was dropped"
        else:
            assert not torch.equal(after, before), f"{key} did not train"


def bomb_png(path: Path, width: int = 20000, height: int = 10000) -> Path:
    """A valid black 1-bit PNG of `width` x `height` pixels (default 200 million: over PIL's decompression-bomb
    limit of 178,956,970), a few kB on disk, written row by row without holding the pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, deflate = b"\0" * (1 + (width + 7) // 8), zlib.compressobj(9)
    pixels = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grey, deflate, no filter, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


class Brightness(torch.nn.Module):
    """A `DeviceStep` for tests: a brightness factor in [0.5, 1.5) per row of the global batch, drawn from the
    generator for all `total` rows, this rank's applied, then normalised as (x - 0.5) / 0.25. It counts its
    calls and keeps the factors of its rows."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.factors = 0, []

    def forward(self, images: torch.Tensor, generator: torch.Generator, first: int, total: int) -> torch.Tensor:
        assert images.dtype == torch.uint8, "the workers emit a view that splits as uint8"
        factors = torch.rand(total, generator=generator, device=images.device)[first : first + len(images)] + 0.5
        self.calls += 1
        self.factors.append(factors)
        return brighter(images, factors)


def brighter(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """uint8 `images` (B, C, H, W) scaled by one factor per row, clamped, normalised as (x - 0.5) / 0.25."""
    return ((images.float() / 255 * factors.view(-1, 1, 1, 1)).clamp(0, 1) - 0.5) / 0.25


class RandomFlip:
    """The worker part of the test view: a PIL image to a uint8 tensor, flipped with probability 1/2."""

    def __call__(self, image: Any) -> torch.Tensor:
        tensor = v2.functional.pil_to_tensor(image)
        return tensor.flip(-1) if bool(torch.rand(()) < 0.5) else tensor


class FlipBright:
    """The whole test view, as the workers run it: `RandomFlip`, then a brightness factor per sample."""

    def __call__(self, image: Any) -> torch.Tensor:
        tensor = RandomFlip()(image)
        return brighter(tensor[None], torch.rand(1) + 0.5)[0]


class DeviceBright:
    """A plugin whose view `view` splits (`View.on_device`: `RandomFlip` in the workers, `Brightness` on the
    device); its term trains the encoder on the view, its metric `device_calls` counts the device step's calls,
    and each rank writes the factors its rows got (`tests/dist_train.py` adds it with `AUGSSL_TEST_BRIGHT=1`)."""

    def __init__(self) -> None:
        self.step = Brightness()

    @hookimpl
    def augment(self, config: Any) -> dict[str, View]:
        return {"view": View(FlipBright(), on_device=OnDevice(RandomFlip(), self.step))}

    @hookimpl
    def regularize(self, ctx: Any) -> dict[str, torch.Tensor]:
        ctx.metrics["device_calls"] = torch.tensor(float(self.step.calls))
        return {"pull": ctx.encode("view").h.pow(2).mean() * 1e-2}

    @hookimpl
    def on_train_step_end(self, step: int, config: Any) -> None:
        """After the last step: this rank's factors (micro-steps, batch) to `<output_dir>/bright_rank<R>.pt`."""
        if step == config.train.steps and self.step.factors:
            torch.save(
                torch.stack(self.step.factors).cpu(), Path(config.output_dir) / f"bright_rank{distributed.rank()}.pt"
            )


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [r["step"] for r in read_metrics(out)] if path.exists() else []


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while max(logged_steps(out), default=0) < step:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.05)


def newest_step(out: Path) -> int:
    return int(checkpoint.complete_checkpoints(out)[-1].name.removeprefix("step_"))


@contextmanager
def float64_constants() -> Iterator[None]:
    """A block where tensors made without a dtype (lightly's constants) are float64."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)
