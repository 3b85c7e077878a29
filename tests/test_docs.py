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


TYPING_ALIASES = {
    "List": "list",
    "Dict": "dict",
    "Tuple": "tuple",
    "Set": "set",
    "FrozenSet": "frozenset",
    "Type": "type",
}


def normal(annotation: str | None) -> str | None:
    """An annotation in one spelling, so the check is about the type, not how it is written:
    `Optional[X]`, `Union[X, None]` and `None | X` are all `X | None`; `typing.List[X]` is `list[X]`."""
    if annotation is None:
        return None

    def members(node: ast.expr) -> list[str]:  # a union's members, each in its normal spelling
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return members(node.left) + members(node.right)
        if isinstance(node, ast.Subscript) and name_of(node.value) in ("Optional", "Union"):
            args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            return [m for a in args for m in members(a)] + (["None"] if name_of(node.value) == "Optional" else [])
        return [spell(node)]

    def spell(node: ast.expr) -> str:
        if isinstance(node, ast.Subscript):
            args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            base = TYPING_ALIASES.get(name_of(node.value), ast.unparse(node.value))
            return f"{base}[{', '.join(' | '.join(sorted(set(members(a)))) for a in args)}]"
        return ast.unparse(node)

    def name_of(node: ast.expr) -> str:  # `typing.Optional` and `Optional` alike
        return node.attr if isinstance(node, ast.Attribute) else ast.unparse(node)

    found = members(ast.parse(annotation, mode="eval").body)
    return " | ".join(sorted(set(found) - {"None"}) + (["None"] if "None" in found else []))


def spec_params(hook: str) -> list[tuple[str, str | None]]:
    sig = inspect.signature(HOOKS[hook])
    return [
        (p.name, p.annotation if p.annotation is not inspect.Parameter.empty else None) for p in sig.parameters.values()
    ]


def spec_def(hook: str) -> str:
    """The hook's signature as the reference block shows it."""
    params = ", ".join(f"{name}: {annotation}" if annotation else name for name, annotation in spec_params(hook))
    return f"def {hook}({params}) -> {inspect.signature(HOOKS[hook]).return_annotation}: ..."


def test_every_python_block_parses():
    for block in python_blocks(DOC.read_text()):
        ast.parse(block)


def test_annotations_compare_by_type_not_spelling():
    assert normal("Optional[StepContext]") == normal("StepContext | None") == normal("None | StepContext")
    assert normal("typing.Union[nn.Module, None]") == normal("nn.Module | None")
    assert normal("Dict[str, Optional[torch.Tensor]]") == normal("dict[str, torch.Tensor | None]")
    assert normal("type[PluginConfig]") != normal("PluginConfig")


REFERENCE = "# Hook reference"  # the first line of the reference block


def test_reference_shows_every_hook_with_its_exact_signature():
    blocks = [i for i, block in enumerate(python_blocks(DOC.read_text())) if block.startswith(REFERENCE)]
    assert len(blocks) == 1, f"docs/plugins.md needs one python block starting with {REFERENCE!r}, has {len(blocks)}"
    reference = {node.name: node for i, node in documented_hooks() if i == blocks[0]}
    where = f"docs/plugins.md's hook reference (the python block starting with {REFERENCE!r})"
    missing = [spec_def(hook) for hook in sorted(set(HOOKS) - set(reference))]
    assert not missing, f"{where} lacks hooks of framework/hookspecs.py; add:\n" + "\n".join(missing)
    extra = sorted(set(reference) - set(HOOKS))
    assert not extra, f"{where} shows {extra}, which framework/hookspecs.py does not define; remove them"
    for name, node in reference.items():
        shown = [(a.arg, normal(ast.unparse(a.annotation)) if a.annotation else None) for a in node.args.args]
        spec = [(arg, normal(annotation)) for arg, annotation in spec_params(name)]
        returns = normal(inspect.signature(HOOKS[name]).return_annotation)
        assert shown == spec and normal(ast.unparse(node.returns)) == returns, (
            f"{where}: {name} differs from framework/hookspecs.py; show it as:\n{spec_def(name)}"
        )


@pytest.mark.parametrize("index_node", documented_hooks(), ids=lambda t: f"block{t[0]}-{t[1].name}")
def test_every_example_hook_takes_spec_arguments_only(index_node):
    _, node = index_node
    spec = [name for name, _ in spec_params(node.name)]
    shown = [a.arg for a in node.args.args]
    assert set(shown) <= set(spec), f"docs/plugins.md: {node.name}({', '.join(shown)}) - the spec has {spec}"
    assert not node.args.defaults, f"docs/plugins.md: {node.name}: pluggy never passes defaulted arguments"


HOST_SYNCS = ("item", "tolist", "cpu", "numpy")  # what docs/plugins.md's rules forbid in a hook


@pytest.mark.parametrize("index_node", documented_hooks(), ids=lambda t: f"block{t[0]}-{t[1].name}")
def test_no_example_hook_syncs_with_the_host(index_node):
    _, node = index_node
    calls = sorted(
        f".{n.func.attr}()"
        for n in ast.walk(node)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in HOST_SYNCS
    )
    assert not calls, (
        f"docs/plugins.md: the example {node.name} calls {calls}, a host sync every step; keep it on the device"
    )


def test_hooks_are_listed_in_one_document():
    """A list of the hooks outside docs/plugins.md's reference drifts when a hook is added: other documents link to
    it. A list is a paragraph or table naming most hooks as code (`encode`, `regularize(ctx, cfg, own)`)."""
    root = DOC.parents[1]
    listed = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "examples").rglob("*.md"))]:
        if path == DOC:
            continue
        text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), path.read_text(), flags=re.S | re.M)
        line = 1
        for block in re.split(r"(\n\s*\n)", text):
            named = {name for name in re.findall(r"`(\w+)[(`]", block) if name in HOOKS}
            if len(named) > len(HOOKS) // 2:
                listed.append(f"{path.relative_to(root)}:{line} names hooks {sorted(named)}")
            line += block.count("\n")
    assert not listed, (
        "hooks are listed once, in docs/plugins.md#the-hooks-in-the-order-they-fire (checked against "
        "framework/hookspecs.py); link to it instead:\n" + "\n".join(listed)
    )
