"""Host-side argument checks and per-trial tables shared by the CPU and CUDA kernels.

The kernels import numpy and numba only: the lattice and decode tables they gather
from are built by the caller (``compressor.quant_primitives.trial_tables``, the
reference's own builders) and passed in as arguments.
"""

from __future__ import annotations

import numpy as np

MAX_BITS = 32


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of an LSB-first stream of ``n`` values of ``bits`` bits (the layout the
    bit-packing kernels write)."""
    return (n * bits + 7) // 8


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


def trial_tables(U: int, box_size: float, rho: np.ndarray, k: int, lut_x, lut_y):
    """Checked per-trial tables shared by the CPU and CUDA kernels: the caller's
    lattice side ``k`` and decode table (whose first ``U`` x's and first ``k`` y's
    are the lattice coordinates), and ``scale[j] = half / rho[j]``."""
    U = check_U(U)
    rho = f64(rho)
    if rho.ndim != 1 or rho.shape[0] < 1:
        raise ValueError(f"rho must be a 1-D array of K+1 radii, got shape {rho.shape}")
    K = rho.shape[0] - 1
    if U * (K + 1) > 1 << 32:
        raise ValueError(f"U*(K+1) = {U * (K + 1)} does not fit the uint32 index")
    k = int(k)
    if not (k >= 1 and (k - 1) * (k - 1) < U <= k * k):
        raise ValueError(f"lattice side k={k} is not ceil(sqrt(U)) for U={U}")
    lut_x = f64(lut_x)
    lut_y = f64(lut_y)
    if lut_x.shape != (U * (K + 1),) or lut_y.shape != lut_x.shape:
        raise ValueError(f"decode tables of shapes {lut_x.shape}, {lut_y.shape}; U*(K+1) = {U * (K + 1)} expected")
    half = float(box_size) * 0.5
    scale = np.ones(K + 1, dtype=np.float64)
    scale[1:] = half / rho[1:]
    return k, rho, scale, lut_x, lut_y


def lattice_args(U: int, k: int, tx, ty) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Checked ``(U, k, tx, ty[:k])`` for the nearest-point search: the caller's
    lattice side and coordinates (``quant_primitives.lattice_points``)."""
    U = check_U(U)
    k = int(k)
    if not (k >= 1 and (k - 1) * (k - 1) < U <= k * k):
        raise ValueError(f"lattice side k={k} is not ceil(sqrt(U)) for U={U}")
    tx = f64(tx)
    ty = f64(ty)
    if tx.shape != (U,) or ty.shape[0] < k:
        raise ValueError(f"lattice coordinates of shapes {tx.shape}, {ty.shape} for U={U}, k={k}")
    return U, k, tx, np.ascontiguousarray(ty[:k])


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
    need = packed_nbytes(n, bits)
    if buf.shape[0] < need:
        raise ValueError(f"bit stream of {buf.shape[0]} bytes is shorter than {need} for {n} values of {bits} bits")
    return buf, n, bits, need
