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

Beside the weights, `<out>.md` is a model card: the recipe's plugins, steps, data and
normalisation, the run's `eval.json` accuracies when it has them, and how to load the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from framework.checkpoint import load_run
from framework.recipe.schema import Recipe


def export_encoder(output_dir: str | Path, out: str | Path, ckpt: str | Path | None = None) -> dict[str, str]:
    """Write the encoder of a run's checkpoint (newest by default) to `out` and its model card to
    `out` with the suffix `.md`; returns the file's metadata."""
    model, recipe, path = load_run(output_dir, ckpt)
    encoder = model.encoder
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
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    out.with_suffix(".md").write_text(model_card(recipe, metadata, out.name, Path(output_dir) / "eval.json"))
    return metadata


def model_card(recipe: Recipe, metadata: dict[str, str], weights: str, eval_file: Path) -> str:
    """A Markdown model card (Hugging Face style front matter) for the exported weights."""
    plugins = ", ".join(recipe.plugins)
    timm_model = metadata.get("timm_model")
    lines = ["---", f"library_name: {'timm' if timm_model else 'pytorch'}", "tags: [self-supervised, augssl]", "---"]
    lines += [
        f"# {metadata.get('arch', 'encoder')} pretrained with augssl ({plugins})",
        "",
        f"- plugins: {json.dumps(recipe.resolved()['plugins'], sort_keys=True)}",
        f"- steps: {recipe.train.steps} at {recipe.data.batch_size} images per process and micro-step",
        f"- data: `{recipe.data.train}`, {recipe.data.image_size} px, {recipe.data.channels} channel(s)",
        f"- normalisation: mean {metadata['mean']}, std {metadata['std']}",
        f"- features: {metadata['num_features']}-d pooled; checkpoint `{metadata['checkpoint']}`",
    ]
    if eval_file.is_file():
        report = json.loads(eval_file.read_text())
        protocols = ", ".join(report.get("protocol", {}))
        lines.append(f"- test accuracy (`augssl eval`, {protocols}): {json.dumps(report.get('accuracies'))}")
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
