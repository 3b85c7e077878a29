#!/usr/bin/env bash
# Set up a fresh machine for augssl (idempotent; seconds when already done):
#   - Fashion-MNIST's idx files (Debian package dataset-fashion-mnist, 30 MB)
#   - a virtual environment in .venv with torch 2.14.1 / torchvision 0.29.1, augssl and its
#     dependencies (editable), pytest, lightly (the losses' test oracle, --no-deps), and DeepSpeed
#     (pure-Python ops only: DS_BUILD_OPS=0).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e ".[dev]"
# The test oracle for the losses (tests/test_loss_oracle.py): lightly's loss modules import only torch,
# torchvision, numpy, PIL and tqdm, all installed above; --no-deps keeps its trainer's dependencies
# (pytorch-lightning, hydra-core) out, and with them any chance of pip replacing torch.
python -m pip install -q --no-deps "lightly==1.6.0"
python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
