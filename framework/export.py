"""Export a run's encoder as a plain weights file, loadable without augssl, with a model card.

`augssl export runs/x --out encoder.safetensors` writes the state dict of the run's
encoder (the module `encoder` of the plugin that implements `encode`), with the metadata
the encoder declares in its `export_metadata` attribute plus what the run knows: channels,
image size, normalisation and the source checkpoint. For the built-in ResNets that is the
architecture, the stem and `key_names: torchvision` (torchvision's own keys, so
torchvision's ResNet with that stem, no max-pool and no fc, loads the file strictly); for
`timm/<name>` encoders `key_names: timm`, `timm_model` and the `timm_kwargs` that rebuild the
model, so `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...),
num_classes=0, **timm_kwargs)` loads it.

In a run with an EMA teacher (`framework.teacher`) the file holds the student's encoder or the teacher's copy
of it (`framework.teacher.evaluated_encoder`: `--encoder`, else the recipe's `teacher.evaluate` or the plugins'
choice), under the same key names (the copy's own, without the `teacher.plugins.<plugin>.encoder.` prefix of
the checkpoint), so either loads into the same model; the metadata's `encoder` and the card say which.

Beside the weights, `<out>.md` is a model card: the recipe's plugins, steps, data and
normalisation, the accuracies of the run's `eval.json` when they were measured on these very
weights (its `encoder_blake2b`), and how to load the file. The card never takes the weights'
path (an `--out` ending in `.md` is refused), and a file there that is not an augssl model card is never
replaced; an earlier export's card is, with one line saying so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from framework.checkpoint import load_encoder, tensors_digest
from framework.recipe.schema import Recipe
from framework.teacher import EncoderChoice

CARD_TAGS = "tags: [self-supervised, augssl]"  # the front matter line that marks a card augssl wrote


def card_path(out: Path) -> Path:
    """Where the model card of weights `out` goes (`out` with the suffix `.md`); ValueError, before
    anything is written, if that is `out` itself or a file augssl did not write."""
    card = out.with_suffix(".md")
    if out.suffix.lower() == ".md":
        raise ValueError(
            f"--out {out}: the model card goes beside the weights as <name>.md; give the weights another "
            f"name, e.g. --out {out.with_suffix('.safetensors')}"
        )
    if card.exists() and not _is_card(card):
        raise ValueError(
            f"--out {out}: {card} exists and is not a model card augssl wrote; move it, or give --out another name"
        )
    return card


def _is_card(path: Path) -> bool:
    """`path` is a model card of an earlier `augssl export` (its front matter carries CARD_TAGS)."""
    try:
        head = path.read_text(errors="replace")[:4096].split("---")
    except OSError:
        return False
    return len(head) > 2 and head[0] == "" and CARD_TAGS in head[1].splitlines()


def export_encoder(
    output_dir: str | Path, out: str | Path, ckpt: str | Path | None = None, encoder_choice: EncoderChoice | None = None
) -> dict[str, str]:
    """Write the encoder of a run's checkpoint (newest intact by default) to `out` and its model card to
    `card_path(out)`; returns the file's metadata and the card's path. `encoder_choice` (`--encoder`): the
    student's or the EMA teacher's (default: the run's choice, `framework.teacher.evaluated_encoder`)."""
    out = Path(out)
    card = card_path(out)
    model, recipe, path, which = load_encoder(output_dir, ckpt, encoder_choice)
    encoder = model.encoder_of(which)
    tensors = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    declared: dict[str, Any] = getattr(encoder, "export_metadata", {})
    metadata = {
        **{str(k): v if isinstance(v, str) else json.dumps(v) for k, v in declared.items()},
        "num_features": str(encoder.num_features),
        "channels": str(recipe.data.channels),
        "image_size": str(recipe.data.image_size),
        "mean": str(list(recipe.data.mean)),
        "std": str(list(recipe.data.std)),
        "checkpoint": str(path),
        "encoder": which,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    accuracies = _measured(Path(output_dir) / "eval.json", tensors_digest(tensors))
    if card.exists():
        print(f"augssl: replacing the model card {card} of an earlier export", file=sys.stderr)
    card.write_text(model_card(recipe, metadata, out.name, accuracies, has_teacher=model.teacher is not None))
    return {**metadata, "card": str(card)}


def _measured(eval_file: Path, digest: str) -> str | None:
    """The line of `eval_file`'s accuracies if they were measured on the encoder whose digest is `digest`."""
    try:
        report = json.loads(eval_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("encoder_blake2b") != digest:
        return None  # another checkpoint's, or a report that does not name the encoder it measured
    protocols = ", ".join(report.get("protocol", {}))
    return f"test accuracy (`augssl eval`, {protocols}): {json.dumps(report.get('accuracies'))}"


def model_card(
    recipe: Recipe, metadata: dict[str, str], weights: str, accuracies: str | None, has_teacher: bool = False
) -> str:
    """A Markdown model card (Hugging Face style front matter) for the exported weights; `accuracies`:
    the line of `augssl eval`'s accuracies of these weights, if any; `has_teacher`: the run has an EMA teacher
    (the card says which encoder the file holds, `metadata["encoder"]`)."""
    plugins = ", ".join(recipe.plugins)
    timm_model = metadata.get("timm_model")
    lines = ["---", f"library_name: {'timm' if timm_model else 'pytorch'}", CARD_TAGS, "---"]
    lines += [
        f"# {metadata.get('arch', 'encoder')} pretrained with augssl ({plugins})",
        "",
        f"- plugins: {json.dumps(recipe.resolved()['plugins'], sort_keys=True)}",
        f"- steps: {recipe.train.steps} at {recipe.data.batch_size} images per process and micro-step",
        f"- data: `{recipe.data.train}`, {recipe.data.image_size} px, {recipe.data.channels} channel(s)",
        f"- normalisation: mean {metadata['mean']}, std {metadata['std']}",
        f"- features: {metadata['num_features']}-d pooled; checkpoint `{metadata['checkpoint']}`",
    ]
    which = metadata.get("encoder", "student")
    if has_teacher:
        lines.append(
            "- encoder: the EMA teacher's (the momentum-averaged copy of the encoder)"
            if which == "teacher"
            else "- encoder: the student's (the online encoder; the run also has an EMA teacher)"
        )
    measure = f"augssl eval --checkpoint {metadata['checkpoint']}" + (f" --encoder {which}" if has_teacher else "")
    lines.append(f"- {accuracies}" if accuracies else f"- test accuracy: not measured on this checkpoint (`{measure}`)")
    lines += ["", "## Loading", "", "```python"]
    if timm_model:
        kwargs = "".join(f", {k}={v!r}" for k, v in json.loads(metadata["timm_kwargs"]).items())
        lines += [
            "import timm",
            f"net = timm.create_model({timm_model!r}, pretrained=True, num_classes=0{kwargs},",
            f"                        pretrained_cfg_overlay=dict(file={weights!r}, num_classes=0))",
        ]
    else:
        lines += [
            "from safetensors.torch import load_file",
            f"state = load_file({weights!r})  # key names: {metadata.get('key_names', '?')}; see augssl's README",
        ]
    lines += ["```", ""]
    return "\n".join(lines)
