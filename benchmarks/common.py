"""What every benchmark shares: the repository root and writing its JSON report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def write_report(report: dict[str, Any], out: str | Path) -> None:
    """Write `report` as indented JSON to `out` (folders made) and print it."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
