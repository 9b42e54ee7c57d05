"""Pure NumPy reference of codec v2's lattice quantizer. Every kernel
(``numba_kernels/lattice_v2_cpu.py``, ``numba_kernels/lattice_v2_cuda.py``) is
tested against these functions, bit for bit.

The quantizer keeps the Hyper-Compression idea -- pairs of weights, each mapped in
O(1) to the nearest point of a 2-D lattice -- and changes three things:

* **Scale-adaptive.** A tensor is seen as rows (``shape[0]`` rows of
  ``prod(shape[1:])`` weights: output channels of a linear/conv weight, tokens of an
  embedding). Row ``i``'s lattice step is ``step_i = base * rel_i``: ``base`` is one
  number per tensor (``q`` times the tensor's RMS, 13 significant bits), ``rel_i`` one
  float16 per row (the row's RMS over the tensor's). The product is exact in float32
  and float64, so every backend, and the on-device form, get the same steps.
* **Unbounded.** The lattice covers the plane: a pair is divided by its row's step
  and rounded to the nearest lattice point, however far out; no box, no radial
  squeeze. Coordinates are integers of any size (escapes take the rare large ones).
* **Hexagonal.** The lattice is A2 with nearest-neighbour distance 1 (in step
  units): rows ``b`` at height ``b*sqrt(3)/2``, points at ``x = m + (b mod 2)/2``.
  It is the union of two rectangular cosets, so the nearest point is two roundings
  and one comparison (Conway & Sloane). Its normalized second moment is 0.0802
  against 0.0833 for the square grid (and for the paper's sheared grid, which is
  a square grid with a tiny shear): 0.17 dB less error at the same rate, measured in
  benchmarks/bench_codec_v2_design.py.

Arithmetic is float64 in a fixed operation order, without FMA contraction, so that
the CPU and CUDA kernels reproduce it exactly:

* ``ss_i = sum_j w_ij * w_ij`` in column order; tensor RMS from ``math.fsum``;
* ``u = w / step`` (IEEE division), clamped to ``+-U_CLAMP``; ``round(v) = floor(v + 0.5)``;
* coset 0 ``(m0, 2 n0)``: ``m0 = round(ux)``, ``n0 = round(uy / sqrt3)``; coset 1
  ``(m1, 2 n1 + 1)``: ``m1 = floor(ux)``, ``n1 = floor(uy / sqrt3)``;
  ``d = dx*dx + dy*dy`` with ``dy = uy - b * H`` (``H = sqrt(3)/2``); coset 1 wins
  only when strictly closer;
* decode: ``x = step * (m + 0.5 * (b & 1))``, ``y = step * (H * b)``.

An odd row length gets one padding ``y = 0`` per row (dropped on decode).
"""

from __future__ import annotations

import math

import numpy as np

SQRT3 = 1.7320508075688772  # float64 nearest to sqrt(3)
H = 0.8660254037844386  # float64 nearest to sqrt(3)/2: the A2 row height
FP16_MIN = 2.0 ** -24  # smallest float16 (subnormal): rows 10**7 times below the tensor's RMS
FP16_MAX = 65504.0
FLOAT32_MIN_NORMAL = 2.0 ** -126
FLOAT32_MAX = float(np.finfo(np.float32).max)
BASE_BITS = 13  # significant bits of the per-tensor base: base * float16 fits float32 exactly
MAX_COORD = 1 << 30  # larger coordinates mean a step far too small for the row: refuse
# ``u = w / step`` is clamped to +-U_CLAMP before rounding, so a step far too small
# gives a coordinate just above MAX_COORD (refused) instead of an integer overflow
U_CLAMP = float(MAX_COORD + 2)


def as_rows(w: np.ndarray) -> np.ndarray:
    """``w`` viewed as ``[shape[0], prod(shape[1:])]`` (1-D: one row)."""
    a = np.asarray(w)
    if a.ndim == 0:
        raise ValueError("a scalar has no rows")
    rows = a.shape[0] if a.ndim > 1 else 1
    return a.reshape(rows, -1)


def row_sumsq(rows2d: np.ndarray) -> np.ndarray:
    """``ss_i = sum_j w_ij^2`` in float64, column order (vectorized over rows)."""
    w = np.asarray(rows2d)
    acc = np.zeros(w.shape[0], dtype=np.float64)
    for j in range(w.shape[1]):
        v = w[:, j].astype(np.float64)
        acc += v * v
    return acc


def row_steps(ss: np.ndarray, cols: int, q: float) -> tuple[float, np.ndarray]:
    """``(base, rel)``: ``base = q * tensor RMS`` rounded to 13 significant bits (a
    float32), ``rel_i`` = row RMS / tensor RMS as float16, clamped to its positive
    range (subnormals included). ``base * rel_i`` then has at most 24 significant bits: the step is exact in
    float32 as well as float64, so the on-device form (float32 steps) decodes to the
    same weights as the checkpoint. Shared by every backend (O(rows) host work).
    Raises ValueError when a step would leave float32's normal range."""
    ss = np.asarray(ss, dtype=np.float64)
    rows = ss.shape[0]
    if rows < 1 or cols < 1:
        raise ValueError("empty tensor")
    rms_t = math.sqrt(math.fsum(ss.tolist()) / (rows * cols))
    if not rms_t > 1e-30:  # all-zero tensor (or denormal dust): any step codes it as zeros
        rms_t = 1.0
    base = round_base(float(q) * rms_t)
    rel = np.sqrt(ss / cols) / rms_t
    rel = np.clip(rel, FP16_MIN, FP16_MAX).astype(np.float16)
    rel[rel < FP16_MIN] = np.float16(FP16_MIN)  # rounding down below the clamp
    lo = base * float(rel.min())
    if not (lo >= FLOAT32_MIN_NORMAL and base * float(rel.max()) <= FLOAT32_MAX):
        raise ValueError(f"row steps [{lo:g}, {base * float(rel.max()):g}] leave float32's normal range")
    return base, rel


