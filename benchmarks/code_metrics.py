"""Code figures anyone can rerun (issue 22's closing note): back edges and cycles of framework/'s import graph
against the layer table of docs/architecture.md, the longest functions, the functions taking a whole `Recipe`,
and each plugin's size and the concepts it uses.

Standard library only (ast, tokenize): it reads the source and imports nothing of the project, so it runs in
a second on any checkout, or on a copy of one (`--root`).

    python benchmarks/code_metrics.py [--root DIR] [--plugin FILE.py] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import re
import sys
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, write_report  # noqa: E402

PROJECT_PACKAGES = ("framework", "plugins")
CONTEXT_NAMES = ("ctx", "cfg", "config")
Function = ast.FunctionDef | ast.AsyncFunctionDef


def documented_layers(text: str) -> dict[str, int]:
    """`{module: layer}` read from docs/architecture.md's section 'The layers' as tests/test_layers.py reads it:
    each row `| layer | modules | imports |`, every `code span` of the modules cell a module under `framework.`."""
    section = text.split("## The layers", 1)[1].split("\n## ", 1)[0]
    return {
        name if name == "framework" else f"framework.{name}": int(layer)
        for layer, cell in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", section, re.M)
        for name in re.findall(r"`([\w.]+)`", cell)
    }


def module_files(root: Path, package: str) -> dict[str, Path]:
    """`{dotted module name: file}` of every module under `root/package` (a package named by its own name)."""
    return {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
        for path in sorted((root / package).rglob("*.py"))
    }


@dataclass(frozen=True)
class Import:
    """One project module imported by another: where, and whether inside a function (a lazy import)."""

    importer: str
    target: str
    line: int
    lazy: bool

    def __str__(self) -> str:
        return f"{self.importer} -> {self.target} ({self.line})"


def _walk_with_scope(tree: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node of `tree` with whether it lies inside a function body."""
    for child in ast.iter_child_nodes(tree):
        yield child, in_function
        inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _walk_with_scope(child, inner)


def _imported_names(node: ast.Import | ast.ImportFrom, name: str, path: Path, known: dict[str, Path]) -> list[str]:
    """The dotted names an import statement brings in (`from a import b` is `a.b` when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: counted from the importer's package
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def project_imports(name: str, path: Path, known: dict[str, Path]) -> list[Import]:
    """The project modules `name` imports, each with its line; importing `a.b.c` imports `a` and `a.b` too
    (as tests/test_layers.py counts), the module itself and its own parent packages excluded."""
    found: dict[tuple[str, bool], Import] = {}
    for node, lazy in _walk_with_scope(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        for target in _imported_names(node, name, path, known):
            parts = target.split(".")
            for module in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
                if module in known and module != name and not name.startswith(module + "."):
                    found.setdefault((module, lazy), Import(name, module, node.lineno, lazy))
    return sorted(found.values(), key=lambda i: (i.line, i.target))


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while (top := stack.pop()) != node:
                component.append(top)
            component.append(node)
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def import_report(root: Path) -> dict[str, Any]:
    """The framework imports against the layer table (a back edge: importing a module of the same or a higher
    layer), and the import cycles among framework modules: of module-level imports alone, and those that need
    an import inside a function."""
    layers = documented_layers((root / "docs" / "architecture.md").read_text(encoding="utf-8"))
    known = {**module_files(root, "framework"), **module_files(root, "plugins")}
    edges = [
        edge
        for name, path in known.items()
        if name.startswith("framework")
        for edge in project_imports(name, path, known)
        if edge.target.startswith("framework")
    ]
    back = [
        e
        for e in edges
        if e.importer in layers
        and e.target in layers
        and layers[e.target] >= layers[e.importer]
        and not e.target.startswith(e.importer + ".")  # a package re-exports its own submodules
    ]
    module_level: dict[str, set[str]] = {}
    every: dict[str, set[str]] = {}
    for e in edges:
        every.setdefault(e.importer, set()).add(e.target)
        if not e.lazy:
            module_level.setdefault(e.importer, set()).add(e.target)
    static_cycles = strongly_connected(module_level)
    return {
        "layers_from": "docs/architecture.md (section 'The layers', as tests/test_layers.py reads it)",
        "unlayered_modules": sorted(m for m in known if m.startswith("framework") and m not in layers),
        "back_edge_count": len(back),
        "back_edges_module_level": [str(e) for e in back if not e.lazy],
        "back_edges_in_functions": [str(e) for e in back if e.lazy],
        "cycles_module_level": static_cycles,
        "cycles_through_function_level_imports": [c for c in strongly_connected(every) if c not in static_cycles],
    }


def functions(root: Path, packages: tuple[str, ...]) -> Iterator[tuple[str, str, Function]]:
    """`(file, qualified name, node)` of every function and method (nested ones too) under `packages`."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, Function]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                qualified = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    yield qualified, child
                yield from walk(child, qualified + ".")
            else:
                yield from walk(child, prefix)

    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            file = path.relative_to(root).as_posix()
            for qualified, node in walk(ast.parse(path.read_text(encoding="utf-8")), ""):
                yield file, qualified, node


