"""Numba CPU kernels of HyperLinear (``compressor/hyperlinear.py``).

Two kernels, both reading the ``[out, ceil(in/2)]`` index matrix ``theta`` and the
decode tables of ``quant_primitives.decode_lut``:

* :func:`decode_rows` (serial, ``nogil``) gathers the weight ``W [out, in]`` into a caller-owned
  workspace. It moves *bit patterns*: the tables arrive already cast to the
  compute dtype and viewed as integers of the same width (int16 for fp16/bf16,
  int32 for fp32), so one kernel serves every dtype and ``W`` equals the
  table cast to that dtype, bit for bit. ``torch``'s matmul then does the product.
* :func:`fused_linear` computes ``y = x W^T`` for a few tokens without a ``W``
  workspace: each row of ``W`` is decoded into a small per-thread buffer (fits in
  L1) and dotted with every token. fp32 in, fp32 accumulate, fp32 out.

Indices are trusted here: HyperLinear validates ``theta < U*(K+1)`` once when it
is built, so the hot loops carry no bounds checks.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, boundscheck=False)
def decode_rows(theta, lut_x, lut_y, out):
    """``out[i, 2j] = lut_x[theta[i, j]]``, ``out[i, 2j+1] = lut_y[theta[i, j]]``;
    an odd ``in`` drops the last y (the codec's padding).

    Serial and GIL-free: callers split the rows over threads (HyperLinear uses a
    small thread pool). A ``prange`` version measured 12 ms instead of 0.3 ms per
    call with numba's ``omp`` layer next to torch's own OpenMP pool on 2 cores
    (two spinning runtimes), so the kernel stays out of numba's threading layer."""
    rows = theta.shape[0]
    n_in = out.shape[1]
    full = n_in // 2
    odd = n_in - 2 * full
    for i in range(rows):
        t_row = theta[i]
        o_row = out[i]
        for j in range(full):
            t = np.int64(t_row[j])
            o_row[2 * j] = lut_x[t]
            o_row[2 * j + 1] = lut_y[t]
        if odd:
            o_row[n_in - 1] = lut_x[np.int64(t_row[full])]


@njit(parallel=True, cache=True, nogil=True, fastmath=True, boundscheck=False)
def fused_linear(x, theta, lut_x, lut_y, out):
    """``out[t, i] = sum_c x[t, c] * W[i, c]`` with ``W`` decoded row by row.

    ``x``: float32 ``[T, in]``; ``lut_*``: float32; ``out``: float32 ``[T, out]``.
    ``fastmath`` lets the dot products vectorize (reassociation only; the result
    stays within fp32 rounding of the exact sum)."""
    n_tok = x.shape[0]
    n_in = x.shape[1]
    rows = theta.shape[0]
    full = n_in // 2
    odd = n_in - 2 * full
    for i in prange(rows):
        w = np.empty(n_in, dtype=np.float32)
        t_row = theta[i]
        for j in range(full):
            t = np.int64(t_row[j])
            w[2 * j] = lut_x[t]
            w[2 * j + 1] = lut_y[t]
        if odd:
            w[n_in - 1] = lut_x[np.int64(t_row[full])]
        for tok in range(n_tok):
            xr = x[tok]
            acc = np.float32(0.0)
            for c in range(n_in):
                acc += xr[c] * w[c]
            out[tok, i] = acc
