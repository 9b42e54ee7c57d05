#!/usr/bin/env bash
# Issue 9's concurrency acceptance in full: two zoo runs (`ray job submit`) on one
# store at once, with different plans (--workers 1 against 2) and with the same
# plan, on a local folder and on SeaweedFS S3, N trials each (default 10); then a
# damaged checkpoint is repaired, a rerun skips without writing, and --force keeps
# a readable checkpoint throughout. CI runs the same test with one trial per case.
#   bash scripts/race_trials.sh [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
if ! nvidia-smi -L >/dev/null 2>&1; then
  export NUMBA_ENABLE_CUDASIM=1
fi
export BIRKHOFF_RACE_TRIALS="${1:-10}"
exec python -m pytest -q -s tests/workflows/test_commit_races.py -k race_on_one_store
