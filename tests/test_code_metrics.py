"""benchmarks/code_metrics.py, the figures of issue 22's closing note: it runs on the repository, and an import
against the layer table planted in a copy of it is reported as a back edge and a cycle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from benchmarks.code_metrics import report
from tests.helpers import ENV, ROOT


def test_the_report_on_the_repository_has_every_figure(tmp_path):
    out = tmp_path / "metrics.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "code_metrics.py"), "--plugin", "plugins/kl.py", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    figures = json.loads(out.read_text())
    imports = figures["framework_import_back_edges"]
    assert imports["back_edge_count"] == len(imports["back_edges_module_level"]) + len(
        imports["back_edges_in_functions"]
    )
    assert len(figures["longest_functions"]) == 10
    assert all(
        f["file"].startswith(("framework/", "plugins/")) and f["lines"] > 0 for f in figures["longest_functions"]
    )
    recipe = figures["functions_taking_recipe"]
    assert recipe["count"] == len(recipe["functions"]) > 0 and recipe["hookspec_count"] > 0
    assert figures["plugin_lines"]["plugins/kl.py"] == figures["plugin"]["code_lines"] > 0
    assert "hookimpl" in figures["plugin"]["imports"]["framework"] and "regularize" in figures["plugin"]["hooks"]


def test_a_planted_lazy_import_against_the_layers_is_a_back_edge_and_a_cycle(tmp_path):
    for part in ("framework", "plugins", "docs"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    errors = tmp_path / "framework" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef planted():\n    import framework.engine\n")
    line = len(errors.read_text().splitlines())
    imports = report(tmp_path)["framework_import_back_edges"]
    assert imports["back_edges_in_functions"] == [f"framework.errors -> framework.engine ({line})"]
    assert not imports["cycles_module_level"]
    assert any(
        {"framework.errors", "framework.engine"} <= set(c) for c in imports["cycles_through_function_level_imports"]
    )
