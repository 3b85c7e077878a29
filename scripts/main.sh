#!/usr/bin/env bash
# The main job on a fresh machine: set up, write Fashion-MNIST shards, pretrain the recipe's
# model on the CPU, then evaluate it with a linear probe beside raw pixels.
#   bash scripts/main.sh                      # recipes/vae_fashionmnist.yaml
#   bash scripts/main.sh train.steps=3000     # any recipe override
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

for split in train test; do
  [ -f "data/fashion-mnist/$split.json" ] || \
    augssl shards fashion-mnist --split "$split" --out "data/fashion-mnist/$split-%06d.tar" --maxcount 5000
done

SECONDS=0
python launch/train.py recipes/vae_fashionmnist.yaml "$@"
echo "pretraining took ${SECONDS}s"
python launch/evaluate.py runs/vae_fashionmnist
