"""Numba CPU kernels of codec v2's lattice quantizer.

Same functions and results, bit for bit, as the NumPy reference
``compressor/codec_v2/lattice.py`` (``row_sumsq``, ``encode_rows``, ``decode_rows``):
float64 arithmetic in the reference's operation order, no ``fastmath`` (it would
allow FMA contraction and reassociation). Every row is computed by one thread
from its own data, so the result does not depend on the thread count or on how
``prange`` splits the rows. Arrays in, arrays out; the host code (step choice,
entropy coding) is shared with the reference.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# the reference's constants (tests check they are equal)
SQRT3 = 1.7320508075688772
H = 0.8660254037844386
U_CLAMP = float((1 << 30) + 2)


@njit(cache=True, inline="always")
def _clamp(u):
    if u > U_CLAMP:
        return U_CLAMP
    if u < -U_CLAMP:
        return -U_CLAMP
    return u


@njit(cache=True, parallel=True)
def row_sumsq(w, out):
    """``out[i] = sum_j w[i, j]^2`` in float64, column order."""
    rows, cols = w.shape
    for i in prange(rows):
        acc = 0.0
        for j in range(cols):
            v = np.float64(w[i, j])
            acc += v * v
        out[i] = acc


@njit(cache=True, inline="always")
def _nearest(ux, uy):
    """Nearest A2 point: ``(m, b)`` (see the reference's ``a2_nearest``)."""
    t = uy / SQRT3
    m0 = math.floor(ux + 0.5)
    b0 = 2.0 * math.floor(t + 0.5)
    m1 = math.floor(ux)
    b1 = 2.0 * math.floor(t) + 1.0
    dx0 = ux - m0
    dy0 = uy - b0 * H
    dx1 = ux - (m1 + 0.5)
    dy1 = uy - b1 * H
    d0 = dx0 * dx0 + dy0 * dy0
    d1 = dx1 * dx1 + dy1 * dy1
    if d1 < d0:
        return np.int64(m1), np.int64(b1)
    return np.int64(m0), np.int64(b0)


@njit(cache=True, parallel=True)
def encode_rows(w, steps, m_out, b_out):
    """Lattice coordinates of every pair of ``w [rows, cols]`` (any float dtype) with
    row steps ``steps`` (float64): ``m_out``, ``b_out`` int32 or int64
    ``[rows, ceil(cols/2)]`` (the caller checks the range). An odd ``cols`` pads ``y = 0``."""
    rows, cols = w.shape
    full = cols // 2
    for i in prange(rows):
        s = steps[i]
        for j in range(full):
            m, b = _nearest(_clamp(np.float64(w[i, 2 * j]) / s), _clamp(np.float64(w[i, 2 * j + 1]) / s))
            m_out[i, j] = m
            b_out[i, j] = b
        if cols - 2 * full:
            m, b = _nearest(_clamp(np.float64(w[i, cols - 1]) / s), 0.0 / s)
            m_out[i, full] = m
            b_out[i, full] = b


@njit(cache=True, parallel=True)
def decode_rows(m, b, steps, out):
    """``out [rows, cols]`` (float32 or float64) from coordinates ``m``, ``b`` (any
    integer dtype) and row steps ``steps`` (float64), through float64."""
    rows, cols = out.shape
    full = cols // 2
    for i in prange(rows):
        s = steps[i]
        for j in range(full):
            bb = np.int64(b[i, j])
            out[i, 2 * j] = s * (np.float64(m[i, j]) + 0.5 * np.float64(bb & 1))
            out[i, 2 * j + 1] = s * (H * np.float64(bb))
        if cols - 2 * full:
            bb = np.int64(b[i, full])
            out[i, cols - 1] = s * (np.float64(m[i, full]) + 0.5 * np.float64(bb & 1))
