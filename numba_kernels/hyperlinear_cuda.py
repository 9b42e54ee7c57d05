"""Numba-CUDA kernels of HyperLinear (``compressor/hyperlinear.py``).

* :func:`decode_rows` (large token counts): one thread per index decodes the two
  weights of ``theta[i, j]`` into a workspace ``W [out, in]``; torch's matmul
  (tensor cores in fp16/bf16) then does the product. The tables arrive already cast
  to the compute dtype and viewed as same-width integers, so the kernel copies
  bit patterns: one kernel for fp32, fp16 and bf16 (numba has no bf16 type), and
  ``W`` equals the table cast to that dtype exactly.
* :func:`fused_linear` (small token counts, ``T <= MAX_TOKENS``): one warp per
  output row walks the row's indices, decodes each pair of weights in registers
  (tables read through the L1 cache) and accumulates every token at once; a
  shared-memory pass sums the 32 lane partials per token (a shuffle would do, but
  the CUDA simulator CI runs lacks ``shfl_down_sync``). ``W`` never exists in memory. fp32 in,
  fp32 accumulate, fp32 out (the caller casts fp16/bf16 around it; with ``T``
  small that costs two tiny element-wise kernels).

Every array argument is anything numba accepts as a device array: numba device
arrays, torch CUDA tensors (``__cuda_array_interface__``), or NumPy arrays under
``NUMBA_ENABLE_CUDASIM=1`` (how CI tests these kernels). ``stream`` is a numba
stream (use ``cuda.external_stream(torch.cuda.current_stream().cuda_stream)`` so
the kernels order correctly against torch's work) or 0.
"""

from __future__ import annotations

import math

from numba import float32, int64

from ._compat import import_cuda

cuda = import_cuda()

MAX_TOKENS = 16  # per-thread accumulators of the fused kernel
WARPS_PER_BLOCK = 4
DECODE_BLOCK = (64, 4)  # (index columns, rows) per block


@cuda.jit
def _decode_rows_kernel(theta, lut_x, lut_y, out):
    j, i = cuda.grid(2)
    rows = theta.shape[0]
    pairs = theta.shape[1]
    n_in = out.shape[1]
    if i < rows and j < pairs:
        t = int64(theta[i, j])
        c = 2 * j
        out[i, c] = lut_x[t]
        if c + 1 < n_in:  # an odd ``in`` drops the padded y
            out[i, c + 1] = lut_y[t]


@cuda.jit
def _fused_linear_kernel(x, theta, lut_x, lut_y, out):
    lane = cuda.threadIdx.x % 32
    warp = cuda.threadIdx.x // 32
    row = cuda.blockIdx.x * WARPS_PER_BLOCK + warp
    rows = theta.shape[0]
    pairs = theta.shape[1]
    n_tok = x.shape[0]
    n_in = x.shape[1]
    # lane partial sums; stride 33 keeps the column reads below free of bank conflicts
    part = cuda.shared.array((WARPS_PER_BLOCK, MAX_TOKENS, 33), float32)
    acc = cuda.local.array(MAX_TOKENS, float32)
    for t in range(MAX_TOKENS):
        acc[t] = float32(0.0)
    if row < rows:
        for j in range(lane, pairs, 32):  # a warp reads 32 consecutive indices: coalesced
            th = int64(theta[row, j])
            wx = lut_x[th]
            c = 2 * j
            if c + 1 < n_in:
                wy = lut_y[th]
                for t in range(n_tok):
                    acc[t] += x[t, c] * wx + x[t, c + 1] * wy
            else:  # odd ``in``: the padded y is never used
                for t in range(n_tok):
                    acc[t] += x[t, c] * wx
    for t in range(n_tok):
        part[warp, t, lane] = acc[t]
    cuda.syncthreads()  # every thread reaches it: no early return above
    if row < rows and lane < n_tok:
        s = float32(0.0)
        for l in range(32):
            s += part[warp, lane, l]
        out[lane, row] = s


def decode_rows(theta, lut_x, lut_y, out, stream=0) -> None:
    """``out[i, 2j] = lut_x[theta[i, j]]``, ``out[i, 2j+1] = lut_y[theta[i, j]]``
    (same-width integer views of the compute dtype; see the module docstring)."""
    rows, pairs = theta.shape
    if rows == 0 or pairs == 0:
        return
    bx, by = DECODE_BLOCK
    grid = (math.ceil(pairs / bx), math.ceil(rows / by))
    _decode_rows_kernel[grid, DECODE_BLOCK, stream](theta, lut_x, lut_y, out)


def fused_linear(x, theta, lut_x, lut_y, out, stream=0) -> None:
    """``out[t, i] = sum_c x[t, c] * W[i, c]`` for ``T <= MAX_TOKENS`` tokens
    (``x``, tables and ``out`` float32)."""
    n_tok = x.shape[0]
    if n_tok > MAX_TOKENS:
        raise ValueError(f"fused_linear takes at most {MAX_TOKENS} tokens, got {n_tok}")
    rows = theta.shape[0]
    if rows == 0 or n_tok == 0:
        return
    grid = math.ceil(rows / WARPS_PER_BLOCK)
    _fused_linear_kernel[grid, 32 * WARPS_PER_BLOCK, stream](x, theta, lut_x, lut_y, out)


def is_simulator() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)
