"""The training loop under Accelerate: forward (all hooks), weighted sum, backward, step.

`train()` reads top to bottom: `start()` sets the run up (accelerator, run folder, model,
optimizer, resume point, data), then `steps()` loops over the batches, one `train_step()` each:
forward, the vote, then `update()` (backward, optimizer step) or `skip()`, and after an optimizer
step `finish_step()` (schedule, hooks, log, checkpoint); what happens at a log interval is
`log_interval()`.

Host-device sync points of a step (constants such as normalisation statistics are cached
on the device; `tests/test_gpu_path.py` checks that a step of every built-in plugin makes no
tensor from host data):

1. The vote: one all-reduce ("max") and one read of four scalars per micro-step (marked). It carries
   the loss's finiteness, stop requests, a dead data worker, and whether the previous step left a
   non-finite weight (`nonfinite_flag`, a norm of the weights queued after each step).
2. The log: one all-reduce and one `.tolist()` per `log.every` steps (`RunLogger.interval_record`).
3. fp16 only (DDP on CUDA): the grad scaler reads its inf/NaN flag at every optimizer step.
4. Inside DeepSpeed: ZeRO reads the global gradient norm (its overflow check) per optimizer step.
   (FSDP2's all-gathers and reduce-scatters are collectives queued on the device: no host read.)
5. By request only: preview images (`log.preview_every`), the online k-NN
   (`eval.knn_every`) and checkpoints (`checkpoint.every`; each first agrees that the weights
   are finite: one all-reduce).

Everything else (data cursors, the lr and weight-decay schedules, LARS' trust ratios, BYOL's
momentum, beta warm-up) is host arithmetic or a device op queued without waiting; batches arrive
with `non_blocking` copies from pinned memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, cast

import torch
from accelerate.utils import DistributedType, set_seed

from framework import checkpoint, runfolder
from framework.data.pipeline import DeviceViews, augments_on_device, batch_to_device, clean_x_view, ordered
from framework.data.stream import DataWorkerDied, StreamPosition, batches, check_batch, make_loader
from framework.distributed import (
    activation_checkpointing,
    apply_speed_settings,
    build_accelerator,
    collective,
    fsdp_options,
    global_batch,
    mixed_precision,
    set_threads,
    speed_settings,
    using_deepspeed,
    using_fsdp,
)
from framework.eval.report import online_knn
from framework.logging import RunLogger, logged_lrs
from framework.manager import PluginError, PluginHooks
from framework.model import Model, weighted_total
from framework.optim import build_optimizer, effective_lr, lr_factor
from framework.preemption import Preempted, StopNow, StopRequests
from framework.recipe.schema import Recipe, TeacherConfig, TrainConfig
from framework.schedules import scheduled_values, set_weight_decay
from framework.sharding import (
    Units,
    checkpoint_activations,
    describe,
    find_units,
    local_shard,
    one_rank_group,
    shard,
)
from framework.types import View

if TYPE_CHECKING:
    from accelerate import Accelerator


class TrainingError(RuntimeError):
    """A run that must stop: too many non-finite steps, too many bad records."""


def build_views(recipe: Recipe, hooks: PluginHooks) -> dict[str, View]:
    """The clean view `x` plus every plugin's views; PluginError for a view whose source is no view (e.g. a
    capability naming a view its plugin does not make), checked before the run folder is made."""
    views = {"x": clean_x_view(recipe.data), **hooks.augment(recipe)}
    try:
        ordered(views)
    except ValueError as exc:
        raise PluginError(f"hook 'augment': {exc}") from exc  # a ValueError: one line
    return views


class Vote(NamedTuple):
    """What every rank agrees on before backward."""

    nonfinite: bool  # the loss is non-finite on some rank: every rank skips this micro-step
    signum: int  # some rank was asked to stop: the signal's number (0: none)
    broken: bool  # the previous step left a non-finite weight on some rank: it is not checkpointed
    failed: int  # a rank whose data worker died (-1: none): every rank stops


def vote(accelerator: Accelerator, loss: torch.Tensor | None, signum: int, broken: torch.Tensor, failed: bool) -> Vote:
    """The vote of this rank: its loss (None: it has none), the stop request it holds (0: none), its
    weights' `nonfinite_flag` and whether its data worker died. One all-reduce ("max": Accelerate's
    `reduce` has no "min"; anything but "max" is a sum) and one read of four scalars."""

    def flag(value: float) -> torch.Tensor:
        return torch.full((), float(value), device=accelerator.device)

    nonfinite = flag(0) if loss is None else (~torch.isfinite(loss.detach())).float()
    rank = accelerator.process_index
    flags = torch.stack([nonfinite, flag(signum), broken, flag(rank + 1 if failed else 0)])
    nonfinite_, signum_, broken_, failed_ = accelerator.reduce(flags, "max").tolist()
    return Vote(nonfinite_ > 0, int(signum_), broken_ > 0, int(failed_) - 1)


def nonfinite_flag(model: Model) -> torch.Tensor:
    """1.0 if a weight of `model` is a NaN or an infinity, else 0.0: the total L2 norm of the parameters
    (this rank's partition under ZeRO-3) and floating-point buffers (BatchNorm's statistics), one
    fused read of each, queued without waiting (the next vote reads it). A NaN or inf makes it
    non-finite; finite weights could only past a total norm of 1.8e19 (float32's range), which no
    trainable model reaches. (The exact max-abs norm costs 12x more on a CPU: 68 ms against 5 ms
    for ResNet-50's weights, the AdamW step itself 90 ms.)"""
    params = [held(p) for p in model.parameters()]
    tensors = [t.detach() for t in [*params, *model.buffers()] if t.is_floating_point() and t.numel()]
    return (~torch.isfinite(torch.nn.utils.get_total_norm(tensors, 2.0))).float()


def held(param: torch.nn.Parameter) -> torch.Tensor:
    """The values of `param` this rank holds: all of them, its shard under FSDP2, or under ZeRO-3 its partition
    (`ds_tensor`) less the padding of the last one, which DeepSpeed allocates with `torch.empty` and never writes
    (uninitialised memory may hold NaNs: the check failed a healthy ZeRO-3 run now and then)."""
    part = getattr(param, "ds_tensor", None)
    if part is None:
        return local_shard(param)  # FSDP2: this rank's shard
    start = part.numel() * getattr(param, "ds_zero_partition_rank", 0)
    return part.narrow(0, 0, max(0, min(part.numel(), param.ds_numel - start)))  # type: ignore[attr-defined]


def fetched(loader: Iterable[dict], rank: int) -> Iterator[tuple[dict | None, DataWorkerDied | None]]:
    """The loader's batches, each with None; then, if a data worker of this rank died, a stand-in
    batch with the error: the last batch this rank had (None before a first), for a forward whose
    collectives (DDP's buffer broadcast, a plugin's gather) the other ranks' forwards wait on.

    Each batch is fetched without touching this process's global RNG: starting a DataLoader draws
    its base seed from the global RNG, and with `num_workers=0` the stream reseeds it per sample.
    Either would make a resumed run draw different noise than an uninterrupted one; isolated, the
    RNG state restored from a checkpoint is exactly the one the model would have seen.
    """
    it, last = batches(loader, rank), None
    while True:
        try:
            with torch.random.fork_rng(devices=[]):
                batch = next(it, None)
        except DataWorkerDied as exc:
            yield last, exc
            return
        if batch is None:
            return
        yield (last := batch), None


@dataclass
class Run:
    """A started run: what the loop of `train()` works with."""

    out: Path  # output_dir
    accelerator: Accelerator
    model: Any  # the prepared root module (DDP's or DeepSpeed's wrapper, or the Model itself: one process, FSDP2)
    unwrapped: Model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: Iterable[dict]
    device_views: DeviceViews  # the photometric steps of the views that split, on the device
    logger: RunLogger
    lr: float  # optim.lr after lr_scaling, before the schedule
    step: int
    position: StreamPosition
    channels_last: bool
    deepspeed: bool
    sharded: checkpoint.Sharded | None  # FSDP2: the model and optimizer a checkpoint writes shard by shard
    lock: runfolder.RunLock | None  # rank 0's hold on output_dir, released when the run is dropped
    checkpoint: Path | None  # the newest checkpoint of this run: the one resumed from, then each one written
    keep: Path | None  # the checkpoint an explicit `train.resume` named: never pruned by this run
    saved_step: int  # the step of `checkpoint` (0: none)
    committed: dict  # the data position's state at the last completed step
    broken: torch.Tensor  # `nonfinite_flag` after the last step (on the device; the next vote reads it)
    weights: dict[str, float]  # each plugin's loss weight
    signum: int = 0  # the signal of a voted stop request (0: none)
    micro: int = 0  # micro-steps since the last optimizer step (with `step`, what `device_views` draw)
    bad_in_row: int = 0  # micro-steps skipped in a row (a non-finite loss on some rank)
    skipped: int = 0  # micro-steps and optimizer steps skipped since the start (logged)

    def batch(self, batch: dict[str, Any]) -> tuple[dict, dict, torch.Tensor]:
        """Advance the data position; the batch's views (normalised and their device steps applied on the
        device), params and labels."""
        self.position.update(batch["cursor"])
        views, params, labels = batch_to_device(batch, self.accelerator.device)
        views = self.device_views(views, self.step, self.micro)
        self.micro += 1
        if self.channels_last:
            views = {k: v.contiguous(memory_format=torch.channels_last) for k, v in views.items()}
        return views, params, labels


def where_views_run(device_views: DeviceViews, on_device: bool) -> str:
    """Where the views' photometric steps run, for the start-up line (`data.augment_on`)."""
    if device_views.steps:
        split = len(device_views.steps)
        return f"photometric steps on the device ({split} view{'s' if split > 1 else ''} split)"
    return "photometric steps in the workers" + (" (no view splits)" if on_device else "")


def block_units(recipe: Recipe, hooks: PluginHooks, model: Model, fsdp: bool) -> Units:
    """The blocks the plugins list (`shard_blocks`, asked for only under FSDP2 or activation checkpointing) and
    their holders, each block's activations checkpointed if the recipe says so."""
    checkpointing = activation_checkpointing(recipe.distributed)
    listed = hooks.shard_blocks(recipe, model.plugins) if fsdp or checkpointing else {}
    units = find_units(model, cast(Mapping[str, Mapping[str, torch.nn.Module]], model.plugins), listed, model.encoder)
    if checkpointing:
        checkpoint_activations(units.blocks)
    return units


def start(recipe: Recipe, hooks: PluginHooks) -> Run | None:
    """Set a run up: accelerator, run folder (locked), model, optimizer, resume point, data and logger.
    None when the run folder already holds a run trained to `train.steps`."""
    cfg, out, fsdp = recipe.train, Path(recipe.output_dir), using_fsdp()
    hooks.check_launch(deepspeed=using_deepspeed())  # before anything starts: a hook DeepSpeed cannot call
    trackers: list[str] | None = list(recipe.log.trackers) or None  # accelerate warns at an empty list
    threads = set_threads(recipe.distributed, recipe.data)  # before any torch work: cores minus data workers
    accelerator = build_accelerator(recipe.distributed, recipe.data, recipe.optim, recipe.output_dir, trackers)
    check_batch(recipe.data, accelerator.num_processes)  # a batch the shards cannot fill would never come
    set_seed(cfg.seed)
    model = Model(hooks, recipe)  # before the run folder: a plugin refusing the recipe or a file leaves none
    views = build_views(recipe, hooks)  # so for a view that names no view
    if recipe.distributed.sync_batchnorm and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    sharding = block_units(recipe, hooks, model, fsdp)  # the plugins' blocks; activation checkpointing
    holders = [*model.plugins.values(), *([model.teacher.plugins] if model.teacher is not None else [])]
    units = [module for modules in holders for module in cast(torch.nn.ModuleDict, modules).values()]
    compiled = sharding.blocks if fsdp and sharding.blocks else units  # under FSDP2, block by block
    # channels_last and compile before FSDP2 wraps the units (torchtitan's order: checkpoint, compile, shard)
    speed = apply_speed_settings(model, speed_settings(recipe.distributed, cfg, accelerator.device.type), compiled)
    if fsdp:  # the units, then the root
        precision = mixed_precision(recipe.distributed)
        shard(model, sharding, accelerator.device, precision, fsdp_options(recipe.distributed))
    lock = runfolder.open_run(accelerator, out, cfg.resume)  # rank 0 holds output_dir's lock while the Run lives
    batch = global_batch(recipe.data, recipe.distributed, accelerator.num_processes)
    lr = effective_lr(recipe.optim, batch)
    on_device = augments_on_device(recipe.data.augment_on, accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    device_views = DeviceViews(views, on_device, accelerator.device, cfg.seed, rank, world, recipe.data.batch_size)
    accelerator.print(
        f"augssl: global batch {batch}, lr {lr:g} (optim.lr_scaling={recipe.optim.lr_scaling}), precision "
        f"{mixed_precision(recipe.distributed)}, {' '.join(k for k, on in speed.items() if on) or 'eager'}, "
        f"views: {where_views_run(device_views, on_device)}"
    )
    accelerator.print(threads.line())
    if fsdp:
        checkpointing = activation_checkpointing(recipe.distributed)
        accelerator.print(f"augssl: {describe(sharding, fsdp_options(recipe.distributed), checkpointing)}")
    optimizer = build_optimizer(model, recipe.optim, recipe.plugins, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, recipe.optim, cfg.steps))
    held = None  # FSDP2: what checkpoints write with torch.distributed.checkpoint (else Accelerate saves it all)
    if fsdp:  # sharded: no DDP wrapper (Accelerate still skips the optimizer's step inside an accumulation window)
        prepared, (optimizer, scheduler) = model, accelerator.prepare(optimizer, scheduler)
        held = checkpoint.Sharded(model, getattr(optimizer, "optimizer", optimizer))  # inside Accelerate's wrapper
    else:
        prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = prepared
    while not isinstance(unwrapped, Model):  # DDP's or DeepSpeed's wrapper (unwrap_model imports DeepSpeed)
        unwrapped = unwrapped.module

    step, position = 0, StreamPosition()
    resume_from = runfolder.resume_point(accelerator, recipe, unwrapped, lock)  # intact, compatible; writes recipe.yaml
    if resume_from is not None:
        state, saved_position = checkpoint.load(
            accelerator, resume_from, cfg, recipe.optim, batch, on_device, scheduler, held
        )
        step, position = state["step"], saved_position or StreamPosition()
        accelerator.print(f"augssl: resumed from {resume_from} at step {step}")
    if step >= cfg.steps:
        accelerator.print(f"augssl: {out} is already trained to step {step}")
        return None
    exact = bool(position.workers)  # the checkpoint says where every data worker stood
    loader = make_loader(
        recipe.data,
        views,
        rank=rank,
        world_size=world,
        seed=cfg.seed if exact or step == 0 else cfg.seed + step,
        resume=position if exact else None,
        pin_memory=accelerator.device.type == "cuda",
        augment_on_device=on_device,
    )
    accelerator.init_trackers("augssl", config={"recipe": str(out / "recipe.yaml")})
    logger = RunLogger(accelerator, out, cfg.steps, step)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    explicit = cfg.resume not in ("auto", "never", "fresh")
    return Run(
        out,
        accelerator,
        prepared,
        unwrapped,
        optimizer,
        scheduler,
        loader,
        device_views,
        logger,
        lr,
        step,
        position,
        speed["channels_last"],
        deepspeed,
        held,
        lock,
        checkpoint=resume_from,
        keep=resume_from if explicit else None,
        saved_step=step,
        committed=position.state_dict(),
        broken=torch.zeros((), device=accelerator.device),
        weights=unwrapped.weights(),
    )


def log_interval(run: Run, recipe: Recipe) -> None:
    """Log the interval's means over ranks and micro-steps, the lrs and the counters; stop the run
    (TrainingError) when more than `data.max_bad_fraction` of the records seen so far were bad."""
    with collective(f"step {run.step}: the log reduction"):
        record = run.logger.interval_record(run.position)
    lr_now = run.lr * lr_factor(run.step, recipe.optim, recipe.train.steps)
    record.update(
        {
            "epoch": run.position.epoch,
            **logged_lrs(recipe.plugins, run.optimizer, run.scheduler, lr_now),
            # wd and plugins' Scheduled fields, for the next step
            **scheduled_values(recipe.optim, recipe.plugins, run.step, recipe.train.steps, teacher(run, recipe)),
            "skipped_steps": run.skipped,
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


def teacher(run: Run, recipe: Recipe) -> TeacherConfig | None:
    """The recipe's `teacher:` section when the run has a teacher (its momentum is logged), else None."""
    return recipe.teacher if run.unwrapped.teacher is not None else None


def due(every: int, step: int) -> bool:
    """Whether a `*_every` action falls on `step` (0: never)."""
    return every > 0 and step % every == 0


def last_good(run: Run) -> Path | str | None:
    """The newest checkpoint that is intact and whose weights are finite (read back on rank 0, which says it)."""
    return checkpoint.last_good(run.out) if run.accelerator.is_main_process else "(rank 0 names it)"


def broken_weights(run: Run) -> TrainingError:
    """The error of a step that left a non-finite weight, naming the first such tensor this rank holds."""
    named = [*run.unwrapped.named_parameters(), *run.unwrapped.named_buffers()]
    name = next((n for n, t in named if t.is_floating_point() and not torch.isfinite(local_shard(t)).all()), "a weight")
    return TrainingError(
        f"step {run.step} left {name} non-finite (non-finite gradients, or an optim.lr / weight_decay too large "
        f"for its dtype): it is not checkpointed; last good checkpoint: {last_good(run)}"
    )


def commit(run: Run, recipe: Recipe, position: StreamPosition) -> Path:
    """Checkpoint the last completed step, once every rank agrees its weights are finite (else
    TrainingError: a step that left a non-finite weight is never checkpointed)."""
    with collective(f"step {run.step}: the checkpoint"):
        broken = run.accelerator.reduce(run.broken, "max").item()  # sync point: one per checkpoint
    if broken:
        raise broken_weights(run)
    with collective(f"step {run.step}: the checkpoint"):
        saved = checkpoint.save(run.accelerator, recipe, run.step, position, keep=run.keep, sharded=run.sharded)
        run.checkpoint = saved
    run.saved_step = run.step
    return run.checkpoint


def data_worker_died(run: Run, recipe: Recipe, voted: Vote, lost: DataWorkerDied | None) -> NoReturn:
    """A data worker of rank `voted.failed` died (`lost` on that rank): every rank checkpoints the last
    completed step, unless it is already, and stops with that rank's line (TrainingError)."""
    if voted.broken:
        raise broken_weights(run)
    if run.step > run.saved_step:
        commit(run, recipe, StreamPosition.from_state_dict(run.committed))
    error = [str(lost) if lost else None]
    if run.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        with collective(f"step {run.step + 1}: the data worker's error"):
            broadcast_object_list(error, from_process=voted.failed)
    where = f"checkpoint {run.checkpoint} holds step {run.step} (train.resume: auto continues from it)"
    raise TrainingError(f"{error[0]}; " + (where if run.checkpoint else "no checkpoint yet"))


def gradients_ready(run: Run, recipe: Recipe, hooks: PluginHooks) -> None:
    """At an optimizer step, after backward: the gradients, unscaled (fp16's loss scale; else a no-op), go to
    `on_after_backward`, then are clipped to `distributed.grad_clip`. Under DeepSpeed backward has stepped
    already (DeepSpeed clips; `PluginHooks.check_launch` refused the hook): Accelerate reads the norm."""
    clip, parameters = recipe.distributed.grad_clip, run.model.parameters()
    if run.deepspeed:
        if clip is not None:
            run.accelerator.clip_grad_norm_(parameters, clip)
        return
    run.accelerator.unscale_gradients()  # once: Accelerate's clip_grad_norm_ would unscale a second time
    with torch.no_grad():
        hooks.on_after_backward(run.unwrapped.plugins, run.step, recipe, run.unwrapped.encoder)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(parameters, clip)


def skip(run: Run, cfg: TrainConfig, loss: torch.Tensor) -> None:
    """A micro-step whose loss is non-finite on some rank: every rank skips it (counted), and drops the
    window's gradients; TrainingError after `train.max_bad_steps` in a row."""
    run.bad_in_row, run.skipped = run.bad_in_row + 1, run.skipped + 1
    if run.deepspeed and run.accelerator.sync_gradients:  # DeepSpeed drops a window with non-finite grads
        run.accelerator.backward(loss * math.nan)
    run.optimizer.zero_grad(set_to_none=True)  # DDP: drops the window on its last micro-step
    if run.bad_in_row >= cfg.max_bad_steps:
        raise TrainingError(
            f"{run.bad_in_row} non-finite losses in a row at step {run.step}; last good checkpoint: {last_good(run)}"
        )


def update(run: Run, recipe: Recipe, hooks: PluginHooks, loss: torch.Tensor) -> None:
    """Backward (the gradient all-reduce), and at an optimizer step the gradients' hook and clip, then the
    weight decay (the recipe's, or its cosine to optim.weight_decay_end) and the step."""
    run.bad_in_row = 0
    with collective(f"step {run.step + 1}: the gradient all-reduce"):
        run.accelerator.backward(loss)
    if run.accelerator.sync_gradients:  # the step's reduced gradients: on_after_backward, then the clip
        gradients_ready(run, recipe, hooks)
    set_weight_decay(run.optimizer, recipe.optim, run.step, recipe.train.steps)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.skipped += run.accelerator.sync_gradients and run.accelerator.optimizer_step_was_skipped  # fp16 scaler


def finish_step(run: Run, recipe: Recipe, hooks: PluginHooks, preview: dict[str, torch.Tensor] | None) -> bool:
    """After an optimizer step: the schedule, the step-end hooks, the weights' finiteness flag, then what
    falls on this step (preview, log, online k-NN, checkpoint). Returns whether the run ends here."""
    run.step, run.micro = run.step + 1, 0
    run.scheduler.step()
    with torch.no_grad():
        if run.unwrapped.teacher is not None:  # the EMA after optimizer step k reads the momentum of step k - 1
            run.unwrapped.teacher.update(
                run.unwrapped.plugins, recipe.teacher.momentum.at(run.step - 1, recipe.train.steps)
            )
        hooks.on_train_step_end(run.unwrapped.plugins, run.step, recipe, run.unwrapped.encoder)
        run.broken = nonfinite_flag(run.unwrapped)  # the update's and the hooks' changes
    run.committed = run.position.state_dict()
    run.logger.advance()
    if preview is not None:
        run.logger.preview(run.step, {**preview, **run.unwrapped.preview_images}, recipe.data.mean, recipe.data.std)
    last = run.step >= recipe.train.steps or bool(run.signum)
    if due(recipe.log.every, run.step) or last:
        log_interval(run, recipe)
    if due(recipe.eval.knn_every, run.step):
        with collective(f"step {run.step}: the online k-NN"):  # every rank extracts a share
            run.logger.log(run.step, online_knn(run.unwrapped, recipe.data, recipe.eval))
    if due(recipe.checkpoint.every, run.step) or last:
        commit(run, recipe, run.position)
    return last


def train_step(
    run: Run, recipe: Recipe, hooks: PluginHooks, stop: StopRequests, batch: dict | None, lost: DataWorkerDied | None
) -> bool:
    """One micro-step on `batch` (`lost`: this rank's data worker died): forward, the vote, backward and, at
    the end of an accumulation window, the optimizer step and what follows it. Returns whether the run ends."""
    accelerator = run.accelerator
    if batch is None:  # before this rank had a batch: nothing to forward
        with collective(f"step {run.step + 1}: the non-finite/stop vote"):
            voted = vote(accelerator, None, stop.signum, run.broken, True)
        data_worker_died(run, recipe, voted, lost)
    views, params, labels = run.batch(batch)
    preview = due(recipe.log.preview_every, run.step + 1)
    with accelerator.accumulate(run.model):
        terms, metrics = run.model(views, params, labels, step=run.step, preview=preview)
        loss = weighted_total(terms, run.weights)
        with collective(f"step {run.step + 1}: the non-finite/stop vote"):  # sync point: one per micro-step
            voted = vote(accelerator, loss, stop.signum, run.broken, lost is not None)
        stop.defer()  # from now on a stop request finishes the step in progress
        if voted.failed >= 0:  # a data worker died (on its rank this forward ran on a stand-in)
            data_worker_died(run, recipe, voted, lost)
        if voted.broken:  # the previous step left a non-finite weight: it is never checkpointed
            raise broken_weights(run)
        run.signum = run.signum or voted.signum
        if voted.nonfinite:  # on some rank: every rank skips this micro-step
            skip(run, recipe.train, loss)
            return False
        update(run, recipe, hooks, loss)
    run.logger.accumulate({"loss": loss, **terms, **metrics})  # skipped micro-steps are not summed
    run.logger.count_images(len(batch["key"]))
    if not accelerator.sync_gradients:
        return False  # a micro-step of gradient accumulation
    return finish_step(run, recipe, hooks, views if preview else None)


def steps(run: Run, recipe: Recipe, hooks: PluginHooks, stop: StopRequests) -> int:
    """Train until `train.steps` or a voted stop; returns the stop's signal (0: none). The steps
    end early with TrainingError (non-finite losses in a row or weights, a dead data worker, bad
    records); from the first vote on, a stop request waits for the vote (before it: `StopNow`)."""
    run.model.train()
    with torch.no_grad():
        if run.unwrapped.teacher is not None:  # a fresh run's teacher starts as the online network
            run.unwrapped.teacher.initialise(run.unwrapped.plugins)
        hooks.on_train_start(run.unwrapped.plugins, run.step, recipe, run.unwrapped.encoder)
    for batch, lost in fetched(run.loader, run.accelerator.process_index):  # lost: a data worker died
        if train_step(run, recipe, hooks, stop, batch, lost):
            break
    return run.signum


def train(recipe: Recipe, hooks: PluginHooks) -> Path:
    """Pretrain as the recipe says; returns the output folder. Resumes per `train.resume`."""
    out, run = Path(recipe.output_dir), None
    # SIGTERM/SIGINT/SIGUSR1: finish this step, checkpoint it, stop; FSDP2 on one process needs a group of one
    with StopRequests() as stop, one_rank_group(using_fsdp()):
        try:
            if (run := start(recipe, hooks)) is None:
                return out
            signum = steps(run, recipe, hooks, stop)
            run.logger.close()
            run.accelerator.end_training()
        except StopNow as exc:  # before the first vote, or a second request: where the process is
            when = f"at once on a second request (at step {run.step})" if run and stop.at_once else None
            newest = checkpoint.find_resume(out, "auto")
            raise Preempted(exc.signum, when or "before the first step", str(newest) if newest else None) from None
    if signum and run.step < recipe.train.steps:
        raise Preempted(signum, f"after step {run.step}", str(run.checkpoint))
    return out
