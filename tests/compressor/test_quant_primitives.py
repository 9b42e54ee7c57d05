"""The reference codec against the definitions of docs/HYPERCOMPRESSION.md."""

import numpy as np
import pytest

from compressor import quant_primitives as qp


def _box_queries(rng, U, l, cx, cy, n=20000):
    tx, ty = qp.lattice_points(U, l, cx, cy)
    u, v = rng.random(n), rng.random(n)
    edge = np.r_[np.zeros(200), np.ones(200), rng.random(400)]
    edge2 = np.r_[rng.random(400), np.zeros(200), np.ones(200)]
    qx = np.r_[cx - l / 2 + l * u, cx - l / 2 + l * edge, tx, (tx[:-1] + tx[1:]) / 2]
    qy = np.r_[cy - l / 2 + l * v, cy - l / 2 + l * edge2, ty, (ty[:-1] + ty[1:]) / 2]
    return qx, qy


@pytest.mark.parametrize("U", [9, 50, 65, 81, 1000, 1225, 1600, 2500])
def test_nearest_equals_bruteforce(U):
    rng = np.random.default_rng(U)
    l = 0.1
    cx, cy = rng.normal(0, 0.02, 2)
    qx, qy = _box_queries(rng, U, l, cx, cy)
    assert np.array_equal(qp.nearest_lattice(qx, qy, U, l, cx, cy), qp.nearest_bruteforce(qx, qy, U, l, cx, cy))


def test_lattice_from_integers_not_float_mod():
    # In float64 the mod formula puts 30 of the 1600 points on the top edge (y = l)
    U, l = 1600, 0.1
    k = qp.lattice_side(U)
    t = np.arange(U, dtype=np.float64)
    y_mod = np.mod(t * (l / k), l)
    _, ty = qp.lattice_points(U, l, l / 2, l / 2)  # origin at (0, 0)
    assert ty.min() == 0.0 and ty.max() < l
    assert np.array_equal(np.round(ty / l * k).astype(int), np.arange(U) % k)
    assert (np.abs(y_mod - l) < 1e-9).sum() > 0  # the flaw we avoid really exists


def test_lattice_side():
    assert [qp.lattice_side(u) for u in (1, 4, 5, 1225, 1600, 1601)] == [1, 2, 3, 35, 40, 41]


def test_classes_and_scaling():
    l, K = 0.1, 3
    px = np.array([0.0, 0.04, 0.06, 0.3, 1.0, -1.0])
    py = np.zeros_like(px)
    cx = cy = 0.0
    R = 1.0
    rho = qp.class_radii(R, l, K)
    assert rho[0] == 0.05 and rho[K] == R
    assert np.allclose(np.diff(rho[1:]), (R - 0.05) / K)
    cls = qp.classify(px, py, cx, cy, l, rho)
    assert cls.tolist() == [0, 0, 1, 1, 3, 3]
    qx, qy = qp.scale_points(px, py, cx, cy, l, rho, cls)
    assert np.all(np.abs(qx - cx) <= l / 2 + 1e-15)  # every scaled point is inside the disc
    assert qx[0] == px[0] and qx[1] == px[1]  # inner points are coded as they are


def test_points_padding_rows_and_flat():
    w = np.arange(15, dtype=np.float64).reshape(3, 5)
    pts = qp.tensor_points(w, qp.LAYOUT_ROWS)
    assert pts.pad and pts.pad_cols == 3 and pts.n == 9
    # pad = mean of each row's second coordinates (columns 1 and 3)
    assert np.array_equal(pts.py.reshape(3, 3)[:, 2], (w[:, 1] + w[:, 3]) / 2)
    back = qp.points_to_tensor(pts.px, pts.py, w.shape, qp.LAYOUT_ROWS)
    assert np.array_equal(back, w)
    f = np.arange(7, dtype=np.float64)
    fp = qp.tensor_points(f, qp.LAYOUT_FLAT)
    assert fp.pad and fp.py[-1] == (1 + 3 + 5) / 3
    assert np.array_equal(qp.points_to_tensor(fp.px, fp.py, (7,), qp.LAYOUT_FLAT), f)


def test_encode_decode_error_bound():
    rng = np.random.default_rng(1)
    px, py = rng.normal(0, 0.02, 5000), rng.normal(0, 0.02, 5000)
    geo = qp.point_geometry(px, py, 0.1)
    rho = qp.class_radii(geo.R, 0.1, 2)
    theta, err = qp.encode_trial(px, py, geo.cx, geo.cy, 0.1, 1600, rho, 0)
    assert theta.max() < 1600 * 3
    lx, ly = qp.decode_lut(1600, 2, 0.1, geo.cx, geo.cy, rho)
    dx, dy = qp.decode_points(theta, lx, ly)
    # inner points land within one lattice spacing l/k (the sheared rows leave up to a
    # full spacing free at the box's right edge); interior ones within half a diagonal
    inner = qp.classify(px, py, geo.cx, geo.cy, 0.1, rho) == 0
    d = np.hypot(px - dx, py - dy)
    assert d[inner].max() <= 0.1 / 40 + 1e-12
    centre = inner & (np.abs(px - geo.cx) < 0.04) & (np.abs(py - geo.cy) < 0.04)
    assert d[centre].max() <= 0.1 / 40 * np.sqrt(2) / 2 + 1e-12
    assert err == pytest.approx(np.abs(px - dx).sum() + np.abs(py - dy).sum(), rel=1e-12)


@pytest.mark.parametrize("bits", [1, 3, 8, 13, 16, 17, 31, 32])
def test_pack_roundtrip(bits):
    rng = np.random.default_rng(bits)
    theta = rng.integers(0, 2**bits, size=1001, dtype=np.uint64).astype(np.uint32)
    buf = qp.pack_bits(theta, bits)
    assert buf.size == qp.packed_nbytes(1001, bits)
    assert np.array_equal(qp.unpack_bits(buf, 1001, bits), theta)
    # LSB-first: value 0's bits are the lowest bits of byte 0
    assert buf[0] & 1 == theta[0] & 1
