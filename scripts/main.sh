#!/usr/bin/env bash
# The main job on a fresh machine (about 12 minutes on 2 CPU cores): set up, write
# Fashion-MNIST shards, pretrain a VAE and an AAVAE with the same encoder, steps and seed,
# then print the linear-probe accuracy of each beside the same classifier on raw pixels.
#   bash scripts/main.sh                     # recipes/{vae,aavae}_fashionmnist.yaml
#   bash scripts/main.sh train.steps=3000    # overrides apply to both runs
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

for split in train test; do
  [ -f "data/fashion-mnist/$split.json" ] || \
    augssl shards fashion-mnist --split "$split" --out "data/fashion-mnist/$split-%06d.tar" --maxcount 5000
done

for method in vae aavae; do
  SECONDS=0
  python launch/train.py "recipes/${method}_fashionmnist.yaml" "$@"
  echo "${method}: pretraining took ${SECONDS}s"
done
python launch/evaluate.py runs/vae_fashionmnist runs/aavae_fashionmnist
