#!/usr/bin/env bash
# The test command of the README: bootstrap the venv, then the whole suite.
# CUDA kernels run on the CPU simulator here unless a real GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
# Without a GPU the CUDA kernels run on Numba's simulator (numba reads this at import).
if ! nvidia-smi -L >/dev/null 2>&1; then
  export NUMBA_ENABLE_CUDASIM=1
fi
exec python -m pytest -q "$@"
