#!/usr/bin/env bash
# Run augssl's test suite on a fresh machine (sets it up first): bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest -q "$@" tests
