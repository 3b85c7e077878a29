"""Shared fixtures: the committed image shards (tests/assets) for tests that need some images, and
tiny shards of real Fashion-MNIST images for those that need real ones (they skip without it); tests marked
`gpu` skip without CUDA."""

from __future__ import annotations

import shutil

import pytest
import torch

from framework.data.sources import FASHION_MNIST_DIR
from framework.testing import tiny_shards
from tests.helpers import ASSETS, NEEDS_FASHION_MNIST, asset_specs


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory) -> dict[str, str]:
    """8 train shards x 24 and 4 test shards x 24 synthetic 28-px grey images of 10 classes
    (Fashion-MNIST's shape, not its images: tests/assets/make_assets.py), copied to a temporary
    folder so that no test can change the committed files."""
    root = tmp_path_factory.mktemp("assets") / "shards"
    shutil.copytree(ASSETS, root, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return asset_specs(root)


@pytest.fixture(scope="session")
def real_fmnist_shards(tmp_path_factory) -> dict[str, str]:
    """8 train shards x 24 and 4 test shards x 24 real Fashion-MNIST images (28 px, grey), for tests
    that assert what only real images give (accuracy above chance); skips when it is not installed."""
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(NEEDS_FASHION_MNIST)
    return tiny_shards(tmp_path_factory.mktemp("fmnist"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the tests marked `gpu` where torch sees no CUDA device (scripts/gpu_check.sh runs them on a GPU)."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
