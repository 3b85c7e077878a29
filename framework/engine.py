"""The training loop under Accelerate: forward (all hooks), weighted sum, backward, step.

`train()` reads top to bottom: `start()` sets the run up (accelerator, run folder, model,
optimizer, resume point, data), then one loop whose body is the step; what happens at a log
interval is `log_interval()`.

Host-device sync points of a step (constants such as normalisation statistics are cached
on the device; `tests/test_gpu_path.py` checks that a step of every built-in plugin makes no
tensor from host data):

1. The non-finite vote: one all-reduce ("max") and one scalar read per micro-step (marked).
2. The log: one all-reduce and one `.tolist()` per `train.log_every` steps (`RunLogger.interval_record`).
3. fp16 only (DDP on CUDA): the grad scaler reads its inf/NaN flag at every optimizer step.
4. Inside DeepSpeed: ZeRO reads the global gradient norm (its overflow check) per optimizer step.
5. By request only: preview images (`train.preview_every`), the online k-NN
   (`eval.knn_every`) and checkpoints (`train.checkpoint_every`).

Everything else (data cursors, the lr and weight-decay schedules, LARS' trust ratios, BYOL's
momentum, beta warm-up) is host arithmetic or a device op queued without waiting; batches arrive
with `non_blocking` copies from pinned memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

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
from framework.optim import build_optimizer, effective_lr, lr_factor
from framework.preemption import Preempted, StopRequests
from framework.recipe.schema import Recipe
from framework.schedules import scheduled_values, set_weight_decay
from framework.types import View

if TYPE_CHECKING:
    from accelerate import Accelerator


class TrainingError(RuntimeError):
    """A run that must stop: too many non-finite steps, too many bad records."""


def build_views(recipe: Recipe, hooks: PluginHooks) -> dict[str, View]:
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


@dataclass
class Run:
    """A started run: what the loop of `train()` works with."""

    accelerator: Accelerator
    model: Any  # the prepared root module (DDP's or DeepSpeed's wrapper, or the Model itself)
    unwrapped: Model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: Iterable[dict]
    logger: RunLogger
    lr: float  # train.lr after lr_scaling, before the schedule
    step: int
    position: StreamPosition
    channels_last: bool
    deepspeed: bool
    lock: runfolder.RunLock | None  # rank 0's hold on output_dir, released when the run is dropped

    def batch(self, batch: dict[str, Any]) -> tuple[dict, dict, torch.Tensor]:
        """Advance the data position; the batch's views (normalised on the device), params and labels."""
        self.position.update(batch["cursor"])
        views, params, labels = batch_to_device(batch, self.accelerator.device)
        if self.channels_last:
            views = {k: v.contiguous(memory_format=torch.channels_last) for k, v in views.items()}
        return views, params, labels


