#!/usr/bin/env bash
# What only a CUDA device can check, in one command, within 8 minutes on one GPU:
#   bash scripts/gpu_check.sh        -> benchmarks/results/gpu/{tests.xml,gpu_throughput.json,augment_throughput.json}
# 1. the tests marked `gpu` (they skip elsewhere), 2. benchmarks/gpu_throughput.py (1 GPU, short runs),
# 3. benchmarks/augment_throughput.py on CUDA (eager and compiled). Each step has its own time limit; the script
# goes on after a failed or timed-out step, prints each step's status and wall time, and fails if any step did.
# Without a CUDA device it says so and exits 0. Uses .venv when there is one (scripts/setup.sh makes it).
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "augssl gpu_check: no GPU (torch sees no CUDA device): nothing to check here"
  exit 0
fi
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
python -c "import torch; print('augssl gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

failed=0
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, report its status and wall time
  local name=$1 limit=$2 start=$SECONDS status=0
  shift 2
  timeout --kill-after=10 "$limit" "$@" || status=$?
  [ "$status" -eq 124 ] && echo "augssl gpu_check: $name ran past its ${limit} s limit"
  echo "augssl gpu_check: $name: exit $status, $((SECONDS - start)) s"
  [ "$status" -eq 0 ] || failed=1
}

step "tests -m gpu" 140 python -m pytest -q -m gpu --junitxml="$OUT/tests.xml" tests
step "gpu_throughput" 230 python benchmarks/gpu_throughput.py --gpus 1 --steps 30 --out "$OUT/gpu_throughput.json"
step "augment_throughput" 90 python benchmarks/augment_throughput.py --images 100 --repeats 1 --batch 256 \
  --device cuda --out "$OUT/augment_throughput.json"
exit "$failed"
