"""The training loop under Accelerate: forward (all hooks), weighted sum, backward, step.

`train()` reads top to bottom: set-up, then one loop whose body is the step.

Host-device sync points of a step (constants such as normalisation statistics are cached
on the device; `tests/test_gpu_path.py` checks that a step of every built-in plugin makes no
tensor from host data):

1. The non-finite vote: one all-reduce ("max") and one scalar read per micro-step (marked).
2. The log: one all-reduce and one `.tolist()` per `train.log_every` steps (`RunLogger.interval_record`).
3. fp16 only (DDP on CUDA): the grad scaler reads its inf/NaN flag at every optimizer step.
4. Inside DeepSpeed: ZeRO reads the global gradient norm (its overflow check) per optimizer step.
5. By request only: preview images (`train.preview_every`), the online k-NN
   (`eval.knn_every`) and checkpoints (`train.checkpoint_every`).

Everything else (data cursors, the lr schedule, BYOL's momentum, beta warm-up) is host
arithmetic or a device op queued without waiting; batches arrive with `non_blocking` copies
from pinned memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate.utils import DistributedType, set_seed

from framework import checkpoint, runfolder
from framework.data.pipeline import batch_to_device, clean_x_view
from framework.data.stream import StreamPosition, make_loader
from framework.distributed import (
    apply_speed_settings,
    build_accelerator,
    collective,
    mixed_precision,
    speed_settings,
)
from framework.eval.report import online_knn
from framework.logging import RunLogger, logged_lrs
from framework.manager import PluginHooks
from framework.model import Model, weighted_total
from framework.preemption import Preempted, StopRequests
from framework.recipe.schema import Recipe, TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator


class TrainingError(RuntimeError):
    """A run that must stop: too many non-finite steps, too many bad records."""


def effective_lr(cfg: TrainConfig, global_batch: int) -> float:
    """`train.lr`, or with `train.lr_scaling: linear` lr x global_batch / 256."""
    return cfg.lr * global_batch / 256 if cfg.lr_scaling == "linear" else cfg.lr


def build_optimizer(model: Model, recipe: Recipe, lr: float | None = None) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters, at `lr` (default `train.lr`).

    One param group per plugin: a plugin's `lr` (e.g. the online probe's) is scaled by the
    same factor as `train.lr` (`lr / train.lr`), so `train.lr_scaling` moves every group alike.
    """
    cfg = recipe.train
    lr = cfg.lr if lr is None else lr
    groups = []
    for name, modules in model.plugins.items():
        own = getattr(recipe.plugins.get(name), "lr", None)
        params = [p for p in modules.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr if own is None else own * lr / cfg.lr, "plugin": name})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then constant or cosine to 0 at `steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_views(recipe: Recipe, hooks: PluginHooks) -> dict:
    """The clean view `x` plus every plugin's views."""
    return {"x": clean_x_view(recipe.data), **hooks.augment(recipe)}


def vote(accelerator: Accelerator, loss: torch.Tensor, signum: int) -> tuple[bool, int]:
    """What every rank must agree on before backward: is the loss non-finite on any rank, and has any
    rank been asked to stop (the signal's number, 0 for none). One all-reduce ("max": Accelerate's
    `reduce` has no "min"; anything but "max" is a sum) and one read of two scalars."""
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(), torch.full((), float(signum), device=loss.device)])
    nonfinite, signalled = accelerator.reduce(flags, "max").tolist()
    return nonfinite > 0, int(signalled)


def rng_isolated(batches: Iterable[dict]) -> Iterator[dict]:
    """The loader's batches, fetched without touching this process's global RNG.

    Starting a DataLoader draws its base seed from the global RNG, and with
    `num_workers=0` the stream reseeds it per sample. Either would make a resumed run
    draw different noise than an uninterrupted one; isolated, the RNG state restored
    from a checkpoint is exactly the one the model would have seen.
    """
    it = iter(batches)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(it, None)
        if batch is None:
            return
        yield batch


def train(recipe: Recipe, hooks: PluginHooks) -> Path:
    """Pretrain as the recipe says; returns the output folder. Resumes per `train.resume`."""
    cfg, out = recipe.train, Path(recipe.output_dir)
    accelerator = build_accelerator(recipe, log_with=list(cfg.log_with))
    lock = runfolder.open_run(accelerator, recipe)  # rank 0 holds output_dir's lock until train() returns
    set_seed(cfg.seed)
    model = Model(hooks, recipe)
    if recipe.distributed.sync_batchnorm and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    units = [module for modules in model.plugins.values() for module in modules.values()]
    speed = apply_speed_settings(model, speed_settings(recipe, accelerator.device.type), units)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    global_batch = recipe.data.batch_size * accelerator.num_processes * recipe.distributed.accumulation_steps
    lr = effective_lr(cfg, global_batch)
    accelerator.print(f"augssl: global batch {global_batch}, lr {lr:g} (train.lr_scaling={cfg.lr_scaling}), "
                      f"precision {mixed_precision(recipe)}, {' '.join(k for k, on in speed.items() if on) or 'eager'}")  # fmt: skip
    optimizer = build_optimizer(model, recipe, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = model
    while not isinstance(unwrapped, Model):  # DDP's or DeepSpeed's wrapper (unwrap_model imports DeepSpeed)
        unwrapped = unwrapped.module
    plugin_modules, weights = unwrapped.plugins, unwrapped.weights()

    step, position = 0, StreamPosition()
    resume_from = runfolder.resume_point(accelerator, recipe, unwrapped, lock)  # intact, compatible; writes recipe.yaml
    if resume_from is not None:
        state, saved_position = checkpoint.load(accelerator, resume_from, recipe, scheduler)
        step, position = state["step"], saved_position or StreamPosition()
        accelerator.print(f"augssl: resumed from {resume_from} at step {step}")
    if step >= cfg.steps:
        accelerator.print(f"augssl: {out} is already trained to step {step}")
        return out
    data_seed = cfg.seed if (saved_exact := bool(position.workers)) or step == 0 else cfg.seed + step
    loader = make_loader(
        recipe.data, build_views(recipe, hooks), rank=accelerator.process_index,
        world_size=accelerator.num_processes, seed=data_seed, resume=position if saved_exact else None,
        pin_memory=accelerator.device.type == "cuda",
    )
    accelerator.init_trackers("augssl", config={"recipe": str(out / "recipe.yaml")})
    logger = RunLogger(accelerator, out, cfg.steps, step)
    bad_in_row = skipped = 0

    model.train()
    signum, saved = 0, None
    with StopRequests() as stop:  # SIGTERM/SIGINT/SIGUSR1: finish this step, checkpoint it, stop
        for batch in rng_isolated(loader):
            position.update(batch["cursor"])
            views, params, labels = batch_to_device(batch, accelerator.device)  # uint8 views normalised on device
            if speed["channels_last"]:
                views = {k: v.contiguous(memory_format=torch.channels_last) for k, v in views.items()}
            preview = cfg.preview_every > 0 and (step + 1) % cfg.preview_every == 0
            with accelerator.accumulate(model):
                terms, metrics = model(views, params, labels, step=step, preview=preview)
                loss = weighted_total(terms, weights)
                with collective(f"step {step + 1}: the non-finite/stop vote"):  # sync point: one per micro-step
                    nonfinite, signalled = vote(accelerator, loss, stop.signum)
                signum = signum or signalled
                if nonfinite:  # on some rank: every rank skips this micro-step
                    bad_in_row, skipped = bad_in_row + 1, skipped + 1
                    if deepspeed and accelerator.sync_gradients:  # DeepSpeed drops a window with non-finite grads
                        accelerator.backward(loss * math.nan)
                    optimizer.zero_grad(set_to_none=True)  # DDP: drops the window on its last micro-step
                    if bad_in_row >= cfg.max_bad_steps:
                        raise TrainingError(f"{bad_in_row} non-finite losses in a row at step {step}; "
                                            f"last good checkpoint: {checkpoint.find_resume(out, 'auto')}")  # fmt: skip
                    continue
                bad_in_row = 0
                with collective(f"step {step + 1}: the gradient all-reduce"):
                    accelerator.backward(loss)
                if accelerator.sync_gradients and recipe.distributed.grad_clip is not None:
                    accelerator.clip_grad_norm_(model.parameters(), recipe.distributed.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                skipped += accelerator.sync_gradients and accelerator.optimizer_step_was_skipped  # fp16 loss scaler
            logger.accumulate({"loss": loss, **terms, **metrics})  # skipped micro-steps are not summed
            logger.count_images(len(batch["key"]))
            if not accelerator.sync_gradients:
                continue  # a micro-step of gradient accumulation

            step += 1
            scheduler.step()
            with torch.no_grad():
                hooks.on_train_step_end(plugin_modules, step, recipe, unwrapped.encoder)
            logger.advance()
            if preview:
                logger.preview(step, {**views, **unwrapped.preview_images}, recipe.data.mean, recipe.data.std)
            if step % cfg.log_every == 0 or step == cfg.steps or signum:
                with collective(f"step {step}: the log reduction"):
                    record = logger.interval_record(position)
                record.update({"epoch": position.epoch, **logged_lrs(recipe, optimizer, scheduler, lr * lr_factor(step, cfg)),
                               "skipped_steps": skipped, "images/s": logger.images_per_second()})  # fmt: skip
                if accelerator.device.type == "cuda":
                    record["memory/peak_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
                logger.log(step, record)
                if record["data.seen"] and record["data.bad_records"] / record["data.seen"] > recipe.data.max_bad_fraction:
                    raise TrainingError(f"data: {int(record['data.bad_records'])} of {int(record['data.seen'])} records "
                                        f"were bad (> data.max_bad_fraction={recipe.data.max_bad_fraction}); "
                                        f"last: {position.last_bad}")  # fmt: skip
            if recipe.eval.knn_every and step % recipe.eval.knn_every == 0:
                with collective(f"step {step}: the online k-NN"):  # every rank extracts a share
                    logger.log(step, online_knn(unwrapped, recipe))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or signum:
                with collective(f"step {step}: the checkpoint"):
                    saved = checkpoint.save(accelerator, recipe, step, position)
            if step >= cfg.steps or signum:
                break

    logger.close()
    accelerator.end_training()
    if signum and step < cfg.steps:
        raise Preempted(signum, step, str(saved))
    return out
