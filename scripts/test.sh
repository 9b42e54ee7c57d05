#!/usr/bin/env bash
# The test command of the README: bootstrap the venv, then the whole suite, then the
# CPU kernel tests again with 1, 2 and 3 codec threads, each built for another
# x86-64 vector width (issue 10: a kernel's last bit depended on the row split only
# on AVX2 machines, and CI ran on an AVX-512 one). With arguments: only pytest "$@".
# CUDA kernels run on the CPU simulator here unless a real GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
# Without a GPU the CUDA kernels run on Numba's simulator (numba reads this at import).
if ! nvidia-smi -L >/dev/null 2>&1; then
  export NUMBA_ENABLE_CUDASIM=1
fi
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
python -m pytest -q

KERNEL_TESTS=(tests/numba_kernels/test_cpu_kernels.py tests/numba_kernels/test_hyperlinear_kernels.py)
# Numba compiles for the host CPU unless NUMBA_CPU_NAME names another; every target
# below runs on any machine that has its features: x86-64 (SSE2) everywhere, haswell
# (AVX2 + FMA) where the CPU has both. The host's own build (AVX-512 here) ran above.
targets=("" "x86-64")
if [ "$(uname -m)" = x86_64 ] && grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo; then
  targets=("haswell" "x86-64" "")
fi
i=0
for threads in 1 2 3; do
  cpu=${targets[$((i % ${#targets[@]}))]}
  i=$((i + 1))
  echo "== CPU kernel tests: NUMBA_NUM_THREADS=$threads, target ${cpu:-host}"
  if [ -n "$cpu" ]; then
    # features follow the CPU name, not the host (numba otherwise adds the host's)
    NUMBA_NUM_THREADS=$threads NUMBA_CPU_NAME=$cpu NUMBA_CPU_FEATURES="" \
      python -m pytest -q -p no:cacheprovider "${KERNEL_TESTS[@]}"
  else
    NUMBA_NUM_THREADS=$threads python -m pytest -q -p no:cacheprovider "${KERNEL_TESTS[@]}"
  fi
done
