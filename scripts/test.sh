#!/usr/bin/env bash
# The test command of the README: bootstrap the venv, then the whole suite.
# CUDA kernels run on the CPU simulator here unless a real GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
