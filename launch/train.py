"""Pretrain from a recipe.

    python launch/train.py recipes/vae_fashionmnist.yaml [key.path=value ...]
    accelerate launch launch/train.py recipes/aavae_stl10.yaml optim.lr=5e-4

Runs as one process under `python`, or as every process of an `accelerate launch`
(DDP or DeepSpeed, one node or many). See README.md for the multi-GPU commands.
With `AUGSSL_EXIT_STATUS_FILE` set, rank 0 writes its exit status there (75: stopped on a
signal after a checkpoint), which `accelerate launch` does not pass on: see
launch/slurm/pretrain.sbatch.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from framework.cli import train_main  # noqa: E402
from framework.distributed import ends_without_finalizing  # noqa: E402
from framework.preemption import exit_status_file  # noqa: E402

if __name__ == "__main__":
    with ends_without_finalizing(), exit_status_file():  # a launch's process: no finalization (its docstring)
        train_main(sys.argv[1:])