def round_base(v: float) -> float:
    """``v`` rounded to 13 significant bits (then exact in float32)."""
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"step base {v!r} is not a positive finite number")
    mant, exp = math.frexp(v)
    return math.ldexp(round(mant * (1 << BASE_BITS)) / (1 << BASE_BITS), exp)


def base_is_valid(base: float) -> bool:
    """A stored base must be what :func:`round_base` writes: positive, finite, a
    float32 normal with at most 13 significant bits."""
    if not (isinstance(base, float) and math.isfinite(base) and FLOAT32_MIN_NORMAL <= base <= FLOAT32_MAX):
        return False
    mant, _ = math.frexp(base)
    return mant * (1 << BASE_BITS) == round(mant * (1 << BASE_BITS))


def steps_f64(base: float, rel: np.ndarray) -> np.ndarray:
    """``step_i = float64(base) * float64(rel_i)``: exact (24 x 11 mantissa bits)."""
    return np.float64(base) * np.asarray(rel, dtype=np.float16).astype(np.float64)


def _round(v: np.ndarray) -> np.ndarray:
    return np.floor(v + 0.5)


def a2_nearest(ux: np.ndarray, uy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest A2 point (unit nearest-neighbour distance) to each ``(ux, uy)``:
    integer coordinates ``(m, b)``, point ``(m + (b & 1)/2, b * H)``."""
    ux = np.asarray(ux, dtype=np.float64)
    uy = np.asarray(uy, dtype=np.float64)
    t = uy / SQRT3
    m0 = _round(ux)
    b0 = 2.0 * _round(t)
    m1 = np.floor(ux)
    b1 = 2.0 * np.floor(t) + 1.0
    dx0 = ux - m0
    dy0 = uy - b0 * H
    dx1 = ux - (m1 + 0.5)
    dy1 = uy - b1 * H
    d0 = dx0 * dx0 + dy0 * dy0
    d1 = dx1 * dx1 + dy1 * dy1
    one = d1 < d0
    return np.where(one, m1, m0).astype(np.int64), np.where(one, b1, b0).astype(np.int64)


def a2_point(m: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The A2 point of integer coordinates ``(m, b)`` (unit step), float64."""
    m = np.asarray(m, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    return m.astype(np.float64) + 0.5 * (b & 1).astype(np.float64), H * b.astype(np.float64)


def pairs_of(rows2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` float64 ``[rows, pairs]``: columns ``2j`` and ``2j + 1``; an odd row
    length pads ``y = 0``."""
    w = np.asarray(rows2d)
    rows, cols = w.shape
    pairs = (cols + 1) // 2
    x = w[:, 0::2].astype(np.float64)
    y = np.zeros((rows, pairs), dtype=np.float64)
    y[:, : cols // 2] = w[:, 1::2]
    return x, y


def encode_rows(rows2d: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer lattice coordinates ``(m, b)``, int64 ``[rows, pairs]``, of every pair
    of ``rows2d`` with row steps ``steps`` (float64)."""
    x, y = pairs_of(rows2d)
    s = np.asarray(steps, dtype=np.float64)[:, None]
    m, b = a2_nearest(np.clip(x / s, -U_CLAMP, U_CLAMP), np.clip(y / s, -U_CLAMP, U_CLAMP))
    if m.size and max(int(np.abs(m).max()), int(np.abs(b).max())) > MAX_COORD:
        raise ValueError(f"a lattice coordinate exceeds {MAX_COORD}: the step is far too small for the row")
    return m, b


def decode_rows(m: np.ndarray, b: np.ndarray, steps: np.ndarray, cols: int) -> np.ndarray:
    """float64 ``[rows, cols]`` weights of coordinates ``(m, b)`` with row steps ``steps``."""
    m = np.asarray(m, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    s = np.asarray(steps, dtype=np.float64)[:, None]
    rows = m.shape[0]
    out = np.empty((rows, cols), dtype=np.float64)
    px = m.astype(np.float64) + 0.5 * (b & 1).astype(np.float64)
    py = H * b.astype(np.float64)
    out[:, 0::2] = s * px
    out[:, 1::2] = (s * py)[:, : cols // 2]
    return out


# -- the other lattices, for the design measurement only (bench_codec_v2_design.py) ---------

def z2_nearest(ux: np.ndarray, uy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Square grid of step 1: ``(m, b, x, y)``."""
    m = _round(np.asarray(ux, dtype=np.float64))
    b = _round(np.asarray(uy, dtype=np.float64))
    return m.astype(np.int64), b.astype(np.int64), m, b


def sheared_nearest(ux: np.ndarray, uy: np.ndarray, k: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The paper's trajectory lattice made unbounded: rows ``b`` (height ``b``), row
    ``b`` shifted by ``b/k`` (``docs/HYPERCOMPRESSION.md`` section 3 with ``l/k = 1``).
    Exact nearest point: the rows next to ``uy`` and, in each, the nearest column."""
    ux = np.asarray(ux, dtype=np.float64)
    uy = np.asarray(uy, dtype=np.float64)
    b0 = _round(uy)
    best = None
    for db in (-1.0, 0.0, 1.0):
        b = b0 + db
        a = _round(ux - b / k)
        px = a + b / k
        d = (ux - px) ** 2 + (uy - b) ** 2
        if best is None:
            best = [d, a, b, px, b.copy()]
        else:
            s = d < best[0]
            for i, v in enumerate((d, a, b, px, b)):
                best[i] = np.where(s, v, best[i])
    return best[1].astype(np.int64), best[2].astype(np.int64), best[3], best[4]
