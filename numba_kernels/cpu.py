"""Numba CPU kernels of the Hyper-Compression codec.

The functions of :mod:`compressor.quant_primitives` (the reference), with the
lattice and decode tables as arguments: this package imports numpy and numba
only, and :mod:`compressor.backends` builds the tables with the reference's own
NumPy builders (``quant_primitives.trial_tables``) and passes them in. Every
result is bit-identical to the reference:

* the lattice coordinates and the decode table are the caller's (the
  reference's), so the kernels only gather them;
* the per-point float64 arithmetic (offsets, radius, scaling, squared distance,
  absolute error) follows the reference's canonical operation order, without
  ``fastmath`` (which would allow reassociation and FMA contraction);
* ``encode_trial`` writes each point's absolute errors (x, and the real y's
  compacted) and sums them with NumPy, the same way as the reference, so the
  error sum is the reference's to the last bit, whatever the thread count.

The nearest lattice point is found exactly for any ``U`` (square or not): see
:func:`_nearest_one`.

Threads: no ``prange``. Each kernel is serial and GIL-free and claims chunks of
points from a shared counter; :func:`numba_kernels.threads.run_chunks` runs it on
:func:`numba_kernels.threads.get_threads` threads. A static ``prange`` split
waited for its slowest thread on shared cores (issue 10); this schedule lets the
threads that run take the work of one that does not. Every point (every group of
8 for the bit packing, every chunk's maximum for the geometry) is computed alone,
so the results are the same bits for any thread count and any schedule.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import bitpack
from .host import (check_points, f64 as _f64, lattice_args, n_real_y, pack_args, packed_nbytes, trial_tables,
                   unpack_args)
from .threads import claim, run_chunks

# Points per work item: large enough that claiming one costs nothing (an atomic
# add per ~0.1-0.5 ms of work), small enough that the thread still holding the last
# chunk when the others run out (on a core another process shares, say) delays
# the call by one chunk's time, not by a thread's share of the tensor.
_CHUNK = 4096
# bit-packing work items, in groups of 8 values
_GROUP_CHUNK = 4096


def _chunks(n: int, size: int = _CHUNK) -> int:
    return (n + size - 1) // size


@njit("Tuple((float64, int64))(float64, float64, float64, int64, int64, int64, float64, float64[::1], float64, int64)",
      cache=True)
def _scan_row(x, ey2, fu, b, k, U, invk, tx, best_d, best_n):
    """Best of row ``b`` against ``(best_d, best_n)``.

    In one row the lattice x's are increasing, so the computed ``x - Tx`` is
    monotone in the column and ``ex*ex + ey2`` has its minimum (and any tie) at
    the two columns around the sign change; ``rint`` of the in-row position is
    within one column of both, so columns ``a0-1..a0+1`` cover them.
    """
    amax = (U - 1 - b) // k
    t = fu - b * invk
    if not (t >= 0.0):  # also catches NaN
        t = 0.0
    if t > amax:
        t = float(amax)
    a0 = int(math.floor(t + 0.5))
    lo = a0 - 1 if a0 > 0 else 0
    hi = a0 + 1 if a0 < amax else amax
    bn = best_n
    for a in range(lo, hi + 1):
        nn = a * k + b
        ex = x - tx[nn]
        d = ex * ex + ey2
        if d < best_d or (d == best_d and nn < bn):
            best_d = d
            bn = nn
    return best_d, bn


@njit("int64(float64, float64, float64, float64, float64, float64, int64, int64, float64[::1], float64[::1])",
      cache=True)
def _nearest_one(x, y, ox, oy, kl, invk, k, U, tx, ty):
    """Exact argmin over the lattice (ties to the smallest index).

    Start at row ``b0 = rint(v*k)``; every row below it has ``Ty`` at least half
    a row under ``y`` and every row above at least half a row over it, and the
    computed ``Ty`` is monotone in the row, so ``(y - Ty)^2`` only grows moving
    outward. ``d = ex^2 + ey^2 >= ey^2`` holds in floating point too, so once
    ``ey^2 > best`` no further row in that direction can win or tie. Rows with
    ``ey^2 == best`` are still scanned so that ties reach the smallest ``n``.
    """
    fv = (y - oy) * kl
    if not (fv >= 0.0):
        fv = 0.0
    if fv > k - 1:
        fv = float(k - 1)
    b0 = int(math.floor(fv + 0.5))
    fu = (x - ox) * kl
    ey = y - ty[b0]
    best_d, best_n = _scan_row(x, ey * ey, fu, b0, k, U, invk, tx, np.inf, 0)
    b = b0 - 1
    while b >= 0:
        ey = y - ty[b]
        ey2 = ey * ey
        if ey2 > best_d:
            break
        best_d, best_n = _scan_row(x, ey2, fu, b, k, U, invk, tx, best_d, best_n)
        b -= 1
    b = b0 + 1
    while b < k:
        ey = y - ty[b]
        ey2 = ey * ey
        if ey2 > best_d:
            break
        best_d, best_n = _scan_row(x, ey2, fu, b, k, U, invk, tx, best_d, best_n)
        b += 1
    return best_n


@njit("void(float64[::1], float64[::1], float64, float64, float64, int64, int64, "
      "float64[::1], float64[::1], int64[::1], int64[::1])", cache=True, nogil=True)
def _nearest_kernel(qx, qy, cx, cy, box_size, k, U, tx, ty, out, next_chunk):
    half = box_size * 0.5
    ox = cx - half
    oy = cy - half
    kl = k / box_size
    invk = 1.0 / k
    n = qx.shape[0]
    while True:
        c = claim(next_chunk)
        if c * _CHUNK >= n:
            break
        for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            out[i] = _nearest_one(qx[i], qy[i], ox, oy, kl, invk, k, U, tx, ty)


@njit("void(float64[::1], float64[::1], float64, float64, float64, int64, int64, float64[::1], "
      "float64[::1], float64[::1], float64[::1], int64, uint32[::1], float64[::1], float64[::1], int64[::1])",
      cache=True, nogil=True)
def _encode_kernel(px, py, cx, cy, half, k, U, rho, scale, lut_x, lut_y, pad_cols, theta, ax, ay, next_chunk):
    """Classify, scale, nearest point, decode and absolute errors in one pass."""
    n = px.shape[0]
    K = rho.shape[0] - 1
    ox = cx - half
    oy = cy - half
    kl = k / (half + half)
    invk = 1.0 / k
    while True:
        c = claim(next_chunk)
        if c * _CHUNK >= n:
            break
        for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            x = px[i]
            y = py[i]
            dx = x - cx
            dy = y - cy
            j = 0
            qx = x
            qy = y
            # K == 0 means "no classes": the reference treats every point as inner
            if K > 0 and not (abs(dx) <= half and abs(dy) <= half):
                r = math.sqrt(dx * dx + dy * dy)
                j = 1
                while j < K and not (r <= rho[j]):
                    j += 1
                s = scale[j]
                qx = cx + dx * s
                qy = cy + dy * s
            t = _nearest_one(qx, qy, ox, oy, kl, invk, k, U, lut_x, lut_y) + U * j
            theta[i] = t
            ax[i] = abs(x - lut_x[t])
            ey = abs(y - lut_y[t])
            if pad_cols > 0:
                if i % pad_cols != pad_cols - 1:
                    ay[i - (i + 1) // pad_cols] = ey  # index in the y's with the padding removed
            else:
                ay[i] = ey


@njit(["void(uint16[::1], float64[::1], float64[::1], float64[::1], float64[::1], int64[::1])",
       "void(uint32[::1], float64[::1], float64[::1], float64[::1], float64[::1], int64[::1])",
       "void(int64[::1], float64[::1], float64[::1], float64[::1], float64[::1], int64[::1])"],
      cache=True, nogil=True)
def _decode_kernel(theta, lut_x, lut_y, x, y, next_chunk):
    n = theta.shape[0]
    while True:
        c = claim(next_chunk)
        if c * _CHUNK >= n:
            break
        for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            t = theta[i]
            x[i] = lut_x[t]
            y[i] = lut_y[t]


@njit(["void(uint16[::1], float64[::1], float64[::1], float64[::1], float64[::1], int64, float64[::1], float64[::1], "
       "int64[::1])",
       "void(uint32[::1], float64[::1], float64[::1], float64[::1], float64[::1], int64, float64[::1], float64[::1], "
       "int64[::1])"],
      cache=True, nogil=True)
def _error_kernel(theta, lut_x, lut_y, px, py, pad_cols, ax, ay, next_chunk):
    # same per-point errors, in the same arrays, as _encode_kernel: the NumPy sums agree
    n = theta.shape[0]
    while True:
        c = claim(next_chunk)
        if c * _CHUNK >= n:
            break
        for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            t = theta[i]
            ax[i] = abs(px[i] - lut_x[t])
            ey = abs(py[i] - lut_y[t])
            if pad_cols > 0:
                if i % pad_cols != pad_cols - 1:
                    ay[i - (i + 1) // pad_cols] = ey
            else:
                ay[i] = ey


_pack_group = njit(cache=True)(bitpack.pack_group)
_unpack_group = njit(cache=True)(bitpack.unpack_group)


@njit(["void(uint16[::1], int64, uint8[::1], int64[::1])", "void(uint32[::1], int64, uint8[::1], int64[::1])"],
      cache=True, nogil=True)
def _pack_kernel(theta, bits, out, next_chunk):
    mask = (np.uint64(1) << np.uint64(bits)) - np.uint64(1)
    groups = (theta.shape[0] + 7) // 8
    while True:
        c = claim(next_chunk)
        if c * _GROUP_CHUNK >= groups:
            break
        for g in range(c * _GROUP_CHUNK, min(groups, (c + 1) * _GROUP_CHUNK)):
            _pack_group(theta, bits, mask, g, out)


@njit("void(uint8[::1], int64, int64, uint32[::1], int64[::1])", cache=True, nogil=True)
def _unpack_kernel(buf, n, bits, out, next_chunk):
    mask = (np.uint64(1) << np.uint64(bits)) - np.uint64(1)
    groups = (n + 7) // 8
    while True:
        c = claim(next_chunk)
        if c * _GROUP_CHUNK >= groups:
            break
        for g in range(c * _GROUP_CHUNK, min(groups, (c + 1) * _GROUP_CHUNK)):
            _unpack_group(buf, n, bits, mask, g, out)


# -- host wrappers (the backend API) --------------------------------------------

def nearest(qx, qy, U, box_size, cx, cy, k, tx, ty) -> np.ndarray:
    """Index of the nearest lattice point for every point (= ``nearest_bruteforce``);
    ``k, tx, ty``: the lattice side and coordinates (``quant_primitives.lattice_points``)."""
    qx = _f64(qx)
    qy = _f64(qy)
    if qx.shape != qy.shape or qx.ndim != 1:
        raise ValueError(f"qx, qy must be 1-D of equal length, got {qx.shape} and {qy.shape}")
    U, k, tx, ty = lattice_args(U, k, tx, ty)
    out = np.empty(qx.shape[0], dtype=np.int64)
    run_chunks(_nearest_kernel, _chunks(qx.shape[0]), qx, qy, float(cx), float(cy), float(box_size), k, U, tx, ty,
               out)
    return out


def encode_trial(px, py, cx, cy, box_size, U, rho, pad_cols, k, lut_x, lut_y) -> tuple[np.ndarray, float]:
    """One ``(U, K)`` trial: ``theta`` (uint32) and the float64 sum of absolute errors;
    ``k, lut_x, lut_y``: the lattice side and decode table (``quant_primitives.trial_tables``)."""
    px, py, pad_cols = check_points(px, py, pad_cols)
    k, rho, scale, lut_x, lut_y = trial_tables(U, box_size, rho, k, lut_x, lut_y)
    U = int(U)
    n = px.shape[0]
    theta = np.empty(n, dtype=np.uint32)
    ax = np.empty(n, dtype=np.float64)
    ay = np.empty(n_real_y(n, pad_cols), dtype=np.float64)
    run_chunks(_encode_kernel, _chunks(n), px, py, float(cx), float(cy), float(box_size) * 0.5, k, U, rho, scale,
               lut_x, lut_y, pad_cols, theta, ax, ay)
    # NumPy's (pairwise) sums over the same arrays as the reference's abs_error_sum
    return theta, float(ax.sum() + ay.sum())


def decode_points(theta, lut_x, lut_y) -> tuple[np.ndarray, np.ndarray]:
    """``(lut_x[theta], lut_y[theta])``; raises IndexError for an index past the table."""
    theta = np.ascontiguousarray(theta)
    if theta.dtype not in (np.uint16, np.uint32, np.int64):
        theta = theta.astype(np.int64)
    lut_x = _f64(lut_x)
    lut_y = _f64(lut_y)
    if lut_x.shape != lut_y.shape:
        raise ValueError(f"decode tables differ in length: {lut_x.shape} vs {lut_y.shape}")
    theta = theta.reshape(-1)
    if theta.size:
        lo, hi = int(theta.min()), int(theta.max())
        if lo < 0 or hi >= lut_x.shape[0]:
            raise IndexError(f"index {hi if hi >= lut_x.shape[0] else lo} outside a decode table of {lut_x.shape[0]}")
    x = np.empty(theta.shape[0], dtype=np.float64)
    y = np.empty(theta.shape[0], dtype=np.float64)
    run_chunks(_decode_kernel, _chunks(theta.shape[0]), theta, lut_x, lut_y, x, y)
    return x, y


@njit("void(float64[::1], float64[::1], float64, float64, float64, float64[::1], boolean[::1], int64[::1])",
      cache=True, nogil=True)
def _geometry_kernel(px, py, cx, cy, half, rmax, outside, next_chunk):
    n = px.shape[0]
    nchunks = rmax.shape[0]
    while True:
        c = claim(next_chunk)
        if c >= nchunks:
            break
        m = 0.0
        out = False
        for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            dx = px[i] - cx
            dy = py[i] - cy
            r = math.sqrt(dx * dx + dy * dy)
            if r > m:
                m = r
            if not (abs(dx) <= half and abs(dy) <= half):
                out = True
        rmax[c] = m
        outside[c] = out


def radius_and_inner(px, py, cx, cy, box_size) -> tuple[float, bool]:
    """``(R, all_inner)`` as :func:`quant_primitives.point_geometry` computes them
    (a maximum and a logical and do not depend on order, so the values are exact)."""
    px = _f64(px)
    py = _f64(py)
    nchunks = max(1, _chunks(px.shape[0]))
    rmax = np.zeros(nchunks, dtype=np.float64)
    outside = np.zeros(nchunks, dtype=np.bool_)
    run_chunks(_geometry_kernel, nchunks, px, py, float(cx), float(cy), float(box_size) * 0.5, rmax, outside)
    return float(rmax.max()), not bool(outside.any())


def error_sum(theta, lut_x, lut_y, px, py, pad_cols) -> float:
    """Sum of absolute errors of the points decoded from ``theta`` through the tables
    (padded y's excluded); equal to ``quant_primitives.error_sum`` bit for bit."""
    theta = np.ascontiguousarray(theta).reshape(-1)
    if theta.dtype not in (np.uint16, np.uint32):
        theta = theta.astype(np.uint32)
    lut_x = _f64(lut_x)
    lut_y = _f64(lut_y)
    px = _f64(px)
    py = _f64(py)
    n = theta.shape[0]
    if px.shape[0] != n or py.shape[0] != n:
        raise ValueError(f"theta has {n} points but px/py have {px.shape[0]}/{py.shape[0]}")
    if n and int(theta.max()) >= lut_x.shape[0]:
        raise IndexError(f"index {int(theta.max())} outside a decode table of {lut_x.shape[0]}")
    pad_cols = int(pad_cols)
    ax = np.empty(n, dtype=np.float64)
    ay = np.empty(n_real_y(n, pad_cols), dtype=np.float64)
    run_chunks(_error_kernel, _chunks(n), theta, lut_x, lut_y, px, py, pad_cols, ax, ay)
    return float(ax.sum() + ay.sum())


def pack_bits(theta, bits) -> np.ndarray:
    """LSB-first bit stream of ``bits`` bits per value (only the low ``bits`` bits are kept)."""
    theta, bits = pack_args(theta, bits)
    out = np.empty(packed_nbytes(theta.shape[0], bits), dtype=np.uint8)
    run_chunks(_pack_kernel, _chunks((theta.shape[0] + 7) // 8, _GROUP_CHUNK), theta, bits, out)
    return out


def unpack_bits(buf, n, bits) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` values as uint32."""
    buf, n, bits, need = unpack_args(buf, n, bits)
    out = np.empty(n, dtype=np.uint32)
    run_chunks(_unpack_kernel, _chunks((n + 7) // 8, _GROUP_CHUNK), buf, n, bits, out)
    return out
