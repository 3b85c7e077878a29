"""The architecture, checked: the layers of docs/architecture.md, no import cycle, plugins on the public API.

The import graph is read from the source (every import statement, at any depth, `if TYPE_CHECKING:`
ones included; importing `a.b.c` also imports the packages `a` and `a.b`), so a lazy import
cannot hide a cycle and a new module must be given its place in `LAYERS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import framework

ROOT = Path(__file__).resolve().parents[1]

# A module may import only modules of lower layers; docs/architecture.md draws the same picture.
LAYERS: dict[str, int] = {
    # leaves: import nothing of the framework
    "framework.errors": 0,
    "framework.registry": 0,
    "framework.precision": 0,
    "framework.preemption": 0,
    "framework.views": 0,
    "framework.data.sources": 0,
    "framework.recipe.schema": 0,
    "framework.recipe": 0,
    "framework.eval.classifiers": 0,
    # the plugin contract, processes, shard files
    "framework.types": 1,
    "framework.distributed": 1,
    "framework.data.shards": 1,
    "framework.plots": 1,
    "framework.schedules": 1,
    "framework.hookspecs": 2,
    "framework.data.pipeline": 2,
    # plugins and the stream
    "framework.manager": 3,
    "framework.data.stream": 3,
    "framework.model": 4,
    "framework.data": 4,
    # what a run uses
    "framework.optim": 5,
    "framework.logging": 5,
    "framework.recipe.loading": 5,
    "framework.eval.features": 5,
    "framework.checkpoint": 6,
    "framework.runfolder": 7,
    "framework.eval.report": 7,
    "framework.export": 7,
    "framework.eval": 8,
    # the loop, and what users call
    "framework.engine": 9,
    "framework.cli": 10,
    "framework.testing": 10,
    "framework": 10,
}


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


def test_every_framework_module_has_a_layer():
    missing = sorted(m for m in KNOWN if m.startswith("framework") and m not in LAYERS)
    assert not missing, f"give these modules a layer in tests/test_layers.py and docs/architecture.md: {missing}"


def test_each_module_imports_only_lower_layers():
    wrong = [
        f"{m} (layer {LAYERS[m]}) imports {d} (layer {LAYERS[d]})"
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
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for start in sorted(GRAPH):
        if start not in state:
            visit(start, [start])


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
