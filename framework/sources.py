"""Dataset sources: readers that turn a dataset on disk into a stream of `Sample`s.

Each reader yields samples one at a time and never holds more than one source file
in memory, so `framework.data.write_shards` can convert any of them to WebDataset
shards. Readers take the dataset's own on-disk format (no download happens here).
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


@dataclass(frozen=True)
class Sample:
    """One labelled image; `label` is -1 for unlabelled data (STL-10's unlabeled split)."""

    key: str
    image: Image.Image
    label: int


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz", root / "raw" / stem, root / "raw" / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{stem}(.gz) not found under {root}")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzipped or not, into a uint8 array."""
    with _open_maybe_gz(path) as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(shape))} bytes)")
    return data.reshape(shape)


def fashion_mnist(root: str | Path = FASHION_MNIST_DIR, split: str = "train") -> Iterator[Sample]:
    """Fashion-MNIST from its IDX files (`train-*` / `t10k-*`, gzipped or not)."""
    root = Path(root)
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in split {split!r}")
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        yield Sample(f"{split}_{i:07d}", Image.fromarray(pixels), int(label))
