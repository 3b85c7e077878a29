"""The architecture, checked: the layers of docs/architecture.md, no import cycle, plugins on the public API.

The import graph is read from the source (every import statement, at any depth, `if TYPE_CHECKING:`
ones included; importing `a.b.c` also imports the packages `a` and `a.b`), so a lazy import
cannot hide a cycle. The layers are read from the table in docs/architecture.md, so the picture
there is the rule here: a new module is given its place in that table, and each failure says what
to change and where.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import framework

ROOT = Path(__file__).resolve().parents[1]

ARCHITECTURE = ROOT / "docs" / "architecture.md"
TABLE = "docs/architecture.md's layer table (section 'The layers')"


def documented_layers(text: str) -> dict[str, int]:
    """`{module: layer}` from the layer table of docs/architecture.md, the one place the layers are written:
    each row is `| layer | modules | imports |`, every `code span` of its modules cell a module under
    `framework.` (`framework` itself is the package)."""
    section = text.split("## The layers", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for row in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", section, re.M):
        for name in re.findall(r"`([\w.]+)`", row[1]):
            module = name if name == "framework" else f"framework.{name}"
            assert module not in layers, f"{TABLE}: `{name}` is in layers {layers[module]} and {row[0]}; keep one"
            layers[module] = int(row[0])
    assert layers, f"{TABLE}: no row `| layer | modules | imports |` found; the layer tests read it"
    return layers


# A module may import only modules of lower layers.
LAYERS = documented_layers(ARCHITECTURE.read_text(encoding="utf-8"))


def modules(package: str) -> dict[str, Path]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


KNOWN = {**modules("framework"), **modules("plugins")}


def imports(path: Path, name: str) -> set[str]:
    """The project modules `name` imports (their parent packages too), itself and its own parents excluded."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in KNOWN else node.module for a in node.names
            ]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                module = ".".join(parts[:i])
                if module in KNOWN and module != name and not name.startswith(module + "."):
                    out.add(module)
    return out


GRAPH = {name: imports(path, name) for name, path in KNOWN.items()}


def _layer_hint(module: str) -> str:
    """Where a module without a layer goes: above everything it imports, below everything importing it."""
    below = {d: LAYERS[d] for d in GRAPH[module] if d in LAYERS}
    above = {m: LAYERS[m] for m, deps in GRAPH.items() if module in deps and m in LAYERS}
    lowest = max(below.values(), default=-1) + 1
    highest = min(above.values(), default=max(LAYERS.values())) - (1 if above else 0)
    imports = ", ".join(f"{d} ({n})" for d, n in sorted(below.items())) or "no framework module"
    users = ", ".join(f"{m} ({n})" for m, n in sorted(above.items())) or "nothing yet"
    short = module.removeprefix("framework.")
    if lowest > highest:
        where = f"no layer fits: it must sit above {lowest - 1} and below {highest + 1}; move an import or split it"
    else:
        span = f"layer {lowest}" if lowest == highest else f"a layer from {lowest} to {highest} (the lowest: {lowest})"
        where = f"add `{short}` to {span} in {TABLE}"
    return f"{module} has no layer: {where}. It imports {imports}; imported by {users}."


def test_every_framework_module_has_a_layer():
    missing = sorted(m for m in KNOWN if m.startswith("framework") and m not in LAYERS)
    assert not missing, "\n".join(_layer_hint(m) for m in missing)
    gone = sorted(m for m in LAYERS if m not in KNOWN)
    assert not gone, f"{TABLE} names modules that do not exist: {gone}; remove them from it"


def test_each_module_imports_only_lower_layers():
    wrong = [
        f"{m} (layer {LAYERS[m]}) imports {d} (layer {LAYERS[d]}): in {TABLE}, move {d} below layer {LAYERS[m]} "
        f"or {m} above layer {LAYERS[d]} if nothing else forbids it; else import something lower"
        for m, deps in GRAPH.items()
        if m in LAYERS
        for d in sorted(deps)
        if d in LAYERS and LAYERS[d] >= LAYERS[m] and not d.startswith(m + ".")
    ]  # (a package re-exports its own submodules)
    assert not wrong, "\n".join(wrong)


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycle = " -> ".join(path[path.index(dep) :] + [dep])
                raise AssertionError(
                    f"import cycle: {cycle}. Lazy and TYPE_CHECKING imports count too; break the cycle by moving "
                    "what both need into a lower module (docs/architecture.md: 'The layers')"
                )
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for start in sorted(GRAPH):
        if start not in state:
            visit(start, [start])


def test_loading_a_recipe_builds_no_plugin_manager_and_reads_no_shard():
    """`framework.recipe.loading` sits below the manager and beside the data stages: it gets each plugin's
    section class from the registry, and starting from a recipe (`framework.startup`) builds the manager
    and checks the shards. An import of either from the loader would run back up the layers."""
    back = sorted(
        d for d in GRAPH["framework.recipe.loading"] if d == "framework.manager" or d.startswith("framework.data")
    )
    assert not back, f"framework.recipe.loading imports {back}: build the manager / check shards in framework.startup"


def test_the_layer_table_is_parsed_as_written():
    """The parser reads a row's every module and refuses a module written in two rows."""
    text = "## The layers\n\n| layer | modules | imports |\n|---|---|---|\n| 0 | `a`, `b.c` (and `b`) | x |\n"
    assert documented_layers(text + "| 1 | `framework` | y |\n\n## Next\n| 5 | `z` | |\n") == {
        "framework.a": 0,
        "framework.b.c": 0,
        "framework.b": 0,
        "framework": 1,
    }
    with pytest.raises(AssertionError, match="`a` is in layers 0 and 1; keep one"):
        documented_layers(text + "| 1 | `a` | y |\n")


def test_the_framework_knows_no_method():
    leaks = {
        m: sorted(d for d in deps if d.startswith("plugins")) for m, deps in GRAPH.items() if m.startswith("framework")
    }
    assert not {m: d for m, d in leaks.items() if d}, f"framework/ imports plugins/: {leaks}"
    for path in (ROOT / "framework").rglob("*.py"):  # nor names a built-in plugin's module in its code
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                assert node.slice.value not in ("backbones", "kl", "aavae", "simclr", "byol"), (
                    f"{path}: [{node.slice.value!r}]"
                )


def test_production_code_never_imports_test_helpers():
    users = sorted(
        m for m, deps in GRAPH.items() if "framework.testing" in deps or any(d.startswith("tests") for d in deps)
    )
    assert not users, f"production modules import framework.testing: {users}"


def test_plugins_use_only_the_public_plugin_api():
    public = set(framework.__all__)
    for name, path in KNOWN.items():
        if not name.startswith("plugins"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("framework"):
                assert node.module == "framework", f"{path}: imports {node.module} (only `framework` is the plugin API)"
                private = {a.name for a in node.names} - public
                assert not private, f"{path}: imports {sorted(private)}, not in framework.__all__"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("framework.") for a in node.names), (
                    f"{path}: imports a framework module"
                )
