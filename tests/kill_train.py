"""Run by tests: train a recipe in this process and die with SIGKILL after step K's update.

    python tests/kill_train.py RECIPE KILL_AT [key=value ...]      (KILL_AT 0: never)

The kill comes from `on_train_step_end` at step K, before the engine writes checkpoint K,
exactly as a preempted node dies: no clean-up, no `finally`. Weights are dumped by
tests/dist_train.py's plugin after the last step, so a test can compare a killed and
resumed run with an uninterrupted one.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework import hookimpl  # noqa: E402
from framework.engine import train  # noqa: E402
from framework.recipe import load_recipe  # noqa: E402
from tests.dist_train import DumpWeights  # noqa: E402


class KillAt:
    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_train_step_end(self, modules, step, config):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    recipe_path, kill_at, *overrides = sys.argv[1:]
    plugins = {"dump": DumpWeights(), "kill": KillAt(int(kill_at))}
    recipe, hooks = load_recipe(recipe_path, overrides, extra_plugins=plugins)
    train(recipe, hooks)
