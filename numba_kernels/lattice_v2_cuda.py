"""Numba-CUDA kernels of codec v2's lattice quantizer.

Same host API and the same results, bit for bit, as ``numba_kernels/lattice_v2_cpu.py``
and the NumPy reference ``compressor/codec_v2/lattice.py`` (host NumPy arrays in and
out): float64 with ``fastmath=False`` (IEEE division), and every product that feeds a
sum through ``libdevice.dmul_rn`` (PTX ``mul.rn.f64``), because NVVM contracts
``a*b + c`` into an FMA by default (see ``numba_kernels/cuda.py``). One thread per
row for the row sums (a fixed column order), one thread per pair otherwise: no
result depends on the launch geometry.

Under ``NUMBA_ENABLE_CUDASIM=1`` the kernels run in numba's simulator (the tests).
"""

from __future__ import annotations

import math

import numpy as np
from numba.core import config as _numba_config

from ._compat import import_cuda

cuda = import_cuda()

SQRT3 = 1.7320508075688772
H = 0.8660254037844386
U_CLAMP = float((1 << 30) + 2)

_SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)
_BLOCK = 256
_MAX_BLOCKS = 8192
_SIM_THREADS = 32


def is_available() -> tuple[bool, str]:
    if _SIMULATOR:
        return False, "CUDA simulator"
    try:
        if not cuda.is_available():
            return False, "no CUDA driver or GPU"
        return True, "CUDA GPU"
    except Exception as exc:  # a broken driver must not break backend resolution
        return False, f"CUDA error: {exc}"


if _SIMULATOR:

    @cuda.jit(device=True)
    def _mul(a, b):
        return a * b  # the simulator evaluates in NumPy float64, which never fuses

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _mul(a, b):
        return libdevice.dmul_rn(a, b)


@cuda.jit(fastmath=False, cache=True)
def _row_sumsq_kernel(w, out):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    cols = w.shape[1]
    while i < w.shape[0]:
        acc = 0.0
        for j in range(cols):
            v = np.float64(w[i, j])
            acc += _mul(v, v)
        out[i] = acc
        i += stride


@cuda.jit(device=True)
def _clamp(u):
    return min(max(u, -U_CLAMP), U_CLAMP)


@cuda.jit(device=True)
def _nearest(ux, uy):
    t = uy / SQRT3
    m0 = math.floor(ux + 0.5)
    b0 = 2.0 * math.floor(t + 0.5)
    m1 = math.floor(ux)
    b1 = 2.0 * math.floor(t) + 1.0
    dx0 = ux - m0
    dy0 = uy - _mul(b0, H)
    dx1 = ux - (m1 + 0.5)
    dy1 = uy - _mul(b1, H)
    d0 = _mul(dx0, dx0) + _mul(dy0, dy0)
    d1 = _mul(dx1, dx1) + _mul(dy1, dy1)
    if d1 < d0:
        return m1, b1
    return m0, b0


@cuda.jit(fastmath=False, cache=True)
def _encode_kernel(w, steps, m_out, b_out):
    rows, cols = w.shape
    pairs = m_out.shape[1]
    full = cols // 2
    k = cuda.grid(1)
    stride = cuda.gridsize(1)
    while k < rows * pairs:
        i = k // pairs
        j = k - i * pairs
        s = steps[i]
        ux = _clamp(np.float64(w[i, 2 * j]) / s)
        uy = _clamp(np.float64(w[i, 2 * j + 1]) / s) if j < full else 0.0 / s
        m, b = _nearest(ux, uy)
        m_out[i, j] = m
        b_out[i, j] = b
        k += stride


@cuda.jit(fastmath=False, cache=True)
def _decode_kernel(m, b, steps, out):
    rows, cols = out.shape
    pairs = m.shape[1]
    k = cuda.grid(1)
    stride = cuda.gridsize(1)
    while k < rows * pairs:
        i = k // pairs
        j = k - i * pairs
        s = steps[i]
        bb = np.int64(b[i, j])
        # 0.5 * (b & 1) is exact, so a fused multiply-add there rounds the same
        out[i, 2 * j] = _mul(s, np.float64(m[i, j]) + 0.5 * np.float64(bb & 1))
        if 2 * j + 1 < cols:
            out[i, 2 * j + 1] = _mul(s, _mul(H, np.float64(bb)))
        k += stride


def _launch(n_items: int) -> tuple[int, int]:
    if _SIMULATOR:
        return 1, _SIM_THREADS
    return max(1, min(_MAX_BLOCKS, (n_items + _BLOCK - 1) // _BLOCK)), _BLOCK


def _rows2d(w) -> np.ndarray:
    a = np.ascontiguousarray(w)
    if a.ndim != 2 or a.dtype not in (np.float32, np.float64):
        raise ValueError(f"w must be a 2-D float32/float64 array, got {a.dtype} {a.shape}")
    return a


def row_sumsq(w, out) -> None:
    w = _rows2d(w)
    if out.shape != (w.shape[0],):
        raise ValueError(f"out must have shape ({w.shape[0]},)")
    if w.shape[0] == 0:
        return
    d_out = cuda.device_array(w.shape[0], dtype=np.float64)
    grid, block = _launch(w.shape[0])
    _row_sumsq_kernel[grid, block](cuda.to_device(w), d_out)
    out[:] = d_out.copy_to_host()


def encode_rows(w, steps, m_out, b_out) -> None:
    w = _rows2d(w)
    rows, cols = w.shape
    pairs = (cols + 1) // 2
    if m_out.shape != (rows, pairs) or b_out.shape != (rows, pairs):
        raise ValueError(f"m_out, b_out must have shape ({rows}, {pairs})")
    if rows * pairs == 0:
        return
    d_m = cuda.device_array((rows, pairs), dtype=m_out.dtype)
    d_b = cuda.device_array((rows, pairs), dtype=b_out.dtype)
    grid, block = _launch(rows * pairs)
    _encode_kernel[grid, block](cuda.to_device(w), cuda.to_device(np.ascontiguousarray(steps, dtype=np.float64)),
                                d_m, d_b)
    m_out[:] = d_m.copy_to_host()
    b_out[:] = d_b.copy_to_host()


def decode_rows(m, b, steps, out) -> None:
    m = np.ascontiguousarray(m)
    b = np.ascontiguousarray(b)
    rows, cols = out.shape
    if m.shape != (rows, (cols + 1) // 2) or b.shape != m.shape:
        raise ValueError(f"m, b must have shape ({rows}, {(cols + 1) // 2})")
    if m.size == 0:
        return
    d_out = cuda.device_array((rows, cols), dtype=out.dtype)
    grid, block = _launch(m.size)
    _decode_kernel[grid, block](cuda.to_device(m), cuda.to_device(b),
                                cuda.to_device(np.ascontiguousarray(steps, dtype=np.float64)), d_out)
    out[:] = d_out.copy_to_host()
