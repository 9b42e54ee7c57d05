"""Host-side argument checks and per-trial tables shared by the CPU and CUDA kernels."""

from __future__ import annotations

import numpy as np

from compressor import quant_primitives as qp

MAX_BITS = 32


def f64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64)


def check_bits(bits) -> int:
    bits = int(bits)
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    return bits


def check_U(U) -> int:
    U = int(U)
    if U < 1:
        raise ValueError(f"U must be >= 1, got {U}")
    return U


def trial_tables(U: int, box_size: float, cx: float, cy: float, rho: np.ndarray):
    """Host-side tables shared by the CPU and CUDA kernels: lattice side ``k``,
    ``scale[j] = half / rho[j]`` and the reference's decode table (whose first
    ``U`` x's and first ``k`` y's are the lattice coordinates)."""
    U = check_U(U)
    rho = f64(rho)
    if rho.ndim != 1 or rho.shape[0] < 1:
        raise ValueError(f"rho must be a 1-D array of K+1 radii, got shape {rho.shape}")
    K = rho.shape[0] - 1
    if U * (K + 1) > 1 << 32:
        raise ValueError(f"U*(K+1) = {U * (K + 1)} does not fit the uint32 index")
    half = float(box_size) * 0.5
    scale = np.ones(K + 1, dtype=np.float64)
    scale[1:] = half / rho[1:]
    lut_x, lut_y = qp.decode_lut(U, K, float(box_size), float(cx), float(cy), rho)
    return qp.lattice_side(U), rho, scale, np.ascontiguousarray(lut_x), np.ascontiguousarray(lut_y)


def n_real_y(n: int, pad_cols: int) -> int:
    return n - (n // pad_cols if pad_cols > 0 else 0)




def check_points(px, py, pad_cols) -> tuple[np.ndarray, np.ndarray, int]:
    px = f64(px)
    py = f64(py)
    if px.shape != py.shape or px.ndim != 1:
        raise ValueError(f"px, py must be 1-D of equal length, got {px.shape} and {py.shape}")
    pad_cols = int(pad_cols)
    if pad_cols < 0:
        raise ValueError(f"pad_cols must be >= 0, got {pad_cols}")
    return px, py, pad_cols


def pack_args(theta, bits) -> tuple[np.ndarray, int]:
    """Validated ``(theta, bits)`` for a packer: 1-D uint16/uint32 (other integer
    types keep their low 32 bits, as the reference does)."""
    bits = check_bits(bits)
    theta = np.ascontiguousarray(theta).reshape(-1)
    if theta.dtype not in (np.uint16, np.uint32):
        theta = theta.astype(np.uint32)
    return theta, bits


def unpack_args(buf, n, bits) -> tuple[np.ndarray, int, int, int]:
    """Validated ``(buf, n, bits, needed bytes)`` for an unpacker."""
    bits = check_bits(bits)
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    buf = np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1)
    need = qp.packed_nbytes(n, bits)
    if buf.shape[0] < need:
        raise ValueError(f"bit stream of {buf.shape[0]} bytes is shorter than {need} for {n} values of {bits} bits")
    return buf, n, bits, need
