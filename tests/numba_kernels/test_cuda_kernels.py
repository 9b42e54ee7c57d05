"""numba_kernels.cuda against the NumPy reference, on small inputs.

Runs under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before numba is
imported, as scripts/test.sh does) or on a real GPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from numba.core import config as numba_config

from compressor import quant_primitives as qp

_spec = importlib.util.spec_from_file_location("kernel_cases", Path(__file__).with_name("kernel_cases.py"))
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

ck = pytest.importorskip("numba_kernels.cuda", reason="numba-cuda is not installed")
SIMULATOR = bool(numba_config.ENABLE_CUDASIM)
if not SIMULATOR and not ck.is_available()[0]:
    pytest.skip(
        "numba.cuda is not in simulator mode (set NUMBA_ENABLE_CUDASIM=1 before numba is imported) "
        f"and there is no usable GPU ({ck.is_available()[1]})",
        allow_module_level=True,
    )
N_POINTS = 240 if SIMULATOR else 20000  # the simulator runs each CUDA thread in Python


def test_is_available_never_offers_the_simulator():
    ok, reason = ck.is_available()
    if SIMULATOR:
        assert (ok, reason) == (False, "CUDA simulator")
    else:
        assert ok and reason


@pytest.mark.parametrize("U", cases.U_VALUES)
def test_nearest_equals_bruteforce(U):
    rng = np.random.default_rng(U)
    cx, cy = -0.004, 0.0091
    qx, qy = cases.hard_points(U, cx, cy, rng, n_random=N_POINTS // 2)
    sel = rng.choice(qx.shape[0], size=min(qx.shape[0], N_POINTS), replace=False)
    qx, qy = qx[sel], qy[sel]
    np.testing.assert_array_equal(cases.nearest(ck, qx, qy, U, cases.BOX, cx, cy),
                                  qp.nearest_bruteforce(qx, qy, U, cases.BOX, cx, cy))


@pytest.mark.parametrize("K", [0, 1, 2, 3])
@pytest.mark.parametrize("U", cases.U_VALUES)
def test_encode_trial_equals_reference(U, K):
    rng = np.random.default_rng(1000 * U + K)
    kind = cases.PAD_KINDS[(U + K) % len(cases.PAD_KINDS)]
    pts = cases.point_set(kind, N_POINTS, rng)
    px, py = pts.px, pts.py
    if K == 0:
        px, py = cases.into_box(px, py)
    geo = qp.point_geometry(px, py, cases.BOX)
    rho = qp.class_radii(geo.R, cases.BOX, K)
    want_theta, want_err = qp.encode_trial(px, py, geo.cx, geo.cy, cases.BOX, U, rho, pts.pad_cols)
    theta, err = cases.encode_trial(ck, px, py, geo.cx, geo.cy, cases.BOX, U, rho, pts.pad_cols)
    assert theta.dtype == np.uint32
    np.testing.assert_array_equal(theta, want_theta)
    assert isinstance(err, float) and err == want_err


def test_encode_trial_equals_cpu_backend():
    cpu = pytest.importorskip("numba_kernels.cpu")
    rng = np.random.default_rng(9)
    pts = cases.point_set("rows-odd", N_POINTS, rng)
    geo = qp.point_geometry(pts.px, pts.py, cases.BOX)
    rho = qp.class_radii(geo.R, cases.BOX, 3)
    a = cases.encode_trial(ck, pts.px, pts.py, geo.cx, geo.cy, cases.BOX, 1600, rho, pts.pad_cols)
    b = cases.encode_trial(cpu, pts.px, pts.py, geo.cx, geo.cy, cases.BOX, 1600, rho, pts.pad_cols)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int64])
def test_decode_points_equals_reference(dtype):
    rng = np.random.default_rng(5)
    rho = qp.class_radii(0.4, cases.BOX, 3)
    lx, ly = qp.decode_lut(1600, 3, cases.BOX, 0.01, -0.02, rho)
    theta = rng.integers(0, lx.shape[0], size=N_POINTS).astype(dtype)
    x, y = ck.decode_points(theta, lx, ly)
    x0, y0 = qp.decode_points(theta, lx, ly)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    with pytest.raises(IndexError):
        ck.decode_points(np.array([lx.shape[0]], dtype=dtype), lx, ly)


@pytest.mark.parametrize("bits", range(1, 33))
def test_pack_unpack_equal_reference(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 9, 77):
        theta = rng.integers(0, 1 << bits, size=n, dtype=np.uint64).astype(np.uint32)
        buf = ck.pack_bits(theta, bits)
        np.testing.assert_array_equal(buf, qp.pack_bits(theta, bits))
        back = ck.unpack_bits(buf, n, bits)
        assert back.dtype == np.uint32
        np.testing.assert_array_equal(back, theta)
    if bits <= 16:
        theta16 = rng.integers(0, 1 << bits, size=41).astype(np.uint16)
        np.testing.assert_array_equal(ck.pack_bits(theta16, bits), qp.pack_bits(theta16, bits))


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        ck.pack_bits(np.zeros(4, np.uint32), 33)
    with pytest.raises(ValueError, match="shorter"):
        ck.unpack_bits(np.zeros(3, np.uint8), 4, 7)
    with pytest.raises(ValueError, match="equal length"):
        cases.encode_trial(ck, np.zeros(3), np.zeros(4), 0.0, 0.0, cases.BOX, 1600, qp.class_radii(1.0, cases.BOX, 1), 0)


def test_encode_trial_takes_points_uploaded_once():
    """The codec uploads a tensor's points once (to_device) and passes them to every trial."""
    rng = np.random.default_rng(11)
    px, py = rng.normal(0, 0.03, 257), rng.normal(0, 0.03, 257)
    geo = qp.point_geometry(px, py, 0.1)
    rho = qp.class_radii(geo.R, 0.1, 2)
    ref = qp.encode_trial(px, py, geo.cx, geo.cy, 0.1, 100, rho, 5)
    dpx, dpy = ck.to_device(px), ck.to_device(py)
    for _ in range(2):
        theta, err = cases.encode_trial(ck, dpx, dpy, geo.cx, geo.cy, 0.1, 100, rho, 5)
        assert np.array_equal(theta, ref[0]) and err == ref[1]
