"""The recipe's schema: the engine's sections (data, train, optim, log, checkpoint, distributed, eval) and the
whole `Recipe`.

Pure data and validation: this module knows no plugin, process or file (loading a recipe from
YAML is `framework.recipe.loading`). Each plugin's own section is its `PluginConfig` subclass.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

# The top-level keys of a DeepSpeed 0.19 config (https://www.deepspeed.ai/docs/config-json/ and
# deepspeed/runtime/config.py); DeepSpeed itself ignores any other key, so a misspelt one would pass.
DEEPSPEED_KEYS = frozenset(
    """
    train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler fp16 bf16
    torch_autocast amp gradient_clipping prescale_gradients gradient_predivide_factor sparse_gradients
    zero_optimization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer steps_per_print
    wall_clock_breakdown dump_state flops_profiler activation_checkpointing sparse_attention data_efficiency
    curriculum_learning tensorboard wandb csv_monitor comet elasticity communication_data_type
    seq_parallel_communication_data_type aio compression_training checkpoint data_types memory_breakdown
    comms_logger autotuning pipeline graph_harvesting compile timers nebula disable_allgather
    dataloader_drop_last gradient_allreduce_op use_data_before_expert_parallelism zenflow tensor_parallel
    weight_quantization hybrid_engine eigenvalue progressive_layer_drop quantize_training mics_shard_size
    mics_hierarchical_params_gather managed_gradient_accumulation disable_python_gc log_level vocabulary_size
""".split()
)


def check_deepspeed_section(section: Mapping[str, Any]) -> None:
    """ValueError naming the first key of `distributed.deepspeed` DeepSpeed does not know: a top-level key
    not in DEEPSPEED_KEYS, or anything `zero_optimization`'s own schema (DeepSpeedZeroConfig) refuses."""
    unknown = sorted(set(section) - DEEPSPEED_KEYS)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a DeepSpeed config key")
    if "zero_optimization" in section:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        try:
            DeepSpeedZeroConfig(**section["zero_optimization"])
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(f"zero_optimization.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


# Every section's config, and that of the models nested in one: unknown keys are errors, and a float
# must be finite (`.inf`, `.nan`, `1e999` or "inf" as a learning rate, weight decay or clip is a typo).
SECTION_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)

# Declared on a field (`Field(..., json_schema_extra=MAY_CHANGE_ON_RESUME)`): its value may differ between a
# checkpoint's recipe.yaml and the recipe that resumes it; on a section, every key in it may. Every other key
# must be equal (framework.runfolder.check_compatible), because the checkpoint's state depends on it: the
# modules (plugin sections of plugins that hold modules: encoder, latent_dim, ...), the data stream the saved
# cursor replays (image_size, channels, num_workers, shuffle_buffer, batch_size, seed, ...) and the optimizer
# whose state is restored (optimizer, betas, momentum: a restored optimizer keeps the saved ones). Plugins
# that hold no modules (loss terms such as `kl`) may be added, removed or changed whatever their fields say.
MAY_CHANGE_ON_RESUME: dict[str, Any] = {"resume": "may_change"}


def may_change_on_resume(section: BaseModel, prefix: str = "") -> list[str]:
    """The dotted keys (under `prefix`) of the fields of `section`, of the sections nested in it and of the
    plugin sections of a `plugins` mapping, that declare MAY_CHANGE_ON_RESUME."""
    keys = []
    for name, info in type(section).model_fields.items():
        key, value = prefix + (info.alias or name), getattr(section, name)
        if info.json_schema_extra == MAY_CHANGE_ON_RESUME:
            keys.append(key)
        elif isinstance(value, BaseModel):
            keys += may_change_on_resume(value, f"{key}.")
        elif isinstance(value, dict):
            for sub, cfg in value.items():
                if isinstance(cfg, BaseModel):
                    keys += may_change_on_resume(cfg, f"{key}.{sub}.")
    return keys


class Strict(BaseModel):
    """A recipe section: unknown keys and non-finite numbers are errors, values are validated on assignment."""

    model_config = ConfigDict(**SECTION_CONFIG, validate_assignment=True, frozen=False)


P = TypeVar("P", bound=type)
# Each capability (a Protocol) and its own check of a declaration beyond the members' types (None: none).
CAPABILITIES: dict[type, Callable[[type], str | None] | None] = {}


