"""Checkpoints: `accelerator.save_state` + step + data position + resolved recipe.

A checkpoint is written to `checkpoints/step_<N>.tmp/` and renamed to `step_<N>/`
only once every rank has finished writing, so a kill during a save leaves the
previous checkpoint intact; an unfinished `.tmp` folder is never loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from framework.data import StreamPosition

if TYPE_CHECKING:
    from accelerate import Accelerator

    from framework.recipe import Recipe

STATE_FILE = "trainer_state.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder without its state file is incomplete)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.suffix != ".tmp" and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.removeprefix("step_")))


def find_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint `train.resume` points at: `auto` = newest complete, `never` = none, else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def save(
    accelerator: Accelerator,
    recipe: Recipe,
    step: int,
    position: StreamPosition,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` from every rank; returns its final path."""
    root = checkpoint_root(recipe.output_dir)
    final = root / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    rank = accelerator.process_index
    (tmp / f"data_rank{rank}.json").write_text(json.dumps(position.state_dict()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
        state = {"step": step, "world_size": accelerator.num_processes, **(extra or {})}
        (tmp / STATE_FILE).write_text(json.dumps(state))  # last file: marks the folder complete
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(recipe.output_dir)[: -recipe.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Accelerator, path: Path) -> tuple[dict[str, Any], StreamPosition | None]:
    """Restore model/optimizer/scheduler/RNG states; returns the trainer state and this rank's data position.

    The data position is None when the checkpoint was written by a different number of
    processes (the stream is then reseeded instead of continued).
    """
    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text())
    rank_file = path / f"data_rank{accelerator.process_index}.json"
    if state.get("world_size") != accelerator.num_processes or not rank_file.is_file():
        return state, None
    return state, StreamPosition.from_state_dict(json.loads(rank_file.read_text()))


def model_weights_file(path: Path) -> Path:
    """The model's weights inside a checkpoint folder (Accelerate's naming)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: no model weights (model.safetensors) in checkpoint")