def function_lines(node: Function) -> int:
    """A function's length in lines, decorators and docstring included."""
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return (node.end_lineno or node.lineno) - first + 1


def longest_functions(root: Path, top: int = 10) -> list[dict[str, Any]]:
    """The `top` longest functions and methods of framework/ and plugins/."""
    rows: list[dict[str, Any]] = [
        {"name": name, "file": file, "line": node.lineno, "lines": function_lines(node)}
        for file, name, node in functions(root, PROJECT_PACKAGES)
    ]
    return sorted(rows, key=lambda r: (-r["lines"], r["file"], r["name"]))[:top]


def names_recipe(annotation: ast.expr | None) -> bool:
    """Whether an annotation is `Recipe` (bare, `x.Recipe`, a "Recipe" string, or inside `| None`/`Optional`)."""
    if annotation is None:
        return False
    for node in ast.walk(annotation):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                if names_recipe(ast.parse(node.value, mode="eval").body):
                    return True
            except SyntaxError:
                continue
        if (isinstance(node, ast.Name) and node.id == "Recipe") or (
            isinstance(node, ast.Attribute) and node.attr == "Recipe"
        ):
            return True
    return False


def recipe_takers(root: Path) -> dict[str, Any]:
    """The framework functions with a parameter annotated `Recipe`; the hook specs apart (their signatures are
    the plugin contract, docs/plugins.md)."""
    takers: list[str] = []
    hookspecs: list[str] = []
    for file, name, node in functions(root, ("framework",)):
        a = node.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
        recipe_params = [p.arg for p in params if names_recipe(p.annotation)]
        if recipe_params:
            row = f"{file}:{node.lineno} {name}({', '.join(recipe_params)})"
            (hookspecs if file == "framework/hookspecs.py" else takers).append(row)
    return {"count": len(takers), "functions": takers, "hookspec_count": len(hookspecs), "hookspecs": hookspecs}


def code_lines(source: str) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring (module, class, function)."""
    tree = ast.parse(source)
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | Function) and ast.get_docstring(node, clean=False) is not None:
            first = node.body[0]
            docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstrings)


def is_hookimpl(decorator: ast.expr) -> bool:
    """`@hookimpl`, `@framework.hookimpl` or `@hookimpl(...)`."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Name) and target.id == "hookimpl") or (
        isinstance(target, ast.Attribute) and target.attr == "hookimpl"
    )


def plugin_concepts(path: Path) -> dict[str, Any]:
    """What a plugin file asks its author to know: its code lines, the names it imports from the project's
    packages, the hooks it implements, and the attributes it reads or writes on `ctx`, `cfg` and `config`."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    imports: dict[str, set[str]] = {}
    hooks: set[str] = set()
    attributes: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] in PROJECT_PACKAGES
        ):
            imports.setdefault(node.module or "", set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PROJECT_PACKAGES:
                    imports.setdefault(alias.name, set()).add("*module*")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(map(is_hookimpl, node.decorator_list)):
            hooks.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in CONTEXT_NAMES:
            attributes.add(f"{node.value.id}.{node.attr}")
    imported = {module: sorted(names) for module, names in sorted(imports.items())}
    names = sum(len(v) for v in imported.values())
    return {
        "file": path.name,
        "code_lines": code_lines(source),
        "imports": imported,
        "hooks": sorted(hooks),
        "attributes": sorted(attributes),
        "concept_count": names + len(hooks) + len(attributes),
    }


def report(root: Path, plugin: Path | None = None) -> dict[str, Any]:
    """Every figure of the module docstring for the checkout at `root` (and the plugin file `plugin`)."""
    out: dict[str, Any] = {
        "framework_import_back_edges": import_report(root),
        "longest_functions": longest_functions(root),
        "functions_taking_recipe": recipe_takers(root),
        "plugin_lines": {
            p.relative_to(root).as_posix(): code_lines(p.read_text(encoding="utf-8"))
            for p in sorted((root / "plugins").glob("*.py"))
        },
    }
    if plugin is not None:
        out["plugin"] = plugin_concepts(plugin)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    ap.add_argument("--plugin", type=Path, help="a plugin file whose code lines and concepts to report")
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    args = ap.parse_args()
    figures = report(args.root.resolve(), args.plugin)
    if args.out:
        write_report(figures, args.out)
    else:
        print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
