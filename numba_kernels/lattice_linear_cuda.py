"""Numba-CUDA kernels of the codec-v2 linear layer (``LatticeLinear``): the same
fixed-width form as :mod:`numba_kernels.lattice_linear_cpu` (int8 ``xt = 2m + (b & 1)``
and ``bt = b``, pair-major ``[P, out]``; float32 row steps; escapes).

* :func:`decode_t` (many tokens): one thread per (pair, row) writes ``W^T`` (float32
  ``[in, out]``, the layout torch's matmul takes as ``x @ W^T``) through float64, as
  ``V2Tensor.decode()`` and the CPU kernel do: the same bits. Reads of ``xt``/``bt`` and
  writes of ``W^T`` run along rows: coalesced. :func:`scatter_escapes` then writes
  the escaped weights (one thread each).
* :func:`fused` (``T <= MAX_TOKENS``): one thread per output row walks the row's
  pairs (consecutive threads read consecutive int8 coordinates: coalesced),
  accumulates every token in registers, scales by the row step, adds the row's
  escapes (CSR offsets ``esc_ptr``) and the bias. ``W`` never exists in memory.
  ``xe = x_even / 2`` and ``xo = x_odd * sqrt(3)/2`` come prepared (float32 ``[T, P]``).

Arrays are anything numba accepts as device arrays (torch CUDA tensors through
``__cuda_array_interface__``), or NumPy arrays under ``NUMBA_ENABLE_CUDASIM=1``,
which is how CI tests them.
"""

from __future__ import annotations

import math

from numba import float32, float64

from ._compat import import_cuda

cuda = import_cuda()

MAX_TOKENS = 16
H = 0.8660254037844386
BLOCK = (32, 8)  # (rows, pairs) per block of decode_t
ROWS_PER_BLOCK = 128  # threads per block of fused


# multiplies only, no add: nothing for the compiler to contract into an FMA, so the
# float64 products round exactly as on the CPU
@cuda.jit
def _decode_t_kernel(xt, bt, step, wt):
    i, j = cuda.grid(2)
    pairs = xt.shape[0]
    rows = xt.shape[1]
    n_in = wt.shape[0]
    if i < rows and j < pairs:
        s = float64(step[i])
        wt[2 * j, i] = float32(s * (0.5 * float64(xt[j, i])))
        if 2 * j + 1 < n_in:  # an odd ``in``: the last pair has no y
            wt[2 * j + 1, i] = float32(s * (H * float64(bt[j, i])))


@cuda.jit
def _escape_kernel(esc_row, esc_col, esc_val, wt):
    e = cuda.grid(1)
    if e < esc_row.shape[0]:
        wt[esc_col[e], esc_row[e]] = esc_val[e]


@cuda.jit
def _fused_kernel(xe, xo, xt, bt, step, esc_ptr, esc_col, esc_val, x, bias, has_bias, out):
    i = cuda.grid(1)
    rows = xt.shape[1]
    pairs = xt.shape[0]
    n_tok = xe.shape[0]
    acc = cuda.local.array(MAX_TOKENS, float32)
    if i < rows:
        for t in range(MAX_TOKENS):
            acc[t] = float32(0.0)
        for j in range(pairs):
            wx = float32(xt[j, i])
            wy = float32(bt[j, i])
            for t in range(n_tok):
                acc[t] = (acc[t] + xe[t, j] * wx) + xo[t, j] * wy
        s = step[i]
        for t in range(n_tok):
            v = s * acc[t]
            for e in range(esc_ptr[i], esc_ptr[i + 1]):
                v += x[t, esc_col[e]] * esc_val[e]
            if has_bias:
                v += bias[i]
            out[t, i] = v


def decode_t(xt, bt, step, esc_row, esc_col, esc_val, wt, stream=0) -> None:
    """``wt[:, i] = W[i]`` for every row (float32 ``[in, out]``)."""
    pairs, rows = xt.shape
    if rows == 0 or pairs == 0:
        return
    grid = (math.ceil(rows / BLOCK[0]), math.ceil(pairs / BLOCK[1]))
    _decode_t_kernel[grid, BLOCK, stream](xt, bt, step, wt)
    n_esc = esc_row.shape[0]
    if n_esc:
        _escape_kernel[math.ceil(n_esc / 128), 128, stream](esc_row, esc_col, esc_val, wt)


def fused(xe, xo, xt, bt, step, esc_ptr, esc_col, esc_val, x, bias, out, stream=0) -> None:
    """``out[t, i] = x[t] . W[i] (+ bias[i])`` for ``T <= MAX_TOKENS`` tokens; ``bias``
    a float32 ``[out]`` array or None."""
    n_tok = xe.shape[0]
    if n_tok > MAX_TOKENS:
        raise ValueError(f"fused takes at most {MAX_TOKENS} tokens, got {n_tok}")
    rows = xt.shape[1]
    if rows == 0 or n_tok == 0:
        return
    has_bias = 0 if bias is None else 1
    b = step if bias is None else bias  # an unread float32 stand-in
    _fused_kernel[math.ceil(rows / ROWS_PER_BLOCK), ROWS_PER_BLOCK, stream](
        xe, xo, xt, bt, step, esc_ptr, esc_col, esc_val, x, b, has_bias, out)
