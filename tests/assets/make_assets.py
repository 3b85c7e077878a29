"""Writes the image shards in tests/assets/ that most tests train and evaluate on.

    python tests/assets/make_assets.py      (from anywhere; rewrites the shards and manifests)

Synthetic 28-px grey images of 10 classes, in Fashion-MNIST's shape but not its images: a
grainy ellipse on black whose width and height the class sets, jittered in place and
brightness. Like Fashion-MNIST's, their pixels have mean 0.23 and std 0.34 (its: 0.28, 0.35)
and their PNGs vary (250 to 700 bytes), which tests of gradients across engines and of cut
shards rely on. 192 train images in 8 shards and 96 test images in 4, 24 per shard, keys
`train_0000000` ... as Fashion-MNIST's have.
Deterministic: the same code writes the same pixels (tests/test_layout.py checks the
committed shards against `images`); the manifests hold relative paths only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS = Path(__file__).resolve().parent
sys.path.insert(0, str(ASSETS.parents[1]))

from framework.data import Sample, write_shards  # noqa: E402

# images, seed: any seed gives such images; with 7 the middle of a shard of the first 4 test images
# falls inside a tar member, as with Fashion-MNIST's (tests/test_data.py truncates one there)
SPLITS = {"train": (192, 0), "test": (96, 7)}
PER_SHARD = 24
SIZE = 28
# (half-width, half-height) in pixels of each class's ellipse
AXES = [(4, 13), (13, 4), (9, 9), (6, 12), (12, 6), (13, 13), (5, 9), (9, 5), (13, 9), (9, 13)]


def images(split: str) -> Iterator[Sample]:
    """The `split` ("train" or "test") images in shard order, 10 classes in equal numbers."""
    n, seed = SPLITS[split]
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for i, label in enumerate(labels.tolist()):
        (a, b), (cx, cy) = AXES[label], SIZE / 2 - 0.5 + rng.integers(-2, 3, size=2)
        inside = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
        texture = rng.normal(int(rng.integers(120, 236)), 20, size=(SIZE, SIZE))
        pixels = (inside * np.clip(texture, 0, 255)).astype(np.uint8)
        yield Sample(f"{split}_{i:07d}", Image.fromarray(pixels), label)


def main() -> None:
    """Write `<split>-%06d.tar` and `<split>.json` for each split beside this script."""
    os.chdir(ASSETS)  # relative patterns: the manifests name no path of this machine
    for split in SPLITS:
        info = write_shards(images(split), f"{split}-%06d.tar", maxcount=PER_SHARD)
        print(f"{split}: {info['samples']} images in {info['pattern']}")


if __name__ == "__main__":
    main()
