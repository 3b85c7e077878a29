"""Run under `accelerate launch`: extract a trained run's eval features; rank 0 saves them.

python tests/dist_extract.py RUN_DIR OUT.pt
"""

import sys
from pathlib import Path

import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.checkpoint import load_run  # noqa: E402
from framework.eval import extract  # noqa: E402

if __name__ == "__main__":
    model, recipe, _ = load_run(sys.argv[1])
    features = extract(model, recipe.eval.train, recipe.data, batch_size=16, num_workers=2)
    capped = extract(model, recipe.eval.test, recipe.data, batch_size=16, num_workers=2, max_samples=40)
    if PartialState().is_main_process:
        torch.save({"train": features, "capped": capped}, sys.argv[2])
    torch.distributed.destroy_process_group()  # as augssl eval does: gloo may abort an exit with it up
