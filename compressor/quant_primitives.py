"""Pure NumPy reference of the Hyper-Compression codec (``docs/HYPERCOMPRESSION.md``).

This module is the contract. Every kernel (Numba CPU, Numba-CUDA, HyperLinear)
is tested against it, so each float64 operation below is written in one
canonical order, and kernels must use the same order to reproduce the same
bits:

* ``half = l * 0.5``; lattice side ``k = ceil(sqrt(U))`` (integer arithmetic);
  ``ox = cx - half``, ``oy = cy - half``.
* Lattice point ``n`` (``n = a*k + b``):
  ``Tx = ox + l * (n / (k*k))``, ``Ty = oy + l * (b / k)``.
  (``a/k + b/k**2 == n/k**2`` exactly as rationals; computing it from the
  integers ``n, b`` avoids the float ``mod`` that misplaces 30 of 1600 points.)
* ``dx = px - cx``, ``dy = py - cy``, ``r = sqrt(dx*dx + dy*dy)``.
* Inner (class 0): ``abs(dx) <= half and abs(dy) <= half``; then ``q = p``
  and the decoded point is ``T`` itself.
* ``e = (R - half) / K``; ``rho[j] = half + j*e`` for ``1 <= j < K``;
  ``rho[K] = R``. Outer class ``j`` = smallest ``j >= 1`` with ``r <= rho[j]``
  (``K`` if rounding leaves none).
* Outer: ``s = half / rho[j]``; ``qx = cx + dx*s``, ``qy = cy + dy*s``.
  Decode: ``inv = rho[j] / half``; ``x = cx + (Tx - cx)*inv`` (same for y).
* Distance to lattice point ``n``: ``ex = qx - Tx; ey = qy - Ty;
  ex*ex + ey*ey``; the index is the argmin, ties to the smallest ``n``.
* Stored index ``theta = n + U*j``; bit stream: value ``i`` occupies stream
  bits ``[i*bits, (i+1)*bits)``, least significant bit first, stream bit ``p``
  is bit ``p % 8`` of byte ``p // 8``.

The centroid, ``R`` and the padding values are computed here, in NumPy, for
every backend (a parallel sum would round differently), and handed to kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LAYOUT_ROWS = "rows"  # 2-D [out, in] weight: pairs inside a row (HyperLinear's layout)
LAYOUT_FLAT = "flat"  # anything else: flatten, pair consecutive elements

_BRUTE_FORCE_MAX_U = 64  # tiny lattices: scan every point (the window argument needs k >= 8)
_CHUNK = 1 << 18


def lattice_side(U: int) -> int:
    """``k = ceil(sqrt(U))`` without floating point."""
    if U < 1:
        raise ValueError(f"U must be >= 1, got {U}")
    k = math.isqrt(U)
    return k if k * k == U else k + 1


def choose_layout(shape: tuple[int, ...]) -> str:
    """Rows layout for 2-D weights (every ``nn.Linear``), flat for the rest."""
    return LAYOUT_ROWS if len(shape) == 2 and shape[1] >= 2 else LAYOUT_FLAT


@dataclass(frozen=True)
class PointSet:
    """A tensor as 2-D points. ``pad_cols``: the y of point ``i`` is padding when
    ``pad_cols > 0 and i % pad_cols == pad_cols - 1``."""

    px: np.ndarray
    py: np.ndarray
    layout: str
    pad: bool
    pad_cols: int
    numel: int

    @property
    def n(self) -> int:
        return int(self.px.shape[0])


def tensor_points(w: np.ndarray, layout: str) -> PointSet:
    """Split a float64 tensor into points, padding odd rows / odd counts with the
    mean of the second coordinates (the paper's choice)."""
    w = np.asarray(w, dtype=np.float64)
    numel = int(w.size)
    if layout == LAYOUT_ROWS:
        rows, cols = w.shape
        if cols % 2:
            second = w[:, 1::2]
            padcol = second.mean(axis=1, keepdims=True)
            w2 = np.concatenate([w, padcol], axis=1)
            pad_cols = (cols + 1) // 2
        else:
            w2 = w
            pad_cols = 0
        px = np.ascontiguousarray(w2[:, 0::2]).reshape(-1)
        py = np.ascontiguousarray(w2[:, 1::2]).reshape(-1)
        return PointSet(px, py, layout, bool(cols % 2), pad_cols, numel)
    if layout != LAYOUT_FLAT:
        raise ValueError(f"unknown layout {layout!r}")
    f = w.reshape(-1)
    if numel % 2:
        padval = f[1::2].mean() if numel > 1 else f[0]
        f = np.concatenate([f, np.array([padval])])
        npts = f.size // 2
        return PointSet(f[0::2].copy(), f[1::2].copy(), layout, True, npts, numel)
    return PointSet(f[0::2].copy(), f[1::2].copy(), layout, False, 0, numel)


def points_to_tensor(x: np.ndarray, y: np.ndarray, shape: tuple[int, ...], layout: str) -> np.ndarray:
    """Inverse of :func:`tensor_points` (drops the padded element)."""
    numel = int(np.prod(shape)) if shape else 1
    if layout == LAYOUT_ROWS:
        rows, cols = shape
        pc = (cols + 1) // 2
        out = np.empty((rows, 2 * pc), dtype=x.dtype)
        out[:, 0::2] = x.reshape(rows, pc)
        out[:, 1::2] = y.reshape(rows, pc)
        return out[:, :cols]
    out = np.empty(2 * x.shape[0], dtype=x.dtype)
    out[0::2] = x
    out[1::2] = y
    return out[:numel].reshape(shape)


def real_y_mask(n: int, pad_cols: int) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    if pad_cols:
        mask[pad_cols - 1 :: pad_cols] = False
    return mask


@dataclass(frozen=True)
class TensorGeometry:
    cx: float
    cy: float
    R: float
    all_inner: bool


def radius_and_inner(px, py, cx, cy, box_size) -> tuple[float, bool]:
    dx = px - cx
    dy = py - cy
    half = box_size * 0.5
    R = float(np.sqrt(dx * dx + dy * dy).max())
    return R, bool(np.all((np.abs(dx) <= half) & (np.abs(dy) <= half)))


def point_geometry(px: np.ndarray, py: np.ndarray, box_size: float, radius_and_inner_fn=None) -> TensorGeometry:
    """Centroid, largest radius, and whether every point is inside the box. The
    centroid is always NumPy's (pairwise) mean, so every backend gets the same bits;
    a backend may supply the order-independent radius/inner pass."""
    cx = float(px.mean())
    cy = float(py.mean())
    if radius_and_inner_fn is not None:
        R, all_inner = radius_and_inner_fn(px, py, cx, cy, box_size)
        return TensorGeometry(cx, cy, R, all_inner)
    dx = px - cx
    dy = py - cy
    R = float(np.sqrt(dx * dx + dy * dy).max())
    half = box_size * 0.5
    all_inner = bool(np.all((np.abs(dx) <= half) & (np.abs(dy) <= half)))
    return TensorGeometry(cx, cy, R, all_inner)


def class_radii(R: float, box_size: float, K: int) -> np.ndarray:
    """``rho[0..K]``: ``rho[0] = l/2``, ``rho[j] = l/2 + j*e``, ``rho[K] = R``."""
    half = box_size * 0.5
    rho = np.empty(K + 1, dtype=np.float64)
    rho[0] = half
    if K > 0:
        e = (R - half) / K
        for j in range(1, K):
            rho[j] = half + j * e
        rho[K] = R
    return rho


def lattice_points(U: int, box_size: float, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
    k = lattice_side(U)
    n = np.arange(U, dtype=np.int64)
    b = n % k
    half = box_size * 0.5
    ox = cx - half
    oy = cy - half
    tx = ox + box_size * (n.astype(np.float64) / float(k * k))
    ty = oy + box_size * (b.astype(np.float64) / float(k))
    return tx, ty


def classify(px, py, cx, cy, box_size, rho) -> np.ndarray:
    """Class of every point (0 = inner)."""
    half = box_size * 0.5
    dx = px - cx
    dy = py - cy
    r = np.sqrt(dx * dx + dy * dy)
    K = rho.shape[0] - 1
    inner = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    j = np.zeros(px.shape[0], dtype=np.int64)
    if K > 0:
        # smallest j >= 1 with r <= rho[j]; searchsorted 'left' on rho[1:] gives it
        j = 1 + np.searchsorted(rho[1:], r, side="left")
        j = np.minimum(j, K)
        j[inner] = 0
    return j


def scale_points(px, py, cx, cy, box_size, rho, cls):
    if rho.shape[0] == 1:  # K = 0: every point is inner and coded as it is
        return px, py
    half = box_size * 0.5
    dx = px - cx
    dy = py - cy
    s = half / rho[np.maximum(cls, 1)]
    outer = cls > 0
    qx = np.where(outer, cx + dx * s, px)
    qy = np.where(outer, cy + dy * s, py)
    return qx, qy


def nearest_bruteforce(qx, qy, U, box_size, cx, cy) -> np.ndarray:
    """The oracle: argmin over every lattice point, ties to the smallest index."""
    tx, ty = lattice_points(U, box_size, cx, cy)
    out = np.empty(qx.shape[0], dtype=np.int64)
    step = max(1, (1 << 22) // max(U, 1))
    for s in range(0, qx.shape[0], step):
        ex = qx[s : s + step, None] - tx[None, :]
        ey = qy[s : s + step, None] - ty[None, :]
        out[s : s + step] = np.argmin(ex * ex + ey * ey, axis=1)  # argmin keeps the first minimum
    return out


def nearest_lattice(qx, qy, U, box_size, cx, cy) -> np.ndarray:
    """O(1) per point for a perfect-square ``U``: the sheared grid's nearest point
    lies in rows ``floor(v*k)`` or ``floor(v*k)+1``; three rows around
    ``round(v*k)`` and three columns around the rounded in-row position cover both
    even when ``v*k`` rounds across an integer. A non-square ``U`` leaves the last
    column partial, so the nearest point can be rows away: every row is scanned
    (O(k)). For query points inside the box (every scaled point is: it lies in the
    disc of radius l/2) the result is the brute-force argmin bit for bit, since the
    distances use the canonical formula (tests check it against
    :func:`nearest_bruteforce`); the kernels' outward row scan is exact for any point."""
    if U <= _BRUTE_FORCE_MAX_U:
        return nearest_bruteforce(qx, qy, U, box_size, cx, cy)
    k = lattice_side(U)
    half = box_size * 0.5
    ox = cx - half
    oy = cy - half
    kk = float(k * k)
    out = np.empty(qx.shape[0], dtype=np.int64)
    for s in range(0, qx.shape[0], _CHUNK):
        x = qx[s : s + _CHUNK]
        y = qy[s : s + _CHUNK]
        fu = (x - ox) / box_size * k
        fv = (y - oy) / box_size * k
        b0 = np.rint(fv).astype(np.int64)
        best_d = np.full(x.shape[0], np.inf)
        best_n = np.full(x.shape[0], np.iinfo(np.int64).max, dtype=np.int64)
        row_steps = (-1, 0, 1) if k * k == U else range(-k, k + 1)
        for db in row_steps:
            b = np.clip(b0 + db, 0, k - 1)
            amax = (U - 1 - b) // k
            a0 = np.rint(fu - b / k).astype(np.int64)
            ty = oy + box_size * (b.astype(np.float64) / float(k))
            ey = y - ty
            for da in (-1, 0, 1):
                a = np.clip(a0 + da, 0, amax)
                n = a * k + b
                tx = ox + box_size * (n.astype(np.float64) / kk)
                ex = x - tx
                d = ex * ex + ey * ey
                better = (d < best_d) | ((d == best_d) & (n < best_n))
                best_d = np.where(better, d, best_d)
                best_n = np.where(better, n, best_n)
        out[s : s + _CHUNK] = best_n
    return out


def encode_points(px, py, cx, cy, box_size, U, rho) -> np.ndarray:
    """``theta = n* + U*j`` for every point."""
    cls = classify(px, py, cx, cy, box_size, rho)
    qx, qy = scale_points(px, py, cx, cy, box_size, rho, cls)
    n = nearest_lattice(qx, qy, U, box_size, cx, cy)
    return (n + U * cls).astype(np.uint32)


def decode_lut(U, K, box_size, cx, cy, rho) -> tuple[np.ndarray, np.ndarray]:
    """Decoded point for every possible ``theta`` (``U*(K+1)`` entries): decoding a
    tensor is a gather from this table, which is what HyperLinear does."""
    tx, ty = lattice_points(U, box_size, cx, cy)
    half = box_size * 0.5
    lx = np.empty(U * (K + 1), dtype=np.float64)
    ly = np.empty_like(lx)
    lx[:U] = tx
    ly[:U] = ty
    for j in range(1, K + 1):
        inv = rho[j] / half
        lx[j * U : (j + 1) * U] = cx + (tx - cx) * inv
        ly[j * U : (j + 1) * U] = cy + (ty - cy) * inv
    return lx, ly


def trial_tables(U, box_size, cx, cy, rho) -> tuple[int, np.ndarray, np.ndarray]:
    """What a kernel backend's ``encode_trial`` takes besides the points: the lattice
    side ``k`` and the decode table (whose first ``U`` x's and first ``k`` y's are the
    lattice coordinates). The kernels gather from these tables, never rebuild them."""
    U = int(U)
    rho = np.ascontiguousarray(rho, dtype=np.float64)
    if rho.ndim != 1 or rho.shape[0] < 1:
        raise ValueError(f"rho must be a 1-D array of K+1 radii, got shape {rho.shape}")
    lx, ly = decode_lut(U, rho.shape[0] - 1, float(box_size), float(cx), float(cy), rho)
    return lattice_side(U), np.ascontiguousarray(lx), np.ascontiguousarray(ly)


def decode_points(theta, lut_x, lut_y):
    t = np.asarray(theta, dtype=np.int64)
    return lut_x[t], lut_y[t]


def abs_error_sum(px, py, dx, dy, pad_cols) -> float:
    """Sum of absolute errors over the real elements (padded y's excluded)."""
    ex = np.abs(px - dx)
    ey = np.abs(py - dy)
    if pad_cols:
        ey = ey[real_y_mask(py.shape[0], pad_cols)]
    return float(ex.sum() + ey.sum())


def error_sum(theta, lut_x, lut_y, px, py, pad_cols) -> float:
    """Sum of absolute errors of the points decoded from ``theta`` through a table."""
    dx, dy = decode_points(theta, lut_x, lut_y)
    return abs_error_sum(px, py, dx, dy, pad_cols)


def encode_trial(px, py, cx, cy, box_size, U, rho, pad_cols) -> tuple[np.ndarray, float]:
    """One ``(U, K)`` trial: indices and the float64 sum of absolute errors."""
    theta = encode_points(px, py, cx, cy, box_size, U, rho)
    K = rho.shape[0] - 1
    lx, ly = decode_lut(U, K, box_size, cx, cy, rho)
    dx, dy = decode_points(theta, lx, ly)
    return theta, abs_error_sum(px, py, dx, dy, pad_cols)


# -- bit packing ----------------------------------------------------------------

def bits_for(max_theta: int) -> int:
    return max(1, int(max_theta).bit_length())


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(theta: np.ndarray, bits: int) -> np.ndarray:
    theta = np.asarray(theta, dtype=np.uint64)
    n = theta.shape[0]
    out = np.zeros(packed_nbytes(n, bits), dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.uint64)
    step = 8 * _CHUNK  # a multiple of 8 values spans whole bytes
    for s in range(0, n, step):
        chunk = theta[s : s + step]
        bitmat = ((chunk[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8).reshape(-1)
        packed = np.packbits(bitmat, bitorder="little")
        start = (s * bits) // 8
        out[start : start + packed.shape[0]] |= packed
    return out


def unpack_bits(buf: np.ndarray, n: int, bits: int) -> np.ndarray:
    buf = np.asarray(buf, dtype=np.uint8)
    out = np.empty(n, dtype=np.uint32)
    weights = (np.uint64(1) << np.arange(bits, dtype=np.uint64))
    step = 8 * _CHUNK
    for s in range(0, n, step):
        m = min(step, n - s)
        start = (s * bits) // 8
        nbytes = packed_nbytes(m, bits)
        bitmat = np.unpackbits(buf[start : start + nbytes], bitorder="little")[: m * bits].reshape(m, bits)
        out[s : s + m] = (bitmat.astype(np.uint64) * weights[None, :]).sum(axis=1).astype(np.uint32)
    return out
