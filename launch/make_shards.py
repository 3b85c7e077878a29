"""Convert a dataset to WebDataset shards (same as `augssl shards`).

python launch/make_shards.py fashion-mnist --split train --out data/fashion-mnist/train-%06d.tar
python launch/make_shards.py cifar10 /data/cifar --split test --out data/cifar10/test-%06d.tar --maxcount 2000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.cli import shards_main  # noqa: E402

if __name__ == "__main__":
    shards_main(sys.argv[1:])
