"""Run by tests/test_checkpoints.py under `accelerate launch`: train a recipe, then dump the
model as the training engine holds it.

    accelerate launch --use_deepspeed --num_processes 2 tests/dist_dump.py RECIPE [key=value ...]

After the last step every rank writes `<output_dir>/state_rank<R>.pt`: `{"state": the model's
state dict (parameters and buffers, the names of `model.safetensors`), "local_numel": the
parameter elements this rank held before gathering, "rng": its torch RNG state}`. Under ZeRO-3
each rank holds a shard of every parameter, so they are gathered (a collective) for the dump.
The dumper is registered beside the recipe's plugins, not in the recipe, so `augssl eval` and
`augssl export` read the run.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework import distributed, hookimpl  # noqa: E402
from framework.engine import train  # noqa: E402
from framework.startup import load_recipe  # noqa: E402


class DumpState:
    @hookimpl
    def on_train_step_end(self, modules, step, config):
        if step != config.train.steps:
            return
        local = sum(getattr(p, "ds_tensor", p).numel() for p in modules.parameters())  # ZeRO-3: this rank's shard
        with distributed.full_parameters(modules):
            state = {f"plugins.{k}": v.detach().cpu().clone() for k, v in modules.state_dict().items()}
        dump = {"state": state, "local_numel": local, "rng": torch.get_rng_state()}
        torch.save(dump, Path(config.output_dir) / f"state_rank{distributed.rank()}.pt")


if __name__ == "__main__":
    recipe, hooks = load_recipe(sys.argv[1], sys.argv[2:])
    hooks.pm.register(DumpState(), name="dump")  # not a recipe plugin: the run's recipe stays evaluable
    with distributed.ends_without_finalizing():  # as launch/train.py
        train(recipe, hooks)
