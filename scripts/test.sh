#!/usr/bin/env bash
# Run augssl's test suite on a fresh machine (sets it up first): bash scripts/test.sh [pytest args]
# First the style checks (ruff lint and format; mypy runs in the slow tier, tests/test_typing.py), then two
# tiers, each given the arguments: the fast one (-m "not slow": in-process tests, about a minute) first,
# then the slow one (-m slow: multi-process and end-to-end runs). Prints each tier's wall time; fails if
# any step fails (a tier the arguments leave empty is not a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export AUGSSL_REQUIRE_ORACLES=1  # setup.sh installed lightly: its loss comparisons must run, never skip

failed=0
SOURCES=(framework plugins tests benchmarks launch examples/augssl-rotation/augssl_rotation.py)
python -m ruff check -q "${SOURCES[@]}" || failed=1
python -m ruff format -q --check "${SOURCES[@]}" || failed=1
for tier in "not slow" "slow"; do
  start=$SECONDS
  status=0
  python -m pytest -q -m "$tier" "$@" tests || status=$?
  echo "augssl: test tier -m \"$tier\": $((SECONDS - start)) s (exit $status)"
  [ "$status" -eq 0 ] || [ "$status" -eq 5 ] || failed=1  # 5: no test selected
done
exit "$failed"
