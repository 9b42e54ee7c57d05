"""Numba CPU kernels of the codec-v2 linear layer: ``y = x W^T + b`` with ``W`` held
in the fixed-width on-device form (``compressor/codec_v2/device.py``) and decoded
inside the product, never stored as floats.

The form, for ``W [out, in]`` with ``P = ceil(in/2)`` pairs per row:

* ``xt[j, i] = X = 2m + (b & 1)`` and ``bt[j, i] = b``: int8 A2 lattice coordinates of
  pair ``j`` of row ``i`` (8 bits per weight), stored *transposed* (pair-major) so
  that the kernels run along rows; the pair's weights are ``step_i * X / 2`` and
  ``step_i * b * sqrt(3)/2``. ``X`` rather than ``m`` saves the integer work in the
  product (measured 40 against 103 us for 768x2304 on one core);
* ``step[i]``: float32 row step (exact, see ``compressor/codec_v2/lattice.py``);
* escapes sorted by row then column: the rare pairs whose coordinates do not fit
  int8 have zero coordinates and their exact weights in ``(esc_row, esc_col, esc_val)``.

:func:`fused_rows` (a few tokens) computes for each row ``i`` and token ``t``::

    dot = 0;  for j in 0..P-1:  dot = (dot + xe[t, j] * X[j, i]) + xo[t, j] * b[j, i]
    y[t, i] = step_i * dot (+ x[t, col] * val for each escape of row i, in order) (+ bias_i)

with ``xe = x_even / 2`` and ``xo = x_odd * float32(sqrt(3)/2)``
(prepared once per call by the caller). Every output has its own accumulator and
its own fixed order, so the loops vectorize *across rows* (contiguous int8 in the
pair-major layout) with no reassociation: the same bits on any x86-64 whatever its
vector width, for any thread count and any split of the rows. No ``fastmath``.

:func:`decode_rows_t` (many tokens) writes ``W^T`` (float32 ``[in, out]``) for torch's
matmul, through float64 like the checkpoint's own decode, so ``W`` equals
``V2Tensor.decode()`` bit for bit.

Serial and GIL-free: the caller splits the rows over a small thread pool (the
project's HyperLinear found numba's ``prange`` pool next to torch's OpenMP pool
far slower per call on 2 cores; figures in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np
from numba import njit

H = 0.8660254037844386
ACC_FLOATS = 1 << 14  # accumulator tile (tokens x rows): 64 KiB, L2-resident
MAX_ROW_BLOCK = 2048

_FUSED_SIG = ("void(float32[:, ::1], float32[:, ::1], int8[:, ::1], int8[:, ::1], float32[::1], int32[::1], "
              "int32[::1], float32[::1], float32[:, ::1], float32[::1], float32[:, ::1], int64, int64)")


@njit(_FUSED_SIG, cache=True, nogil=True, boundscheck=False)
def fused_rows(xe, xo, xt, bt, step, esc_row, esc_col, esc_val, x, bias, out, r0, r1):
    """``out[t, i] = x[t] . W[i] + bias[i]`` for rows ``r0 <= i < r1`` (module doc).

    ``xe``, ``xo``: float32 ``[T, P]``; ``xt``, ``bt``: int8 ``[P, out]``; ``x``: float32
    ``[T, in]`` (read for the escapes); ``bias``: float32 ``[out]`` or empty;
    ``out``: float32 ``[T, out]``, columns ``r0:r1`` written."""
    n_tok = xe.shape[0]
    pairs = xe.shape[1]
    rb_max = max(64, min(MAX_ROW_BLOCK, ACC_FLOATS // max(n_tok, 1)))
    acc = np.empty((n_tok, rb_max), dtype=np.float32)
    wx = np.empty(rb_max, dtype=np.float32)
    wy = np.empty(rb_max, dtype=np.float32)
    has_bias = bias.shape[0] > 0
    for rb in range(r0, r1, rb_max):
        n = min(rb_max, r1 - rb)
        for t in range(n_tok):
            for r in range(n):
                acc[t, r] = 0.0
        if n_tok == 1:
            a0 = acc[0]
            for j in range(pairs):
                xr = xt[j, rb:rb + n]
                br = bt[j, rb:rb + n]
                a = xe[0, j]
                c = xo[0, j]
                for r in range(n):
                    a0[r] = (a0[r] + a * np.float32(xr[r])) + c * np.float32(br[r])
        else:
            for j in range(pairs):
                xr = xt[j, rb:rb + n]
                br = bt[j, rb:rb + n]
                for r in range(n):
                    wx[r] = np.float32(xr[r])
                    wy[r] = np.float32(br[r])
                for t in range(n_tok):
                    a = xe[t, j]
                    c = xo[t, j]
                    at = acc[t]
                    for r in range(n):
                        at[r] = (at[r] + a * wx[r]) + c * wy[r]
        for t in range(n_tok):
            ot = out[t]
            at = acc[t]
            for r in range(n):
                ot[rb + r] = step[rb + r] * at[r]
        e = np.searchsorted(esc_row, rb)
        while e < esc_row.shape[0] and esc_row[e] < rb + n:
            row = esc_row[e]
            col = esc_col[e]
            v = esc_val[e]
            for t in range(n_tok):
                out[t, row] += x[t, col] * v
            e += 1
        if has_bias:
            for t in range(n_tok):
                ot = out[t]
                for r in range(n):
                    ot[rb + r] += bias[rb + r]


_DECODE_SIG = ("void(int8[:, ::1], int8[:, ::1], float32[::1], int32[::1], int32[::1], float32[::1], "
               "float32[:, ::1], int64, int64)")


@njit(_DECODE_SIG, cache=True, nogil=True, boundscheck=False)
def decode_rows_t(xt, bt, step, esc_row, esc_col, esc_val, wt, r0, r1):
    """``wt[:, i] = W[i]`` (``wt``: float32 ``[in, out]``, i.e. ``W^T``) for rows
    ``r0 <= i < r1``, each weight through float64 exactly as ``V2Tensor.decode()``
    (``X / 2 = m + (b & 1)/2`` exactly)."""
    n_in = wt.shape[0]
    full = n_in // 2
    pairs = xt.shape[0]
    s64 = np.empty(r1 - r0, dtype=np.float64)
    for i in range(r0, r1):
        s64[i - r0] = step[i]
    for j in range(pairs):
        xr = xt[j, r0:r1]
        br = bt[j, r0:r1]
        wxr = wt[2 * j, r0:r1]
        for i in range(r1 - r0):
            wxr[i] = s64[i] * (0.5 * np.float64(xr[i]))
        if j < full:  # an odd ``in``: the last pair has no y
            wyr = wt[2 * j + 1, r0:r1]
            for i in range(r1 - r0):
                wyr[i] = s64[i] * (H * np.float64(br[i]))
    e = np.searchsorted(esc_row, r0)
    while e < esc_row.shape[0] and esc_row[e] < r1:
        wt[esc_col[e], esc_row[e]] = esc_val[e]
        e += 1
