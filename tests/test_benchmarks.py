"""The benchmark scripts that CI cannot measure still run: the GPU benchmark's CPU smoke mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_distributed import ROOT


@pytest.mark.slow
def test_the_gpu_benchmark_runs_end_to_end_in_its_cpu_smoke_mode(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--cpu-smoke", "--steps", "2",
           "--workers", "1", "--models", "simclr_resnet18_32px", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
    result = json.loads(out.read_text())["results"]["simclr_resnet18_32px/ddp"]
    assert "error" not in result, result
    assert result["images_per_second"] > 0 and result["batch_per_gpu"] == 4
