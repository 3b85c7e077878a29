"""Evaluate a run: linear probe on the frozen encoder's pooled features vs raw pixels.

    python launch/evaluate.py runs/vae_fashionmnist [--checkpoint runs/.../checkpoints/step_N] [--encoder teacher]

Prints the test accuracy of both and writes <output_dir>/eval.json.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.cli import eval_main  # noqa: E402
from framework.distributed import ends_without_finalizing  # noqa: E402

if __name__ == "__main__":
    with ends_without_finalizing():  # a launch's process: no finalization (its docstring)
        eval_main(sys.argv[1:])