def start(recipe: Recipe, hooks: PluginHooks) -> Run | None:
    """Set a run up: accelerator, run folder (locked), model, optimizer, resume point, data and logger.
    None when the run folder already holds a run trained to `train.steps`."""
    cfg, out = recipe.train, Path(recipe.output_dir)
    accelerator = build_accelerator(recipe, log_with=list(cfg.log_with) or None)  # accelerate warns at an empty list
    set_seed(cfg.seed)
    model = Model(hooks, recipe)  # before the run folder: a plugin refusing the recipe or a file leaves none
    lock = runfolder.open_run(accelerator, recipe)  # rank 0 holds output_dir's lock while the Run lives
    if recipe.distributed.sync_batchnorm and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    units = [module for modules in model.plugins.values() for module in cast(torch.nn.ModuleDict, modules).values()]
    speed = apply_speed_settings(model, speed_settings(recipe, accelerator.device.type), units)
    global_batch = recipe.data.batch_size * accelerator.num_processes * recipe.distributed.accumulation_steps
    lr = effective_lr(cfg, global_batch)
    accelerator.print(
        f"augssl: global batch {global_batch}, lr {lr:g} (train.lr_scaling={cfg.lr_scaling}), "
        f"precision {mixed_precision(recipe)}, {' '.join(k for k, on in speed.items() if on) or 'eager'}"
    )
    optimizer = build_optimizer(model, recipe, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = prepared
    while not isinstance(unwrapped, Model):  # DDP's or DeepSpeed's wrapper (unwrap_model imports DeepSpeed)
        unwrapped = unwrapped.module

    step, position = 0, StreamPosition()
    resume_from = runfolder.resume_point(accelerator, recipe, unwrapped, lock)  # intact, compatible; writes recipe.yaml
    if resume_from is not None:
        state, saved_position = checkpoint.load(accelerator, resume_from, recipe, scheduler)
        step, position = state["step"], saved_position or StreamPosition()
        accelerator.print(f"augssl: resumed from {resume_from} at step {step}")
    if step >= cfg.steps:
        accelerator.print(f"augssl: {out} is already trained to step {step}")
        return None
    exact = bool(position.workers)  # the checkpoint says where every data worker stood
    loader = make_loader(
        recipe.data,
        build_views(recipe, hooks),
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.seed if exact or step == 0 else cfg.seed + step,
        resume=position if exact else None,
        pin_memory=accelerator.device.type == "cuda",
    )
    accelerator.init_trackers("augssl", config={"recipe": str(out / "recipe.yaml")})
    logger = RunLogger(accelerator, out, cfg.steps, step)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    return Run(
        accelerator,
        prepared,
        unwrapped,
        optimizer,
        scheduler,
        loader,
        logger,
        lr,
        step,
        position,
        speed["channels_last"],
        deepspeed,
        lock,
    )


def log_interval(run: Run, recipe: Recipe, skipped: int) -> None:
    """Log the interval's means over ranks and micro-steps, the lrs and the counters; stop the run
    (TrainingError) when more than `data.max_bad_fraction` of the records seen so far were bad."""
    with collective(f"step {run.step}: the log reduction"):
        record = run.logger.interval_record(run.position)
    lr_now = run.lr * lr_factor(run.step, recipe.train)
    record.update(
        {
            "epoch": run.position.epoch,
            **logged_lrs(recipe, run.optimizer, run.scheduler, lr_now),
            **scheduled_values(recipe, run.step),  # wd and plugins' Scheduled fields, for the next step
            "skipped_steps": skipped,
            "images/s": run.logger.images_per_second(),
        }
    )
    if run.accelerator.device.type == "cuda":
        record["memory/peak_gib"] = torch.cuda.max_memory_allocated(run.accelerator.device) / 2**30
    run.logger.log(run.step, record)
    bad, seen, limit = record["data.bad_records"], record["data.seen"], recipe.data.max_bad_fraction
    if seen and bad / seen > limit:
        raise TrainingError(
            f"data: {int(bad)} of {int(seen)} records were bad (> data.max_bad_fraction={limit}); "
            f"last: {run.position.last_bad}"
        )


def due(every: int, step: int) -> bool:
    """Whether a `*_every` action falls on `step` (0: never)."""
    return every > 0 and step % every == 0


def train(recipe: Recipe, hooks: PluginHooks) -> Path:
    """Pretrain as the recipe says; returns the output folder. Resumes per `train.resume`."""
    cfg, out = recipe.train, Path(recipe.output_dir)
    if (run := start(recipe, hooks)) is None:
        return out
    accelerator, model, optimizer, logger = run.accelerator, run.model, run.optimizer, run.logger
    weights, signum, saved, bad_in_row, skipped = run.unwrapped.weights(), 0, None, 0, 0
    model.train()
    with StopRequests() as stop:  # SIGTERM/SIGINT/SIGUSR1: finish this step, checkpoint it, stop
        for batch in rng_isolated(run.loader):
            views, params, labels = run.batch(batch)
            preview = due(cfg.preview_every, run.step + 1)
            with accelerator.accumulate(model):
                terms, metrics = model(views, params, labels, step=run.step, preview=preview)
                loss = weighted_total(terms, weights)
                with collective(f"step {run.step + 1}: the non-finite/stop vote"):  # sync point: one per micro-step
                    nonfinite, signalled = vote(accelerator, loss, stop.signum)
                signum = signum or signalled
                if nonfinite:  # on some rank: every rank skips this micro-step
                    bad_in_row, skipped = bad_in_row + 1, skipped + 1
                    if run.deepspeed and accelerator.sync_gradients:  # DeepSpeed drops a window with non-finite grads
                        accelerator.backward(loss * math.nan)
                    optimizer.zero_grad(set_to_none=True)  # DDP: drops the window on its last micro-step
                    if bad_in_row >= cfg.max_bad_steps:
                        raise TrainingError(
                            f"{bad_in_row} non-finite losses in a row at step {run.step}; "
                            f"last good checkpoint: {checkpoint.find_resume(out, 'auto')}"
                        )
                    continue
                bad_in_row = 0
                with collective(f"step {run.step + 1}: the gradient all-reduce"):
                    accelerator.backward(loss)
                if accelerator.sync_gradients and recipe.distributed.grad_clip is not None:
                    accelerator.clip_grad_norm_(model.parameters(), recipe.distributed.grad_clip)
                set_weight_decay(optimizer, cfg, run.step)  # the recipe's, or its cosine to train.weight_decay_end
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                skipped += accelerator.sync_gradients and accelerator.optimizer_step_was_skipped  # fp16 loss scaler
            logger.accumulate({"loss": loss, **terms, **metrics})  # skipped micro-steps are not summed
            logger.count_images(len(batch["key"]))
            if not accelerator.sync_gradients:
                continue  # a micro-step of gradient accumulation

            run.step += 1
            run.scheduler.step()
            with torch.no_grad():
                hooks.on_train_step_end(run.unwrapped.plugins, run.step, recipe, run.unwrapped.encoder)
            logger.advance()
            if preview:
                logger.preview(run.step, {**views, **run.unwrapped.preview_images}, recipe.data.mean, recipe.data.std)
            last = run.step >= cfg.steps or bool(signum)
            if due(cfg.log_every, run.step) or last:
                log_interval(run, recipe, skipped)
            if due(recipe.eval.knn_every, run.step):
                with collective(f"step {run.step}: the online k-NN"):  # every rank extracts a share
                    logger.log(run.step, online_knn(run.unwrapped, recipe))
            if due(cfg.checkpoint_every, run.step) or last:
                with collective(f"step {run.step}: the checkpoint"):
                    saved = checkpoint.save(accelerator, recipe, run.step, run.position)
            if last:
                break

    logger.close()
    accelerator.end_training()
    if signum and run.step < cfg.steps:
        raise Preempted(signum, run.step, str(saved))
    return out
