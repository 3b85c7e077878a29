"""Run by tests under `accelerate launch`: stream one epoch on every rank, write the keys seen.

accelerate launch --multi_gpu --num_processes 2 tests/dist_keys.py SHARDS OUT_DIR
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402

from framework.data import make_loader  # noqa: E402
from framework.distributed import cpu_only_multiprocess  # noqa: E402
from framework.testing import data_section  # noqa: E402
from framework.types import View  # noqa: E402
from framework.views import FASHION_MNIST_STATS, clean_view  # noqa: E402

if __name__ == "__main__":
    accelerator = Accelerator(cpu=cpu_only_multiprocess())
    views = {"x": View(clean_view(28, *FASHION_MNIST_STATS, channels=1))}
    loader = make_loader(
        data_section(sys.argv[1], batch_size=5, num_workers=2, shuffle_buffer=10),
        views,
        seed=11,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        epochs=1,
    )
    keys = [k for batch in loader for k in batch["key"]]
    out = Path(sys.argv[2]) / f"keys_rank{accelerator.process_index}.json"
    out.write_text(json.dumps({"world_size": accelerator.num_processes, "keys": keys}))
