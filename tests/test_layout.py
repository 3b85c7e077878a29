"""The test suite's own layout: no test module imports another (shared code is in tests/helpers.py),
and the committed image shards are exactly what tests/assets/make_assets.py writes."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from tests.assets.make_assets import SPLITS, images
from tests.helpers import asset_samples

TESTS = Path(__file__).resolve().parent


def imported_modules(tree: ast.Module) -> list[str]:
    """The dotted names a module imports (`from tests import test_x` gives `tests.test_x`)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names += [base, *(f"{base.rstrip('.')}.{alias.name}" for alias in node.names)]
    return names


def imported_test_module(name: str) -> str | None:
    """The tests/test_* module the dotted name `name` is or lies in (absolute or relative), else None."""
    parts = name.lstrip(".").split(".")
    if not (name.startswith(".") or parts[0] == "tests"):
        return None
    index = next((i for i, part in enumerate(parts) if part.startswith("test_")), None)
    return None if index is None else ".".join(parts[: index + 1])


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda p: p.name)
def test_no_test_module_imports_another(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    wrong = sorted({m for m in map(imported_test_module, imported_modules(tree)) if m})
    assert not wrong, f"tests/{path.name} imports {', '.join(wrong)}: move what it shares to tests/helpers.py"


@pytest.mark.parametrize("split", SPLITS)
def test_the_committed_assets_are_what_make_assets_writes(split):
    committed = [(s.key, s.label, np.asarray(s.image)) for s in asset_samples(split)]
    written = [(s.key, s.label, np.asarray(s.image)) for s in images(split)]
    assert [(k, y) for k, y, _ in committed] == [(k, y) for k, y, _ in written], f"tests/assets/{split}: keys or labels"
    assert all(np.array_equal(a, b) for (_, _, a), (_, _, b) in zip(committed, written, strict=True)), (
        f"tests/assets/{split}: pixels differ from make_assets.py's (run python tests/assets/make_assets.py)"
    )
