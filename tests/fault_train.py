"""Run by tests/test_faults_checkpoints.py: `augssl train` (the CLI: one line and exit 2 on a
CheckpointError) with a disk that fills up while checkpoint K is written.

    python tests/fault_train.py FULL_AT RECIPE [key=value ...]      (FULL_AT 0: never)

From step K's `on_train_step_end` on, every file Accelerate's `save_state` writes gets a few
bytes and then OSError(ENOSPC), as on a full disk.
"""

import errno
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import framework.startup  # noqa: E402
from framework import hookimpl  # noqa: E402
from framework.cli import train_main  # noqa: E402


class DiskFullAt:
    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_train_step_end(self, modules, step, config):
        if step == self.step:
            import accelerate.checkpointing

            def full(obj, f, *args, **kwargs):
                Path(f).write_bytes(b"\0" * 100)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

            accelerate.checkpointing.save = full


if __name__ == "__main__":
    full_at, *argv = sys.argv[1:]
    load = framework.startup.load_recipe
    framework.startup.load_recipe = lambda *a, **k: load(*a, **k, extra_plugins={"disk": DiskFullAt(int(full_at))})
    train_main(argv)