def capability(check: Callable[[type], str | None] | None = None) -> Callable[[P], P]:
    """Declare a `typing.Protocol` a capability a plugin's section may have (e.g. "makes augmented views").

    The protocol becomes runtime-checkable, so another plugin asks `isinstance(section, TheProtocol)` or
    `Recipe.providers(TheProtocol)`. A section whose class has any member of the protocol claims it, and is
    checked when the recipe is validated: it must have every member, each a value of the annotated type (a
    `ClassVar[str]` holds a str) or a method, and pass `check(section class)`, which returns what is wrong
    or None. A wrong claim is a one-line recipe error naming the section and the member.
    """

    def declare(protocol: P) -> P:
        checkable = typing.runtime_checkable(protocol)
        CAPABILITIES[checkable] = check
        return checkable

    return declare


def _members(protocol: type) -> dict[str, Any]:
    """A protocol's members: `{name: annotation}` for its annotated attributes, `{name: None}` for its methods."""
    members: dict[str, Any] = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object, typing.Protocol, typing.Generic) or not getattr(klass, "_is_protocol", False):
            continue
        members |= dict(typing.get_type_hints(klass, include_extras=False)) if "__annotations__" in vars(klass) else {}
        members |= {k: None for k, v in vars(klass).items() if callable(v) and not k.startswith("_")}
    return members


def _declares(section: type, member: str) -> bool:
    """Whether the section class has `member` as a class attribute (a ClassVar or a method): a recipe field of
    the same name is the user's setting, never a capability's member."""
    return member not in getattr(section, "model_fields", {}) and hasattr(section, member)


def claims(section: type, protocol: type) -> bool:
    """Whether the section class `section` claims the capability `protocol`: it declares one of its members."""
    return any(_declares(section, member) for member in _members(protocol))


def capability_problem(section: type) -> str | None:
    """What is wrong with the capabilities the section class `section` claims, or None."""
    for protocol, check in CAPABILITIES.items():
        members = _members(protocol)
        claimed = [m for m in members if _declares(section, m)]
        if not claimed:
            continue
        for member, annotation in members.items():
            where = f"{member} (capability {protocol.__name__})"
            if not _declares(section, member):
                kind = "a class attribute or method, not a recipe field"
                return f"{where}: missing ({kind}), while {claimed[0]} claims the capability"
            value = getattr(section, member)
            if annotation is None:
                if not callable(value):
                    return f"{where}: must be a method, got {value!r}"
                continue
            expected = typing.get_args(annotation)[0] if typing.get_origin(annotation) is ClassVar else annotation
            if isinstance(expected, type) and not isinstance(value, expected):
                return f"{where}: must be a {expected.__name__}, got {value!r}"
        if check is not None and (problem := check(section)):
            return f"capability {protocol.__name__}: {problem}"
    return None


class PluginConfig(Strict):
    """Base of every plugin's recipe section (`plugins.<name>:`).

    `weight` multiplies every loss term the plugin returns (`total = sum(weight * term)`).
    `lr`, when set, is the learning rate of the plugin's own modules (their own optimizer
    param group, scaled and scheduled like `optim.lr`); unset, they train at `optim.lr`.
    Subclass it and return the subclass from the plugin's `config_schema` hook. Its floats must be
    finite, as every section's; a pydantic model nested in it should say so too (`allow_inf_nan=False`).

    What a plugin offers the others (its terms stand for the ELBO of `x`, it makes augmented views, ...) is a
    capability: a typed Protocol (`framework.capability`) its section class implements, which another
    plugin finds with `Recipe.providers(TheProtocol)` instead of naming plugins (`plugins.blocks` has the
    built-in ones). A wrongly declared capability is refused when the section is validated.

    `needs` (a class attribute too) names what the plugin needs another plugin to build, so that the
    other fits its defaults to the recipe: `"vae_head"` asks the encoder plugin for a VAE head (encodings
    with `mu`, `logvar`, `z`). A section's validator asks which plugins need a thing with `needed_by`.
    """

    needs: ClassVar[frozenset[str]] = frozenset()

    weight: float = Field(1.0, json_schema_extra=MAY_CHANGE_ON_RESUME)  # a loss weight
    lr: float | None = Field(None, gt=0, json_schema_extra=MAY_CHANGE_ON_RESUME)  # rebased on load, as optim.lr

    @model_validator(mode="after")
    def _capabilities(self) -> PluginConfig:
        """The capabilities the section's class claims are declared right (`capability`)."""
        if problem := capability_problem(type(self)):
            raise ValueError(problem)
        return self


