#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in three parts that each fit one
# 10-minute device call. GPUs are lent to some sessions only, for 30 minutes, so
# this script is the plan for spending them: run it there, paste the tables into
# docs/BENCHMARKS.md with the device and the date.
#
#   bash benchmarks/gpu_session.sh check  OUTDIR   # env, real-GPU tests of the CUDA kernels and HyperLinear
#   bash benchmarks/gpu_session.sh layers OUTDIR   # HyperLinear and LatticeLinear vs torch, SAM shapes, bf16 (+ fp16)
#   bash benchmarks/gpu_session.sh models OUTDIR   # encoder end to end, SAM ViT-B codec, eval images/s
#
# It uses the machine's own python3 (torch, numba-cuda, transformers are there) with
# this checkout on PYTHONPATH; nothing is installed. Each step logs to OUTDIR/<step>.log
# and a failing step does not stop the next.
set -uo pipefail
part=${1:?part: check, layers or models}
out=${2:?output folder}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*" | tee "$out/$name.log"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$out/$name.log"
}

case "$part" in
check)
    step env 60 bash -c "nvidia-smi -L; date -u; $py -c 'import sys, numpy, torch, numba; \
from numba_kernels._compat import import_cuda; cuda = import_cuda(); import numba_cuda; \
print(sys.version.split()[0], \"numpy\", numpy.__version__, \"torch\", torch.__version__, \"numba\", numba.__version__, \
\"numba-cuda\", numba_cuda.__version__, \"gpu\", cuda.is_available())'"
    # the CUDA kernel tests run on the real GPU when NUMBA_ENABLE_CUDASIM is unset
    step tests 420 env -u NUMBA_ENABLE_CUDASIM "$py" -m pytest -q -p no:cacheprovider \
        tests/numba_kernels/test_cuda_kernels.py tests/numba_kernels/test_hyperlinear_kernels_cuda.py \
        tests/numba_kernels/test_kernels_compat.py tests/numba_kernels/test_lattice_linear_cuda.py \
        tests/compressor/test_hyperlinear.py -k "not simulator"
    ;;
layers)
    step layers_bf16 330 "$py" benchmarks/bench_hyperlinear.py --device cuda --dtype bf16 --pipelined --graphs
    step layers_fp16 120 "$py" benchmarks/bench_hyperlinear.py --device cuda --dtype fp16 --tokens 1,16,4096 \
        --shapes 768x2304,1280x5120 --pipelined
    step layers_fp32 120 "$py" benchmarks/bench_hyperlinear.py --device cuda --dtype fp32 --tokens 1,16,4096 \
        --shapes 768x2304 --pipelined
    # codec v2's LatticeLinear (issue 12: bf16 at 4096 tokens <= 1.25x torch, 1 token no slower)
    step lattice_bf16 100 "$py" benchmarks/bench_lattice_linear.py --device cuda --dtype bf16 \
        --shapes 768x2304,3072x768 --tokens 1,16,4096
    ;;
models)
    step encoder_bf16 200 "$py" benchmarks/bench_hyperlinear.py --device cuda --dtype bf16 --encoder-only \
        --encoder-repeats 10
    step encoder_fp32 150 "$py" benchmarks/bench_hyperlinear.py --device cuda --dtype fp32 --encoder-only \
        --encoder-repeats 5
    sam=$(mktemp -d)/sam-vit-b
    "$py" -c "import sys, torch; from transformers import SamConfig, SamModel; torch.manual_seed(0); \
SamModel(SamConfig()).save_pretrained(sys.argv[1])" "$sam"
    step codec_sam 150 "$py" benchmarks/bench_codec.py "$sam" --points 1600 --backends numba-cuda,numba-cpu
    step eval_cuda 100 "$py" benchmarks/bench_eval.py --images 3 --device cuda
    ;;
*)
    echo "unknown part $part (check, layers, models)" >&2
    exit 2
    ;;
esac
