"""Numba CPU kernels of HyperLinear (``compressor/hyperlinear.py``).

Two kernels, both reading the ``[out, ceil(in/2)]`` index matrix ``theta`` and the
decode tables of ``quant_primitives.decode_lut``:

* :func:`decode_rows` (serial, ``nogil``) gathers the weight ``W [out, in]`` into a caller-owned
  workspace. It moves *bit patterns*: the tables arrive already cast to the
  compute dtype and viewed as integers of the same width (int16 for fp16/bf16,
  int32 for fp32), so one kernel serves every dtype and ``W`` equals the
  table cast to that dtype, bit for bit. ``torch``'s matmul then does the product.
* :func:`fused_rows` (serial, ``nogil``, explicit signatures) computes
  ``y[:, r0:r1] = x W[r0:r1]^T + b`` for a few tokens without a ``W`` workspace,
  decoding blocks of rows through an interleaved pair table (:func:`pair_table`).
  HyperLinear's CPU path for <= ``CPU_FUSED_MAX_TOKENS`` tokens, one row range per
  thread of its small thread pool. fp32 in, fp32 accumulate, fp32 out.

Neither uses ``prange``: next to torch's OpenMP pool on 2 cores a ``prange`` version
of the product was many times slower per call (two spinning runtimes; figures in
docs/BENCHMARKS.md), so the threads are a small Python pool over GIL-free kernels.

Indices are trusted here: HyperLinear validates ``theta < U*(K+1)`` once when it
is built, so the hot loops carry no bounds checks.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, boundscheck=False)
def decode_rows(theta, lut_x, lut_y, out):
    """``out[i, 2j] = lut_x[theta[i, j]]``, ``out[i, 2j+1] = lut_y[theta[i, j]]``;
    an odd ``in`` drops the last y (the codec's padding).

    Serial and GIL-free: callers split the rows over threads (HyperLinear uses a
    small thread pool). A ``prange`` version was many times slower with numba's
    ``omp`` layer next to torch's own OpenMP pool on 2 cores (two spinning
    runtimes), so the kernel stays out of numba's threading layer."""
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


_FUSED_ROWS_SIGS = [
    "void(float32[:, ::1], {0}[:, ::1], int64[::1], float32[::1], float32[:, ::1], int64, int64)".format(t)
    for t in ("uint16", "int32")
]
ROW_BLOCK = 4  # rows decoded together: one load of x feeds ROW_BLOCK multiply-adds


@njit(_FUSED_ROWS_SIGS, cache=True, nogil=True, fastmath=True, boundscheck=False)
def fused_rows(x, theta, lut_xy, bias, out, r0, r1):
    """``out[t, i] = sum_c x[t, c] * W[i, c] (+ bias[i])`` for rows ``r0 <= i < r1``.

    Serial and GIL-free (no ``prange``): HyperLinear splits the rows over its small
    Python thread pool, as for :func:`decode_rows`. ``lut_xy`` is the pair table:
    float32 ``(lut_x[k], lut_y[k])`` interleaved and viewed as one int64 per code
    (:func:`pair_table`), so decoding a pair of weights is one 8-byte load and one
    store (half the cost of two tables). ``ROW_BLOCK`` rows of ``W`` are decoded
    into a small buffer (L1-sized), then each decoded block is used for every
    token, four rows per load of ``x``.

    ``x``: float32 ``[T, in]``; ``bias``: float32 ``[out]`` or empty (no bias);
    ``out``: float32 ``[T, out]``, only columns ``r0:r1`` written. fp32
    accumulation; ``fastmath`` lets LLVM reassociate the sums to vectorize them.

    Same bits for any row split (so for any thread count): every row, wherever it
    falls in ``r0:r1``, goes through the one four-row loop below. A last block of
    fewer rows repeats its last row in the unused slots and stores only its own
    rows. (An earlier version summed such rows in a separate one-row loop; LLVM
    vectorized the two loops' reductions with different widths and interleaving
    on AVX2 targets, so a row's last bit depended on its place in the split.) The
    order LLVM picks still depends on the target's vector width, so two CPUs may
    differ in the last bits; one machine never does, whatever the split.
    """
    n_tok = x.shape[0]
    n_in = x.shape[1]
    pairs = theta.shape[1]
    stride = 2 * pairs
    has_bias = bias.shape[0] > 0
    w64 = np.empty(ROW_BLOCK * pairs, dtype=np.int64)
    wf = w64.view(np.float32)  # row r: wf[r*stride : r*stride + n_in] (an odd in ignores the pad)
    w0 = wf[0:n_in]
    w1 = wf[stride:stride + n_in]
    w2 = wf[2 * stride:2 * stride + n_in]
    w3 = wf[3 * stride:3 * stride + n_in]
    i = r0
    while i < r1:
        nb = min(ROW_BLOCK, r1 - i)
        for r in range(ROW_BLOCK):
            t_row = theta[i + min(r, nb - 1)]  # a short last block repeats its last row
            base = r * pairs
            for j in range(pairs):
                w64[base + j] = lut_xy[np.int64(t_row[j])]
        for tok in range(n_tok):
            xr = x[tok]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for c in range(n_in):
                xv = xr[c]
                a0 += xv * w0[c]
                a1 += xv * w1[c]
                a2 += xv * w2[c]
                a3 += xv * w3[c]
            o = out[tok]
            o[i] = a0 + bias[i] if has_bias else a0
            if nb > 1:
                o[i + 1] = a1 + bias[i + 1] if has_bias else a1
            if nb > 2:
                o[i + 2] = a2 + bias[i + 2] if has_bias else a2
            if nb > 3:
                o[i + 3] = a3 + bias[i + 3] if has_bias else a3
        i += nb


def pair_table(lut_x: np.ndarray, lut_y: np.ndarray) -> np.ndarray:
    """The :func:`fused_rows` table: float32 ``(lut_x[k], lut_y[k])`` pairs as int64 bit patterns."""
    xy = np.empty((lut_x.shape[0], 2), dtype=np.float32)
    xy[:, 0] = lut_x
    xy[:, 1] = lut_y
    return xy.view(np.int64).reshape(-1)