NEEDS = "needs"  # the validation context's key: each plugin of the recipe and its section's `needs`


def needed_by(info: ValidationInfo, thing: str) -> list[str]:
    """The plugins of the recipe being validated, in recipe order, whose section's class declares `thing`
    in `needs`; none for a section validated on its own (no recipe in the validation context)."""
    needs: Mapping[str, frozenset[str]] = (info.context or {}).get(NEEDS, {})
    return [name for name, declared in needs.items() if thing in declared]


class Scheduled(BaseModel):
    """A value that follows a schedule over the run's optimizer steps (a plugin section's field type).

    In a recipe a plain number is a constant; a mapping says `start` (the value at step 0, after
    any warm-up), `end` (the value at the last step; not for `constant`), `shape` (`constant`,
    `linear` or `cosine`, the default) and `warmup_steps` (a linear ramp from 0 up to `start`
    first, as the lr's warm-up: `start x (step + 1) / warmup_steps`; default 0) and `steps` (the step
    at which the path reaches `end`, to hold it from then on: DINO's teacher temperature, 0.04 -> 0.07
    over its first 30 epochs, is `{start: 0.04, end: 0.07, shape: linear, steps: <30 epochs>}`; default:
    the run's last step). Unknown keys, a path without an `end`, a constant with a different one or
    with `steps` are one-line recipe errors.
    """

    model_config = ConfigDict(**SECTION_CONFIG, frozen=True)  # unknown keys and non-finite numbers are errors

    start: float
    end: float | None = None
    shape: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    steps: int | None = Field(None, gt=0)  # where the path ends and holds; None: the run's last step

    @model_validator(mode="before")
    @classmethod
    def _number_is_a_constant(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return {"start": value, "shape": "constant"}
        return value

    @model_validator(mode="after")
    def _end_fits_the_shape(self) -> Scheduled:
        if self.shape == "constant" and self.end is not None and self.end != self.start:
            raise ValueError(
                f"a constant schedule has no end (start {self.start}, end {self.end}): shape linear or cosine"
            )
        if self.shape != "constant" and self.end is None:
            raise ValueError(f"a {self.shape} schedule needs an end (its value at the last step)")
        if self.shape == "constant" and self.steps is not None:
            raise ValueError(f"a constant schedule has no steps (got steps {self.steps}): shape linear or cosine")
        if self.steps is not None and self.steps <= self.warmup_steps:
            raise ValueError(f"steps {self.steps} must be after the warm-up's {self.warmup_steps} steps")
        return self

    @property
    def varies(self) -> bool:
        """Whether the value changes over the run (a warm-up, or a path to another `end`)."""
        return self.warmup_steps > 0 or (self.end is not None and self.end != self.start)

    def at(self, step: int, total_steps: int) -> float:
        """The value at optimizer step `step` (0-based) of `total_steps`; `end` from `steps` (default
        `total_steps`) on."""
        if step < self.warmup_steps:
            return self.start * (step + 1) / self.warmup_steps
        if self.shape == "constant" or self.end is None:
            return self.start
        span = max(1, (self.steps or total_steps) - self.warmup_steps)
        done = min(step - self.warmup_steps, span)
        if self.shape == "linear":
            return self.start + (self.end - self.start) * done / span
        return self.end - (self.end - self.start) * (math.cos(math.pi * done / span) + 1) / 2


class TeacherConfig(Strict):
    """The EMA teacher the recipe's plugins share (`framework.teacher`), built when a plugin asks for it
    (hook `teacher_modules`): a frozen copy of the encoder and of the modules the plugins name, updated after
    each optimizer step k (1-based) as `xi <- m * xi + (1 - m) * theta`, `m = momentum.at(k - 1)`.

    `momentum` defaults to BYOL's and DINO's 0.996 cosine-increased to 1 over the run. `evaluate` says which
    encoder `augssl eval` and `augssl export` read by default when the run has a teacher: `teacher` (DINO and
    iBOT report the teacher's features), `student`, or None for the plugins' choice (`teacher` when a plugin
    section says `evaluate_teacher = True`, else `student`); `--encoder` on the command line overrides it.
    """

    momentum: Scheduled = Scheduled(start=0.996, end=1.0, shape="cosine")
    evaluate: Literal["student", "teacher"] | None = Field(None, json_schema_extra=MAY_CHANGE_ON_RESUME)

    @field_validator("momentum")
    @classmethod
    def _in_unit_interval(cls, value: Scheduled) -> Scheduled:
        ends = [value.start] + ([value.end] if value.end is not None else [])
        if not all(0 <= v <= 1 for v in ends):
            raise ValueError(f"the momentum must stay in [0, 1], got start {value.start}, end {value.end}")
        return value


class DataConfig(Strict):
    """Where the training images come from and how they are batched (per process)."""

    # the same shards elsewhere may resume (e.g. copied to node-local disk); the cursor assumes the same list
    train: str = Field(
        json_schema_extra=MAY_CHANGE_ON_RESUME
    )  # shard URLs: a path, a brace pattern `x-{000000..000009}.tar`, http(s)://, pipe:
    image_size: int = Field(gt=0)
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    resize: int | None = None  # resize the short side to this, then center-crop image_size
    batch_size: int = Field(128, gt=0)  # per process, per micro-step
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(1000, ge=0)
    shardshuffle: bool = True
    resampled: bool = False  # draw shards with replacement, independently per rank and worker
    # resampled only: an epoch is this many samples over all ranks and workers (webdataset's
    # with_epoch); default: as many shards as data.train lists
    epoch_samples: int | None = Field(None, gt=0)
    max_bad_fraction: float = Field(0.01, ge=0, le=1, json_schema_extra=MAY_CHANGE_ON_RESUME)
    # labels must be -1 (unlabelled) or 0..num_classes-1; a record with another is a counted bad record
    num_classes: int | None = Field(None, gt=0, json_schema_extra=MAY_CHANGE_ON_RESUME)
    # faults: a worker with no good record for stall_seconds stops the run (one line); a remote
    # shard's transfer without a byte for timeout_seconds fails, and is retried `retries` times
    stall_seconds: float = Field(600.0, gt=0, json_schema_extra=MAY_CHANGE_ON_RESUME)
    timeout_seconds: float = Field(60.0, gt=0, json_schema_extra=MAY_CHANGE_ON_RESUME)
    retries: int = Field(3, ge=0, json_schema_extra=MAY_CHANGE_ON_RESUME)
    # PIL's Image.MAX_IMAGE_PIXELS where the images are decoded (default: PIL's, 89478485; 0: no limit): an
    # image of more than twice as many pixels (a decompression bomb?) stops the run, one line
    max_image_pixels: int | None = Field(None, ge=0, json_schema_extra=MAY_CHANGE_ON_RESUME)
    # where the views that split (View.on_device) run their photometric steps: "device" (batched on the
    # training device), "workers" (every step per sample in the data workers, as views without a split), or
    # "auto": the device on CUDA, the workers otherwise. Not changed on resume: it changes the random stream
    augment_on: Literal["auto", "device", "workers"] = "auto"

    @model_validator(mode="after")
    def _epoch_samples_need_resampling(self) -> DataConfig:
        if self.epoch_samples is not None and not self.resampled:
            raise ValueError("data.epoch_samples applies to resampled streams: set data.resampled: true")
        return self


class TrainConfig(Strict):
    """The run: its length, seed, resume policy and what stops it."""

    steps: int = Field(gt=0, json_schema_extra=MAY_CHANGE_ON_RESUME)  # optimizer steps
    seed: int = 0
    # "auto" (newest verified checkpoint), "never" (refuses a folder with checkpoints), "fresh" (moves
    # the old run to <output_dir>/previous/<time>/ and starts at step 0), or a checkpoint path
    resume: str = Field("auto", json_schema_extra=MAY_CHANGE_ON_RESUME)
    # consecutive non-finite steps before stopping
    max_bad_steps: int = Field(10, gt=0, json_schema_extra=MAY_CHANGE_ON_RESUME)
    # torch.compile every plugin module in place (first steps slower: compilation)
    compile: bool = Field(False, json_schema_extra=MAY_CHANGE_ON_RESUME)


class OptimConfig(Strict):
    """The optimizer and its schedules (lr, weight decay). Its state is restored on resume, so what it
    keeps (optimizer, momentum, betas, ...) may not change then; the lr and weight decay are rebased."""

    lr: float = Field(gt=0, json_schema_extra=MAY_CHANGE_ON_RESUME)  # lrs are rebased on load
    # "linear": the optimizer's lr is lr x global_batch / 256 (Goyal et al. 2017), where
    # global_batch = data.batch_size x processes x distributed.accumulation_steps
    lr_scaling: Literal["none", "linear"] = Field("none", json_schema_extra=MAY_CHANGE_ON_RESUME)
    # lars: SGD with plain momentum and a per-parameter trust ratio (docs/methods.md#optimiser)
    optimizer: Literal["adam", "adamw", "sgd", "lars"] = "adam"
    weight_decay: float = Field(0.0, ge=0, json_schema_extra=MAY_CHANGE_ON_RESUME)
    # set: the weight decay follows a cosine from weight_decay at step 0 to this at train.steps
    # (DINO's schedule), in the param groups that decay (written into them every step); None: constant
    weight_decay_end: float | None = Field(None, ge=0, json_schema_extra=MAY_CHANGE_ON_RESUME)
    # biases and normalisation weights (every parameter with ndim <= 1) get no weight decay, in their
    # own param group per plugin (solo-learn's exclude_bias_n_norm_wd); always so under lars
    exclude_norm_bias_from_wd: bool = False
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd (Nesterov), lars (plain)
    # lars: the trust coefficient eta (the LARS, SimCLR and BYOL papers' 1e-3; solo-learn's CIFAR
    # recipes take 0.02 with lars_clip), and clip: a parameter's lr is min(eta-scaled lr, lr) (solo-learn's clip_lr)
    lars_eta: float = Field(1e-3, gt=0)
    lars_clip: bool = False
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw
    warmup_steps: int = Field(0, ge=0, json_schema_extra=MAY_CHANGE_ON_RESUME)
    schedule: Literal["constant", "cosine"] = Field("constant", json_schema_extra=MAY_CHANGE_ON_RESUME)


class LogConfig(Strict):
    """What the run reports, and where."""

    every: int = Field(50, gt=0)  # metrics every N steps
    preview_every: int = Field(1000, ge=0)  # PNG of views and reconstructions every N steps; 0: never
    # Accelerate trackers the logged metrics also go to (metrics.jsonl is always written);
    # "wandb" needs `pip install wandb` (and WANDB_* settings, e.g. WANDB_MODE=offline).
    trackers: list[Literal["tensorboard", "wandb"]] = ["tensorboard"]


class CheckpointConfig(Strict):
    """How often the run is checkpointed, and how many checkpoints it keeps."""

    every: int = Field(1000, gt=0)  # steps
    keep: int = Field(2, gt=0)  # the newest N (and the one an explicit train.resume path names)


# The keys `train:` held before it was split by concern, and where they are now (a recipe naming one is
# answered with where it moved, not with a generic unknown key).
MOVED = {
    **{
        f"train.{key}": f"optim.{key}"
        for key in (
            "lr lr_scaling optimizer weight_decay weight_decay_end exclude_norm_bias_from_wd momentum lars_eta "
            "lars_clip betas warmup_steps schedule"
        ).split()
    },
    "train.log_every": "log.every",
    "train.preview_every": "log.preview_every",
    "train.log_with": "log.trackers",
    "train.checkpoint_every": "checkpoint.every",
    "train.keep_checkpoints": "checkpoint.keep",
}


class FSDPConfig(Strict):
    """FSDP2's options (`accelerate launch --config_file launch/accelerate/fsdp2.yaml`); None: the launch's."""

    # free each block's gathered parameters after its forward (gathered again for backward): less memory,
    # one more all-gather per block; FSDP2's default
    reshard_after_forward: bool | None = Field(None, json_schema_extra=MAY_CHANGE_ON_RESUME)
    # keep the sharded parameters, gradients and optimizer state on the CPU (the optimizer steps there)
    cpu_offload: bool | None = Field(None, json_schema_extra=MAY_CHANGE_ON_RESUME)


class DistributedConfig(Strict):
    """How the step is executed; the same recipe runs on 1 CPU or many GPUs."""

    # None: the launch decides (`accelerate launch --mixed_precision`, or its config file); "no"
    # if launched without one. Set here, the recipe wins over the launch.
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    accumulation_steps: int = Field(1, gt=0)
    grad_clip: float | None = Field(None, gt=0)
    find_unused_parameters: bool = False
    sync_batchnorm: bool = False  # SyncBatchNorm over all ranks (CUDA only; ignored on CPU)
    # a collective (the per-step vote, the log, a checkpoint barrier) that waits longer than this for
    # the other ranks stops the run with one line naming the rank and what it was doing (NCCL/gloo timeout)
    timeout_seconds: int = Field(1800, gt=0)
    deepspeed: dict[str, Any] | None = None
    fsdp: FSDPConfig = FSDPConfig()
    # recompute each block's activations (the encoder plugin's `shard_blocks`) in backward instead of
    # keeping them, under any launch; None: the launch's (FSDP_ACTIVATION_CHECKPOINTING), else off
    activation_checkpointing: bool | None = Field(None, json_schema_extra=MAY_CHANGE_ON_RESUME)
    # GPU speed settings (each a no-op on CPU): channels_last memory format for the model and
    # the image batches (None: on CUDA), TF32 matmuls and convolutions, cudnn.benchmark.
    channels_last: bool | None = None
    tf32: bool = True
    cudnn_benchmark: bool = True
    # torch's intra-op (OpenMP) threads per process; None: OMP_NUM_THREADS if set, else the cores this
    # process may use, shared by the processes on the machine, less its data workers (at least 1)
    intra_op_threads: int | None = Field(None, gt=0, json_schema_extra=MAY_CHANGE_ON_RESUME)

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            check_deepspeed_section(value)
        return value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        """YAML reads a bare `no` (as in `distributed.mixed_precision=no`) as false."""
        return "no" if value is False else value


class EvalConfig(Strict):
    """Labelled shards for evaluating the frozen encoder (`augssl eval`, and the online k-NN)."""

    train: str | None = None
    test: str | None = None
    batch_size: int = Field(256, gt=0)
    knn_every: int = Field(0, ge=0)  # k-NN accuracy (`knn.acc`) every N steps while training; 0: never
    knn_samples: int | None = Field(10000, gt=0)  # at most this many train and test samples for it; null: all

    @model_validator(mode="after")
    def _knn_needs_shards(self) -> EvalConfig:
        if self.knn_every and not (self.train and self.test):
            raise ValueError("eval.knn_every needs eval.train and eval.test (labelled shards)")
        return self


class Recipe(Strict):
    """A whole validated recipe. `plugins` maps each plugin name to its validated section."""

    output_dir: str = Field(pattern=r"\S", json_schema_extra=MAY_CHANGE_ON_RESUME)  # not empty; the run folder may move
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig
    log: LogConfig = Field(LogConfig(), json_schema_extra=MAY_CHANGE_ON_RESUME)
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), json_schema_extra=MAY_CHANGE_ON_RESUME)
    # the launch: checkpoint.check_resumable decides (DeepSpeed needs the same world and stage)
    distributed: DistributedConfig = Field(DistributedConfig(), json_schema_extra=MAY_CHANGE_ON_RESUME)
    eval: EvalConfig = Field(EvalConfig(), json_schema_extra=MAY_CHANGE_ON_RESUME)  # evaluation only
    teacher: TeacherConfig = TeacherConfig()  # the shared EMA teacher, when a plugin asks for one
    plugins: dict[str, Any]

    def resolved(self) -> dict[str, Any]:
        """The recipe as plain data, every default filled in (written to runs and checkpoints)."""
        out = self.model_dump(mode="json", exclude={"plugins"})
        out["plugins"] = {
            name: cfg.model_dump(mode="json", by_alias=True) if isinstance(cfg, PluginConfig) else cfg  # crops.global
            for name, cfg in self.plugins.items()
        }
        return out

    def providers(self, capability: Any) -> dict[str, Any]:
        """`{plugin: section}`, in recipe order, of the plugins whose section has `capability` (a Protocol
        declared with `framework.capability`), so that a plugin asks the recipe for what it needs from
        others (e.g. a view to transform) without naming a plugin."""
        return {
            name: cfg
            for name, cfg in self.plugins.items()
            if isinstance(cfg, capability) and claims(type(cfg), capability)  # not a recipe field of that name
        }
