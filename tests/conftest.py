"""Shared fixtures: tiny shards of real Fashion-MNIST images, written once per test session."""

from __future__ import annotations

import pytest

from framework.sources import FASHION_MNIST_DIR
from framework.testing import tiny_shards


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory) -> dict[str, str]:
    """8 train shards x 24 and 4 test shards x 24 real Fashion-MNIST images (28 px, grey)."""
    if not FASHION_MNIST_DIR.exists():
        pytest.fail(f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist (see .ci/run)")
    return tiny_shards(tmp_path_factory.mktemp("fmnist"))
