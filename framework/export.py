"""Export a run's encoder as a plain weights file, loadable without augssl.

`augssl export runs/x --out encoder.safetensors` writes the state dict of the run's
encoder (the module `encoder` of the plugin that implements `encode`), with the metadata
the encoder declares in its `export_metadata` attribute (for the built-in ResNets: the
architecture, the stem and `key_names: torchvision`, i.e. torchvision's own keys, so
`plugins.backbones.resnet_encoder(arch, stem, channels)` or torchvision's ResNet with that
stem, no max-pool and no fc, loads the file strictly) plus what the run knows: channels,
image size, normalisation and the source checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from framework.checkpoint import load_run


def export_encoder(output_dir: str | Path, out: str | Path, ckpt: str | Path | None = None) -> dict[str, str]:
    """Write the encoder of a run's checkpoint (newest by default) to `out`; returns the file's metadata."""
    model, recipe, path = load_run(output_dir, ckpt)
    encoder = model.encoder
    tensors = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    declared = getattr(encoder, "export_metadata", {})
    metadata = {
        **{str(k): str(v) for k, v in declared.items()},
        "num_features": str(encoder.num_features),
        "channels": str(recipe.data.channels),
        "image_size": str(recipe.data.image_size),
        "mean": str(list(recipe.data.mean)),
        "std": str(list(recipe.data.std)),
        "checkpoint": str(path),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return metadata
