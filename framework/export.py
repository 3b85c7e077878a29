"""Export a run's encoder as a plain weights file, loadable without augssl.

`augssl export runs/x --out encoder.safetensors` writes the state dict of the
`backbones` encoder. For the ResNet encoders the keys are torchvision's own
(`conv1.weight`, `layer1.0.bn1.running_mean`, ...; no `fc`), so

    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)   # stem "cifar"; "stl": (3, 64, 7, 2, 3)
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    net.load_state_dict(safetensors.torch.load_file("encoder.safetensors"), strict=True)

gives the pooled features `h` of the checkpoint. The file's metadata records the
architecture, stem, channels, image size and source checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from framework.evaluate import load_run


def export_encoder(output_dir: str | Path, out: str | Path, ckpt: str | Path | None = None) -> dict[str, str]:
    """Write the encoder of a run's checkpoint (newest by default) to `out`; returns the file's metadata."""
    model, recipe, path = load_run(output_dir, ckpt)
    backbones = recipe.plugins.get("backbones")
    if backbones is None or "backbones" not in model.plugins:
        raise ValueError(f"{path}: export needs the `backbones` encoder (this run has {list(recipe.plugins)})")
    encoder = model.plugins["backbones"]["encoder"]
    tensors = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    metadata = {
        "arch": backbones.encoder,
        "stem": backbones.stem if backbones.encoder.startswith("resnet") else "conv28",
        "channels": str(recipe.data.channels),
        "image_size": str(recipe.data.image_size),
        "mean": str(list(recipe.data.mean)),
        "std": str(list(recipe.data.std)),
        "checkpoint": str(path),
        "key_names": "torchvision" if backbones.encoder.startswith("resnet") else "augssl conv28",
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return metadata


def torchvision_encoder(arch: str, stem: str, channels: int = 3) -> torch.nn.Module:
    """The torchvision ResNet an exported file loads into strictly (the recipe's stem, no max-pool, no fc)."""
    import torchvision
    from torch import nn

    net = getattr(torchvision.models, arch)(weights=None)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    else:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    return net
