"""Inputs shared by the CPU and CUDA kernel tests (not a test module)."""

from __future__ import annotations

import numpy as np

from compressor import quant_primitives as qp

U_VALUES = [9, 50, 65, 1000, 1225, 1600, 2500]  # square and non-square, tiny and large
BOX = 0.1


def hard_points(U: int, cx: float, cy: float, rng: np.random.Generator, n_random: int) -> tuple[np.ndarray, np.ndarray]:
    """Query points for the nearest-point search: random in (and a bit around) the
    box, its edges and corners, the lattice points, and midpoints between lattice
    neighbours in x, in y and diagonally (exact ties in real arithmetic)."""
    half = BOX * 0.5
    ox, oy = cx - half, cy - half
    xs = [rng.uniform(ox, ox + BOX, n_random), rng.uniform(ox - 0.02, ox + BOX + 0.02, n_random // 4)]
    ys = [rng.uniform(oy, oy + BOX, n_random), rng.uniform(oy - 0.02, oy + BOX + 0.02, n_random // 4)]
    edge = np.linspace(0.0, 1.0, 41)
    for e in (0.0, 1.0):
        xs += [ox + BOX * edge, np.full(edge.size, ox + BOX * e)]
        ys += [np.full(edge.size, oy + BOX * e), oy + BOX * edge]
    corners = np.array([0.0, 1.0, 0.0, 1.0]), np.array([0.0, 0.0, 1.0, 1.0])
    xs.append(ox + BOX * corners[0])
    ys.append(oy + BOX * corners[1])
    tx, ty = qp.lattice_points(U, BOX, cx, cy)
    pick = rng.choice(U, size=min(U, 300), replace=False)
    k = qp.lattice_side(U)
    xs.append(tx[pick])
    ys.append(ty[pick])
    # neighbours: next in the row (n+k), next row (n+1), both
    for step in (k, 1, k + 1):
        ok = pick[pick + step < U]
        xs.append(0.5 * (tx[ok] + tx[ok + step]))
        ys.append(0.5 * (ty[ok] + ty[ok + step]))
    return np.concatenate(xs), np.concatenate(ys)


def weights(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Weight-like values: mostly inside a 0.1 box, heavy tails so every outer class is used."""
    w = 0.02 * rng.standard_t(3, size=shape)
    return w + 0.003  # off-zero centroid


def point_set(kind: str, n_points: int, rng: np.random.Generator) -> qp.PointSet:
    """``even``: no padding; ``rows-odd``/``rows-even``: odd column count giving an
    odd/even ``pad_cols``; ``flat-odd``: odd element count (one padded y, last point)."""
    if kind == "even":
        return qp.tensor_points(weights((2 * n_points,), rng), qp.LAYOUT_FLAT)
    if kind == "flat-odd":
        return qp.tensor_points(weights((2 * n_points - 1,), rng), qp.LAYOUT_FLAT)
    cols = 33 if kind == "rows-odd" else 31  # pad_cols 17 / 16
    rows = max(1, n_points // ((cols + 1) // 2))
    return qp.tensor_points(weights((rows, cols), rng), qp.LAYOUT_ROWS)


PAD_KINDS = ["even", "rows-odd", "rows-even", "flat-odd"]


def into_box(px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip points into the box around their centroid (many land exactly on its edges).
    0.9 keeps them inner after clipping moves the centroid."""
    lim = 0.9 * BOX * 0.5
    cx, cy = px.mean(), py.mean()
    return cx + np.clip(px - cx, -lim, lim), cy + np.clip(py - cy, -lim, lim)


def encode_trial(mod, px, py, cx, cy, box_size, U, rho, pad_cols):
    """A kernel module's ``encode_trial`` with the reference's tables (the kernels
    take them as arguments; ``compressor.backends`` passes them the same way)."""
    k, lut_x, lut_y = qp.trial_tables(U, box_size, cx, cy, rho)
    return mod.encode_trial(px, py, cx, cy, box_size, U, rho, pad_cols, k, lut_x, lut_y)


def nearest(mod, qx, qy, U, box_size, cx, cy):
    """A kernel module's ``nearest`` with the reference's lattice."""
    tx, ty = qp.lattice_points(U, box_size, cx, cy)
    return mod.nearest(qx, qy, U, box_size, cx, cy, qp.lattice_side(U), tx, ty)
