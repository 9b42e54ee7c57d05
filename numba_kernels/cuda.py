"""Numba-CUDA kernels of the Hyper-Compression codec.

The functions of :mod:`compressor.quant_primitives` with the lattice and decode
tables as arguments, as in :mod:`numba_kernels.cpu` (host NumPy arrays in and
out), and the same results bit for bit as the reference and
:mod:`numba_kernels.cpu`, so a checkpoint does not depend on the backend that
wrote it:

* the kernels compute in float64 with ``fastmath=False`` (IEEE division and
  square root);
* NVVM contracts ``a*b + c`` into an FMA by default (its ``-fma=1``): numba-cuda's
  ``fastmath=False`` only omits ``fastmath``'s options and leaves that default,
  and ``cuda.jit`` has no switch for it (numba-cuda 0.30, ``cudadrv/nvvm.py``
  ``compile_ir``). So every product that feeds a sum goes through
  ``libdevice.dmul_rn`` (PTX ``mul.rn.f64``), which is never fused;
* lattice coordinates and the decode table are the reference's NumPy tables,
  passed in by the caller;
* each point's absolute errors come back to the host and are summed there with
  NumPy, as the reference does, so the error sum is the reference's too (the
  backend's ``error_sum`` is :func:`decode_points` followed by the reference's
  sums, composed in :mod:`compressor.backends`).

Under ``NUMBA_ENABLE_CUDASIM=1`` the same kernels run in the simulator (tests),
but :func:`is_available` says False so that ``auto`` never picks it.
"""

from __future__ import annotations

import math

import numpy as np
from numba.core import config as _numba_config

from . import bitpack
from .host import (check_points, f64 as _f64, lattice_args, n_real_y, pack_args, packed_nbytes, trial_tables,
                   unpack_args)

from ._compat import import_cuda

cuda = import_cuda()

_SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)
_BLOCK = 256
_MAX_BLOCKS = 8192  # grid-stride loops cover the rest
_SIM_THREADS = 32  # the simulator runs one Python thread per CUDA thread


def is_available() -> tuple[bool, str]:
    """(usable, reason): True only with a real CUDA GPU."""
    if _SIMULATOR:
        return False, "CUDA simulator"
    try:
        if not cuda.is_available():
            return False, "no CUDA driver or GPU"
        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        return True, f"{name} (compute capability {dev.compute_capability})"
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


@cuda.jit(device=True)
def _scan_row(x, ey2, fu, b, k, U, invk, tx, best_d, best_n):
    """See ``numba_kernels.cpu._scan_row``: columns ``rint(pos)-1..+1`` of row ``b``."""
    amax = (U - 1 - b) // k
    t = fu - b * invk
    if not (t >= 0.0):
        t = 0.0
    if t > amax:
        t = float(amax)
    a0 = int(math.floor(t + 0.5))
    lo = a0 - 1 if a0 > 0 else 0
    hi = a0 + 1 if a0 < amax else amax
    for a in range(lo, hi + 1):
        nn = a * k + b
        ex = x - tx[nn]
        d = _mul(ex, ex) + ey2
        if d < best_d or (d == best_d and nn < best_n):
            best_d = d
            best_n = nn
    return best_d, best_n


@cuda.jit(device=True)
def _nearest_one(x, y, ox, oy, kl, invk, k, U, tx, ty):
    """See ``numba_kernels.cpu._nearest_one`` (exact argmin, ties to the smallest n)."""
    fv = (y - oy) * kl
    if not (fv >= 0.0):
        fv = 0.0
    if fv > k - 1:
        fv = float(k - 1)
    b0 = int(math.floor(fv + 0.5))
    fu = (x - ox) * kl
    ey = y - ty[b0]
    best_d, best_n = _scan_row(x, _mul(ey, ey), fu, b0, k, U, invk, tx, math.inf, 0)
    b = b0 - 1
    while b >= 0:
        ey = y - ty[b]
        ey2 = _mul(ey, ey)
        if ey2 > best_d:
            break
        best_d, best_n = _scan_row(x, ey2, fu, b, k, U, invk, tx, best_d, best_n)
        b -= 1
    b = b0 + 1
    while b < k:
        ey = y - ty[b]
        ey2 = _mul(ey, ey)
        if ey2 > best_d:
            break
        best_d, best_n = _scan_row(x, ey2, fu, b, k, U, invk, tx, best_d, best_n)
        b += 1
    return best_n


