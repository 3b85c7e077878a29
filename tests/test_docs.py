"""docs/plugins.md stays true: every hook signature it shows is the spec's (datasette's meta-test)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from framework import hookspecs

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HOOKS = {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "augssl_spec")}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def documented_hooks() -> list[tuple[int, ast.FunctionDef]]:
    """(block number, def) of every function in the doc's Python blocks that is named after a hook."""
    found = []
    for i, block in enumerate(python_blocks(DOC.read_text())):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.FunctionDef) and node.name in HOOKS:
                found.append((i, node))
    return found


def spec_params(hook: str) -> list[tuple[str, str | None]]:
    sig = inspect.signature(HOOKS[hook])
    return [
        (p.name, p.annotation if p.annotation is not inspect.Parameter.empty else None) for p in sig.parameters.values()
    ]


def test_every_python_block_parses():
    for block in python_blocks(DOC.read_text()):
        ast.parse(block)


def test_reference_shows_every_hook_with_its_exact_signature():
    reference = [node for i, node in documented_hooks() if i == 0]
    assert sorted(n.name for n in reference) == sorted(HOOKS)
    for node in reference:
        shown = [(a.arg, ast.unparse(a.annotation) if a.annotation else None) for a in node.args.args]
        assert shown == spec_params(node.name), f"docs/plugins.md: {node.name} differs from framework/hookspecs.py"
        returns = inspect.signature(HOOKS[node.name]).return_annotation
        assert ast.unparse(node.returns) == returns, f"docs/plugins.md: {node.name} return type differs"


@pytest.mark.parametrize("index_node", documented_hooks(), ids=lambda t: f"block{t[0]}-{t[1].name}")
def test_every_example_hook_takes_spec_arguments_only(index_node):
    _, node = index_node
    spec = [name for name, _ in spec_params(node.name)]
    shown = [a.arg for a in node.args.args]
    assert set(shown) <= set(spec), f"docs/plugins.md: {node.name}({', '.join(shown)}) - the spec has {spec}"
    assert not node.args.defaults, f"docs/plugins.md: {node.name}: pluggy never passes defaulted arguments"
