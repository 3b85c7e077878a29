"""The `augssl` command: train, shards, eval, export, plot, plugins.

`augssl train RECIPE [key=value ...]` is `launch/train.py`; under `accelerate launch`
use the launch scripts. A bad recipe, or a checkpoint the launch cannot resume (e.g. a
DeepSpeed run relaunched on another number of processes), exits with status 2 and one line
on stderr, before anything is trained or loaded.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import NoReturn

from framework.errors import one_line

EXIT_USAGE = 2


def _fail(msg: str) -> NoReturn:
    print(f"augssl: error: {msg}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _fail_if_bad_input(exc: Exception, prefix: str = "") -> NoReturn:
    """One line for bad input: a missing file or a bad value, raised directly or by a plugin hook that refused
    the recipe (ValueError) or a file (OSError); a plugin's own bug (any other error in a hook) keeps its
    traceback."""
    from framework.manager import PluginError

    if isinstance(exc, PluginError) and not isinstance(exc.__cause__, (ValueError, OSError)):
        raise exc
    _fail(f"{prefix}{exc}")


ENCODER_HELP = (
    "in a run with an EMA teacher (hook teacher_modules), which encoder to {verb}: student (the online "
    "encoder) or teacher (the EMA teacher's copy of it) (default: the recipe's teacher.evaluate, else the plugins' "
    "choice; student in a run without a teacher, where teacher is refused)"
)


def _encoder_option(parser: argparse.ArgumentParser, verb: str) -> None:
    """`--encoder student|teacher` of `augssl eval` and `augssl export` (`framework.teacher.evaluated_encoder`)."""
    parser.add_argument("--encoder", default=None, choices=["student", "teacher"], help=ENCODER_HELP.format(verb=verb))


def _read_errors() -> tuple[type[Exception], ...]:
    """What `augssl eval` and `augssl export` report in one line: a missing file or a bad value, a damaged
    or non-finite checkpoint, a checkpoint's recipe naming a plugin not installed, a plugin refusing
    the recipe or a file (e.g. its `pretrained` file is gone)."""
    from framework.checkpoint import CheckpointError
    from framework.manager import PluginError
    from framework.recipe.loading import RecipeError

    return FileNotFoundError, ValueError, CheckpointError, RecipeError, PluginError


def train_main(argv: Sequence[str]) -> None:
    """`train RECIPE [key=value ...]`: validate everything, then pretrain."""
    from framework.recipe.loading import RecipeError
    from framework.startup import load_recipe

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: augssl train RECIPE.yaml [key.path=value ...]")
        raise SystemExit(0 if argv else EXIT_USAGE)
    try:
        recipe, hooks = load_recipe(argv[0], list(argv[1:]))
    except RecipeError as exc:
        _fail(str(exc))
    train_or_exit(recipe, hooks)


def train_or_exit(recipe, hooks) -> None:
    """Train a validated recipe; what stops it early becomes one line and an exit status: 2 for a
    launch or checkpoint it cannot run with, `EXIT_PREEMPTED` (75) after a signal's checkpoint."""
    from framework.distributed import check_launch, using_deepspeed
    from framework.engine import train
    from framework.manager import PluginError

    try:
        check_launch(
            recipe.distributed, recipe.data, recipe.optim
        )  # what the launch adds (precision, DeepSpeed's stage and offload)
        hooks.check_launch(deepspeed=using_deepspeed())  # a hook the launch cannot call
    except (ValueError, PluginError) as exc:
        _fail(str(exc))
    from framework.checkpoint import CheckpointError
    from framework.data.stream import DataError
    from framework.distributed import CollectiveTimeout, rank, world_size
    from framework.engine import TrainingError
    from framework.preemption import EXIT_PREEMPTED, Preempted

    try:
        train(recipe, hooks)
    except CheckpointError as exc:  # a checkpoint this launch cannot resume: every rank stops, one prints
        if rank() != 0:
            raise SystemExit(EXIT_USAGE) from None
        _fail(str(exc))
    except Preempted as exc:  # SIGTERM/SIGINT/SIGUSR1: this step is checkpointed; exit "try again"
        if rank() == 0:
            print(f"augssl: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_PREEMPTED) from None
    except CollectiveTimeout as exc:  # every rank that waited says so: it names itself
        print(f"augssl: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except DataError as exc:  # the stream cannot go on (stalled, every shard bad): one line, from the worker
        if rank() == 0:
            print(f"augssl: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except TrainingError as exc:  # too many non-finite steps or bad records: the same on every rank
        if rank() == 0:
            print(f"augssl: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except PluginError as exc:  # a hook refused the recipe or a file: one line per rank (it may be one rank's alone)
        _fail_if_bad_input(exc, f"rank {rank()}: " if world_size() > 1 else "")


def eval_main(argv: Sequence[str]) -> None:
    """`eval OUTPUT_DIR [OUTPUT_DIR ...] [--protocol fast|linear|knn|all] [--encoder student|teacher]`:
    classifiers on runs' frozen encoders (in a run with an EMA teacher, the student's or the teacher's: eval.json
    says which) beside the same classifiers on raw pixels; writes each run's eval.json. Under
    `accelerate launch`, the processes share the feature extraction."""
    parser = argparse.ArgumentParser(prog="augssl eval", description=eval_main.__doc__)
    parser.add_argument("output_dirs", nargs="+", metavar="output_dir")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder (one run only; default: newest)")
    parser.add_argument(
        "--protocol",
        default="fast",
        choices=["fast", "linear", "knn", "all"],
        help="fast: L-BFGS logistic regression; linear: SGD protocol of docs/methods.md#offline-evaluation; knn: k=200 "
        "weighted k-NN; all: the three (default: fast)",
    )
    parser.add_argument("--epochs", type=int, default=90, help="linear: epochs (default 90)")
    parser.add_argument(
        "--augment",
        action="store_true",
        help="linear: RandomCrop(pad 4)+flip, features re-extracted every epoch (slow; "
        "default: features extracted once)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="linear: batch size; lr = 0.1 x batch/256")
    parser.add_argument("--k", type=int, default=200, help="knn: neighbours (default 200)")
    parser.add_argument("--temperature", type=float, default=0.07, help="knn: vote temperature (default 0.07)")
    _encoder_option(parser, "evaluate")
    args = parser.parse_args(argv)
    if args.checkpoint and len(args.output_dirs) > 1:
        _fail("--checkpoint names one run's checkpoint: give one output_dir")
    from framework.distributed import leave_process_group, process_state
    from framework.eval.report import PROTOCOLS, evaluate

    protocols = list(PROTOCOLS) if args.protocol == "all" else [args.protocol]
    atexit.register(leave_process_group)  # before finalization: see its docstring
    rows = []
    for i, out in enumerate(args.output_dirs):
        try:
            result = evaluate(
                out,
                args.checkpoint,
                baseline=i == 0,
                protocols=protocols,
                epochs=args.epochs,
                augment=args.augment,
                knn_k=args.k,
                knn_temperature=args.temperature,
                linear_batch_size=args.batch_size,
                encoder=args.encoder,
            )  # raw pixels: the same for every run, fitted once
        except _read_errors() as exc:  # every rank has the same: the main process says it
            if not process_state().is_main_process:
                raise SystemExit(EXIT_USAGE) from None
            _fail_if_bad_input(exc)
        if i == 0:
            rows.append(("raw pixels", result["pixel_dim"], result["raw_pixels_accuracies"], "-"))
        name = f"{out} (teacher)" if result["encoder"] == "teacher" else out
        rows.append((name, result["feature_dim"], result["accuracies"], f"{result['seconds']} s"))
    if not process_state().is_main_process:
        return  # under `accelerate launch`: every rank computed the same table
    title = "linear probe" if protocols == ["fast"] else "frozen-feature classifiers"
    print(f"\n{title}, test accuracy ({result['train_samples']} train / {result['test_samples']} test images)")
    for p, desc in result["protocol"].items():
        print(f"  {p}: {desc}")
    print(f"{'features':<40} {'dim':>6}" + "".join(f" {p:>9}" for p in protocols) + f" {'eval time':>10}")
    for name, dim, accs, secs in rows:
        print(f"{name:<40} {dim:>6}" + "".join(f" {100 * accs[p]:>8.2f}%" for p in protocols) + f" {secs:>10}")


def shards_main(argv: Sequence[str]) -> None:
    """`shards SOURCE ROOT --split S --out PATTERN`: convert a dataset to WebDataset shards."""
    from framework.data import sources
    from framework.data.shards import SampleRef, write_shards

    parser = argparse.ArgumentParser(prog="augssl shards", description="Convert a dataset to WebDataset tar shards.")
    parser.add_argument("source", choices=sorted(sources.SOURCES))
    parser.add_argument("root", nargs="?", default=None, help="dataset folder (default: the source's usual place)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", required=True, help="shard pattern, e.g. data/fmnist/train-%%06d.tar")
    parser.add_argument("--maxcount", type=int, default=5000, help="samples per shard at most")
    parser.add_argument("--maxsize", type=float, default=3e9, help="bytes per shard at most")
    parser.add_argument("--format", choices=["png", "jpg"], default="png")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N samples")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help="PIL's decompression-bomb limit, Image.MAX_IMAGE_PIXELS: an image of more than twice as many pixels "
        "stops the command, one of more is warned about (default: PIL's, 89478485; 0: no limit)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="worker processes reading, decoding and encoding the images (0: one per CPU core "
        "this process may use; default 1). The shards and manifest are the same bytes for any "
        "number. For imagefolder each worker reads its own files; the other sources are read "
        "from their few big files here and only the encoding is spread, worth little for their "
        "small images",
    )
    args = parser.parse_args(argv)
    if "%" not in args.out:
        _fail(f"--out {args.out!r}: needs a %d field for the shard number, e.g. train-%06d.tar")
    if args.processes < 0:
        _fail(f"--processes {args.processes}: needs 0 (one per CPU core) or more")
    if args.max_image_pixels is not None:
        if args.max_image_pixels < 0:
            _fail(f"--max-image-pixels {args.max_image_pixels}: needs 0 (no limit) or more")
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = args.max_image_pixels or None  # here and in the workers (`write_shards`)
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every core
    processes = args.processes or (len(affinity(0)) if affinity else os.cpu_count() or 1)
    root = args.root if args.root is not None else sources.DEFAULT_ROOTS.get(args.source)
    if root is None:
        _fail(f"{args.source}: give the dataset folder (ROOT)")
    try:
        samples: Iterable[sources.Sample | SampleRef]
        if args.source == "imagefolder":  # listed here, each file read in a worker
            samples = sources.image_folder_files(root, split=args.split)
        else:
            samples = sources.SOURCES[args.source](root, split=args.split)
        if args.limit is not None:
            from itertools import islice

            samples = islice(samples, args.limit)
        info = write_shards(
            samples,
            args.out,
            maxcount=args.maxcount,
            maxsize=args.maxsize,
            fmt=args.format,
            quality=args.quality,
            manifest={
                "source": args.source,
                "root": str(root),
                "split": args.split,
                "classes": sources.classes(args.source, root),
            },
            processes=processes,
        )
    except (OSError, ValueError) as exc:  # the shards and manifest already there are left untouched
        _fail(one_line(exc))
    except KeyboardInterrupt:  # the workers are stopped and the temporaries gone by now
        print("augssl: interrupted; the shards and manifest already there are left untouched", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # a reader tripping on a damaged file: still one line
        _fail(f"{args.source} {root}: {type(exc).__name__}: {one_line(exc)}")
    print(json.dumps({k: info[k] for k in ("samples", "pattern", "format")}))


def plugins_main(argv: Sequence[str]) -> None:
    """`plugins`: every plugin a recipe can name, the hooks it implements and its recipe section.

    Every plugin is listed; if one fails to load, the command says which on stderr and exits 2, so a
    broken install fails a CI job or a cluster's pre-flight check instead of passing it."""
    from framework.manager import PluginHooks
    from framework.registry import PluginError, discover

    broken = []
    for name, origin in sorted(discover().items()):
        try:
            hooks = PluginHooks([name], require_encoder=False)
            schema = hooks.config_schema()[name]
            implemented = ", ".join(hooks.implemented_hooks()[name])
        except PluginError as exc:
            print(f"{name}  ({origin})\n  error: {exc}")
            broken.append(one_line(exc))
            continue
        print(f"{name}  ({origin})\n  hooks: {implemented}")
        for field, info in schema.model_fields.items():
            default = "required" if info.is_required() else f"default {info.default!r}"
            print(f"  plugins.{name}.{field}: {getattr(info.annotation, '__name__', info.annotation)} ({default})")
    if broken:
        _fail(f"{len(broken)} plugin(s) failed to load, a recipe naming them cannot run: {'; '.join(broken)}")


def export_main(argv: Sequence[str]) -> None:
    """`export OUTPUT_DIR --out encoder.safetensors [--encoder student|teacher]`: the encoder's weights (in a
    run with an EMA teacher, the student's or the teacher's, under the same key names), torchvision ResNet or timm
    key names."""
    parser = argparse.ArgumentParser(prog="augssl export", description=export_main.__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: newest)")
    _encoder_option(parser, "export")
    args = parser.parse_args(argv)
    from framework.export import export_encoder

    try:
        meta = export_encoder(args.output_dir, args.out, args.checkpoint, args.encoder)
    except _read_errors() as exc:
        _fail_if_bad_input(exc)
    print(json.dumps({"out": args.out, **meta}))


def plot_main(argv: Sequence[str]) -> None:
    """`plot OUTPUT_DIR [--out FILE.png]`: loss terms and probe accuracy from metrics.jsonl as one PNG."""
    parser = argparse.ArgumentParser(prog="augssl plot", description=plot_main.__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--out", default=None, help="the PNG to write (default: OUTPUT_DIR/metrics.png)")
    args = parser.parse_args(argv)
    from framework.logging import read_metrics
    from framework.plots import plot_metrics

    try:
        print(plot_metrics(args.output_dir, read_metrics(args.output_dir), args.out))
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


COMMANDS = {
    "train": train_main,
    "eval": eval_main,
    "shards": shards_main,
    "plugins": plugins_main,
    "export": export_main,
    "plot": plot_main,
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: augssl {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else EXIT_USAGE)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