@cuda.jit(fastmath=False, cache=True)
def _nearest_kernel(qx, qy, cx, cy, box_size, k, U, tx, ty, out):
    half = box_size * 0.5
    ox = cx - half
    oy = cy - half
    kl = k / box_size
    invk = 1.0 / k
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < qx.shape[0]:
        out[i] = _nearest_one(qx[i], qy[i], ox, oy, kl, invk, k, U, tx, ty)
        i += stride


@cuda.jit(fastmath=False, cache=True)
def _encode_kernel(px, py, cx, cy, half, k, U, rho, scale, lut_x, lut_y, pad_cols, theta, ax, ay):
    n = px.shape[0]
    K = rho.shape[0] - 1
    ox = cx - half
    oy = cy - half
    kl = k / (half + half)
    invk = 1.0 / k
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < n:
        x = px[i]
        y = py[i]
        dx = x - cx
        dy = y - cy
        j = 0
        qx = x
        qy = y
        if K > 0 and not (abs(dx) <= half and abs(dy) <= half):
            r = math.sqrt(_mul(dx, dx) + _mul(dy, dy))
            j = 1
            while j < K and not (r <= rho[j]):
                j += 1
            s = scale[j]
            qx = cx + _mul(dx, s)
            qy = cy + _mul(dy, s)
        t = _nearest_one(qx, qy, ox, oy, kl, invk, k, U, lut_x, lut_y) + U * j
        theta[i] = t
        ax[i] = abs(x - lut_x[t])
        ey = abs(y - lut_y[t])
        if pad_cols > 0:
            if i % pad_cols != pad_cols - 1:
                ay[i - (i + 1) // pad_cols] = ey
        else:
            ay[i] = ey
        i += stride


@cuda.jit(fastmath=False, cache=True)
def _decode_kernel(theta, lut_x, lut_y, x, y):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < theta.shape[0]:
        t = theta[i]
        x[i] = lut_x[t]
        y[i] = lut_y[t]
        i += stride


_pack_group = cuda.jit(device=True)(bitpack.pack_group)
_unpack_group = cuda.jit(device=True)(bitpack.unpack_group)


@cuda.jit(cache=True)
def _pack_kernel(theta, bits, out):
    mask = (np.uint64(1) << np.uint64(bits)) - np.uint64(1)
    g = cuda.grid(1)
    stride = cuda.gridsize(1)
    while g < (theta.shape[0] + 7) // 8:
        _pack_group(theta, bits, mask, g, out)
        g += stride


@cuda.jit(cache=True)
def _unpack_kernel(buf, n, bits, out):
    mask = (np.uint64(1) << np.uint64(bits)) - np.uint64(1)
    g = cuda.grid(1)
    stride = cuda.gridsize(1)
    while g < (n + 7) // 8:
        _unpack_group(buf, n, bits, mask, g, out)
        g += stride


# -- host wrappers (the backend API) --------------------------------------------

def _launch(n_items: int) -> tuple[int, int]:
    if _SIMULATOR:
        return 1, _SIM_THREADS
    return max(1, min(_MAX_BLOCKS, (n_items + _BLOCK - 1) // _BLOCK)), _BLOCK


def nearest(qx, qy, U, box_size, cx, cy, k, tx, ty) -> np.ndarray:
    """Index of the nearest lattice point for every point (= ``nearest_bruteforce``);
    ``k, tx, ty``: the lattice side and coordinates (``quant_primitives.lattice_points``)."""
    qx = _f64(qx)
    qy = _f64(qy)
    if qx.shape != qy.shape or qx.ndim != 1:
        raise ValueError(f"qx, qy must be 1-D of equal length, got {qx.shape} and {qy.shape}")
    U, k, tx, ty = lattice_args(U, k, tx, ty)
    n = qx.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.int64)
    d_out = cuda.device_array(n, dtype=np.int64)
    grid, block = _launch(n)
    _nearest_kernel[grid, block](cuda.to_device(qx), cuda.to_device(qy), float(cx), float(cy), float(box_size),
                                 k, U, cuda.to_device(tx), cuda.to_device(ty), d_out)
    return d_out.copy_to_host()


def to_device(a: np.ndarray):
    """Upload a float64 point array once; :func:`encode_trial` accepts the result, so
    the codec transfers a tensor's points once for all its (U, K) trials."""
    return cuda.to_device(_f64(a))


def _points_on_device(px, py, pad_cols):
    # device arrays (real or simulated) are not ndarrays and copy back to the host
    if not isinstance(px, np.ndarray) and hasattr(px, "copy_to_host") and hasattr(py, "copy_to_host"):
        if px.dtype != np.float64 or py.dtype != np.float64 or px.ndim != 1 or px.shape != py.shape:
            raise ValueError(f"device px, py must be 1-D float64 of equal length, got {px.shape} and {py.shape}")
        pad_cols = int(pad_cols)
        if pad_cols < 0:
            raise ValueError(f"pad_cols must be >= 0, got {pad_cols}")
        return px, py, pad_cols
    px, py, pad_cols = check_points(px, py, pad_cols)
    return cuda.to_device(px), cuda.to_device(py), pad_cols


def encode_trial(px, py, cx, cy, box_size, U, rho, pad_cols, k, lut_x, lut_y) -> tuple[np.ndarray, float]:
    """One ``(U, K)`` trial: ``theta`` (uint32) and the float64 sum of absolute errors;
    ``k, lut_x, lut_y``: the lattice side and decode table (``quant_primitives.trial_tables``)."""
    d_px, d_py, pad_cols = _points_on_device(px, py, pad_cols)
    k, rho, scale, lut_x, lut_y = trial_tables(U, box_size, rho, k, lut_x, lut_y)
    U = int(U)
    half = float(box_size) * 0.5
    n = d_px.shape[0]
    n_y = n_real_y(n, pad_cols)
    if n == 0:
        return np.empty(0, dtype=np.uint32), 0.0
    d_theta = cuda.device_array(n, dtype=np.uint32)
    d_ax = cuda.device_array(n, dtype=np.float64)
    d_ay = cuda.device_array(max(n_y, 1), dtype=np.float64)
    grid, block = _launch(n)
    _encode_kernel[grid, block](
        d_px, d_py, float(cx), float(cy), half, k, U,
        cuda.to_device(rho), cuda.to_device(scale), cuda.to_device(lut_x),
        cuda.to_device(lut_y), pad_cols, d_theta, d_ax, d_ay,
    )
    ax = d_ax.copy_to_host()
    ay = d_ay.copy_to_host()[:n_y]
    # NumPy's (pairwise) sums over the same arrays as the reference's abs_error_sum
    return d_theta.copy_to_host(), float(ax.sum() + ay.sum())


def decode_points(theta, lut_x, lut_y) -> tuple[np.ndarray, np.ndarray]:
    """``(lut_x[theta], lut_y[theta])``; raises IndexError for an index past the table."""
    theta = np.ascontiguousarray(theta).reshape(-1)
    if theta.dtype not in (np.uint16, np.uint32, np.int64):
        theta = theta.astype(np.int64)
    lut_x = _f64(lut_x)
    lut_y = _f64(lut_y)
    if lut_x.shape != lut_y.shape:
        raise ValueError(f"decode tables differ in length: {lut_x.shape} vs {lut_y.shape}")
    n = theta.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.float64), np.empty(0, dtype=np.float64)
    lo, hi = int(theta.min()), int(theta.max())
    if lo < 0 or hi >= lut_x.shape[0]:
        raise IndexError(f"index {hi if hi >= lut_x.shape[0] else lo} outside a decode table of {lut_x.shape[0]}")
    d_x = cuda.device_array(n, dtype=np.float64)
    d_y = cuda.device_array(n, dtype=np.float64)
    grid, block = _launch(n)
    _decode_kernel[grid, block](cuda.to_device(theta), cuda.to_device(lut_x), cuda.to_device(lut_y), d_x, d_y)
    return d_x.copy_to_host(), d_y.copy_to_host()


def pack_bits(theta, bits) -> np.ndarray:
    """LSB-first bit stream of ``bits`` bits per value (only the low ``bits`` bits are kept)."""
    theta, bits = pack_args(theta, bits)
    nbytes = packed_nbytes(theta.shape[0], bits)
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    d_out = cuda.device_array(nbytes, dtype=np.uint8)
    grid, block = _launch((theta.shape[0] + 7) // 8)
    _pack_kernel[grid, block](cuda.to_device(theta), bits, d_out)
    return d_out.copy_to_host()


def unpack_bits(buf, n, bits) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` values as uint32."""
    buf, n, bits, need = unpack_args(buf, n, bits)
    if n == 0:
        return np.empty(0, dtype=np.uint32)
    d_out = cuda.device_array(n, dtype=np.uint32)
    grid, block = _launch((n + 7) // 8)
    _unpack_kernel[grid, block](cuda.to_device(buf[:need]), n, bits, d_out)
    return d_out.copy_to_host()
