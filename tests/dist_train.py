"""Run by tests under `accelerate launch`: train a recipe and dump each rank's weights.

    accelerate launch --multi_gpu --num_processes 2 tests/dist_train.py RECIPE [key=value ...]

A plugin (through the public API) saves every rank's modules after the last step to
`<output_dir>/weights_rank<R>.pt`, so a test can check that the ranks agree.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework import distributed, hookimpl  # noqa: E402
from framework.engine import train  # noqa: E402
from framework.recipe import load_recipe  # noqa: E402


class DumpWeights:
    @hookimpl
    def on_train_step_end(self, modules, step, config):
        if step == config.train.steps:
            state = {k: v.detach().cpu().clone() for k, v in modules.named_parameters()}
            torch.save(state, Path(config.output_dir) / f"weights_rank{distributed.rank()}.pt")


if __name__ == "__main__":
    recipe, hooks = load_recipe(sys.argv[1], sys.argv[2:], extra_plugins={"dump": DumpWeights()})
    train(recipe, hooks)
