"""Run by tests: train a recipe in this process and die with SIGKILL after step K's update.

    python tests/kill_train.py RECIPE KILL_AT [key=value ...]      (KILL_AT 0: never)
    AUGSSL_TEST_SIGNAL=TERM python tests/kill_train.py ...         (another signal: TERM, INT, USR1)
    AUGSSL_TEST_SLOW_STOP=S ...                                     (the step after K ends S seconds late)

The kill comes from `on_train_step_end` at step K, before the engine writes checkpoint K,
exactly as a preempted node dies: no clean-up, no `finally`. Weights are dumped by
tests/helpers.py's `DumpWeights` after the last step, so a test can compare a killed and
resumed run with an uninterrupted one.
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework import hookimpl  # noqa: E402
from framework.cli import train_or_exit  # noqa: E402
from framework.startup import load_recipe  # noqa: E402
from tests.helpers import DumpWeights  # noqa: E402


class KillAt:
    def __init__(self, step: int, signum: int, slow_stop: float) -> None:
        self.step, self.signum, self.slow_stop = step, signum, slow_stop

    @hookimpl
    def on_train_step_end(self, modules, step, config):
        if step == self.step + 1 and self.slow_stop:  # a run slow to stop: a big checkpoint, a slow disk
            time.sleep(self.slow_stop)
        if step == self.step and self.signum == signal.SIGKILL:
            os.kill(os.getpid(), signal.SIGKILL)
        elif step == self.step:  # as a terminal's Ctrl-C or a job manager does: the whole process group
            os.killpg(os.getpgid(0), self.signum)


if __name__ == "__main__":
    recipe_path, kill_at, *overrides = sys.argv[1:]
    signum = getattr(signal, "SIG" + os.environ.get("AUGSSL_TEST_SIGNAL", "KILL"))
    slow_stop = float(os.environ.get("AUGSSL_TEST_SLOW_STOP", 0))
    plugins = {"dump": DumpWeights(), "kill": KillAt(int(kill_at), signum, slow_stop)}
    recipe, hooks = load_recipe(recipe_path, overrides, extra_plugins=plugins)
    train_or_exit(recipe, hooks)
