"""numba_kernels.cpu against the NumPy reference (compressor.quant_primitives)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numba
import numpy as np
import pytest

from compressor import quant_primitives as qp
from numba_kernels import cpu, threads

_spec = importlib.util.spec_from_file_location("kernel_cases", Path(__file__).with_name("kernel_cases.py"))
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)


@pytest.mark.parametrize("U", cases.U_VALUES)
def test_nearest_equals_bruteforce(U):
    rng = np.random.default_rng(U)
    cx, cy = 0.0123, -0.0071
    qx, qy = cases.hard_points(U, cx, cy, rng, n_random=3000)
    got = cases.nearest(cpu, qx, qy, U, cases.BOX, cx, cy)
    want = qp.nearest_bruteforce(qx, qy, U, cases.BOX, cx, cy)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("U", [1, 2, 3, 5, 10, 17])
def test_nearest_tiny_lattices(U):
    rng = np.random.default_rng(100 + U)
    qx, qy = cases.hard_points(U, 0.0, 0.0, rng, n_random=500)
    np.testing.assert_array_equal(cases.nearest(cpu, qx, qy, U, cases.BOX, 0.0, 0.0),
                                  qp.nearest_bruteforce(qx, qy, U, cases.BOX, 0.0, 0.0))


@pytest.mark.parametrize("K", [0, 1, 2, 3])
@pytest.mark.parametrize("U", cases.U_VALUES)
def test_encode_trial_equals_reference(U, K):
    rng = np.random.default_rng(1000 * U + K)
    kind = cases.PAD_KINDS[(U + K) % len(cases.PAD_KINDS)]
    pts = cases.point_set(kind, 9000, rng)  # > 2 parallel chunks
    px, py = pts.px, pts.py
    if K == 0:
        px, py = cases.into_box(px, py)  # the codec uses K = 0 only when every point is inner
    geo = qp.point_geometry(px, py, cases.BOX)
    assert geo.all_inner == (K == 0)
    rho = qp.class_radii(geo.R, cases.BOX, K)
    want_theta, want_err = qp.encode_trial(px, py, geo.cx, geo.cy, cases.BOX, U, rho, pts.pad_cols)
    theta, err = cases.encode_trial(cpu, px, py, geo.cx, geo.cy, cases.BOX, U, rho, pts.pad_cols)
    assert theta.dtype == np.uint32
    np.testing.assert_array_equal(theta, want_theta)
    assert isinstance(err, float)
    # same per-point errors summed by the same NumPy reduction: equal to the last bit
    assert err == want_err
    if K > 0:
        assert len(np.unique(theta // U)) == K + 1  # every class occurs: the test covers them


@pytest.mark.parametrize("kind", cases.PAD_KINDS)
def test_encode_trial_padding_is_excluded(kind):
    rng = np.random.default_rng(7)
    pts = cases.point_set(kind, 2000, rng)
    mask = qp.real_y_mask(pts.n, pts.pad_cols)
    assert mask.sum() == pts.n - (pts.n // pts.pad_cols if pts.pad_cols else 0)
    py = pts.py.copy()
    py[~mask] += 0.07  # padded y's far from any lattice point: counting them would show
    geo = qp.point_geometry(pts.px, py, cases.BOX)
    rho = qp.class_radii(geo.R, cases.BOX, 2)
    theta, err = cases.encode_trial(cpu, pts.px, py, geo.cx, geo.cy, cases.BOX, 1600, rho, pts.pad_cols)
    lx, ly = qp.decode_lut(1600, 2, cases.BOX, geo.cx, geo.cy, rho)
    ey = np.abs(py - ly[theta])
    expect = np.abs(pts.px - lx[theta]).sum() + ey[mask].sum()
    assert err == pytest.approx(expect, rel=1e-12)
    if pts.pad_cols:
        # with the padded y's counted the sum would differ
        assert err != pytest.approx(expect + ey[~mask].sum(), rel=1e-12)


def test_encode_trial_all_inner_and_empty():
    rng = np.random.default_rng(3)
    px = rng.uniform(-0.04, 0.04, 5000)
    py = rng.uniform(-0.04, 0.04, 5000)
    geo = qp.point_geometry(px, py, cases.BOX)
    assert geo.all_inner
    rho = qp.class_radii(geo.R, cases.BOX, 0)
    t, e = cases.encode_trial(cpu, px, py, geo.cx, geo.cy, cases.BOX, 1600, rho, 0)
    t0, e0 = qp.encode_trial(px, py, geo.cx, geo.cy, cases.BOX, 1600, rho, 0)
    np.testing.assert_array_equal(t, t0)
    assert e == e0
    t, e = cases.encode_trial(cpu, np.empty(0), np.empty(0), 0.0, 0.0, cases.BOX, 1600, rho, 0)
    assert t.shape == (0,) and e == 0.0


@pytest.mark.parametrize("U", [1225, 1000])
def test_encode_trial_k0_with_outer_points_is_exact(U):
    # K = 0 codes every point unscaled, even outside the box (the codec never asks
    # for that, but the kernel must still return the true nearest point). The
    # reference's 3-row window is not exact there, so compare with brute force.
    rng = np.random.default_rng(U)
    pts = cases.point_set("even", 4000, rng)
    geo = qp.point_geometry(pts.px, pts.py, cases.BOX)
    assert not geo.all_inner
    rho = qp.class_radii(geo.R, cases.BOX, 0)
    theta, err = cases.encode_trial(cpu, pts.px, pts.py, geo.cx, geo.cy, cases.BOX, U, rho, 0)
    want = qp.nearest_bruteforce(pts.px, pts.py, U, cases.BOX, geo.cx, geo.cy)
    np.testing.assert_array_equal(theta, want)
    tx, ty = qp.lattice_points(U, cases.BOX, geo.cx, geo.cy)
    assert err == np.abs(pts.px - tx[want]).sum() + np.abs(pts.py - ty[want]).sum()


@pytest.fixture
def codec_threads():
    """Sets numba_kernels.threads' count for one test, restoring it after."""
    before = threads._threads
    yield threads.set_threads
    threads._threads = before


def test_every_kernel_is_independent_of_thread_count(codec_threads):
    """1, 2 and 3 threads (more than this machine may have cores: the schedule then
    really interleaves) give the same bits, and the reference's."""
    rng = np.random.default_rng(11)
    pts = cases.point_set("rows-odd", 30000, rng)
    geo = qp.point_geometry(pts.px, pts.py, cases.BOX)
    rho = qp.class_radii(geo.R, cases.BOX, 3)
    want_theta, want_err = qp.encode_trial(pts.px, pts.py, geo.cx, geo.cy, cases.BOX, 2500, rho, pts.pad_cols)
    lx, ly = qp.decode_lut(2500, 3, cases.BOX, geo.cx, geo.cy, rho)
    results = []
    for n in (1, 2, 3):
        codec_threads(n)
        theta, err = cases.encode_trial(cpu, pts.px, pts.py, geo.cx, geo.cy, cases.BOX, 2500, rho, pts.pad_cols)
        x, y = cpu.decode_points(theta, lx, ly)
        packed = cpu.pack_bits(theta, 14)
        results.append((theta, err, x, y, packed, cpu.unpack_bits(packed, theta.size, 14),
                        cpu.error_sum(theta, lx, ly, pts.px, pts.py, pts.pad_cols),
                        cpu.radius_and_inner(pts.px, pts.py, geo.cx, geo.cy, cases.BOX),
                        cases.nearest(cpu, pts.px, pts.py, 2500, cases.BOX, geo.cx, geo.cy)))
    np.testing.assert_array_equal(results[0][0], want_theta)
    assert results[0][1] == want_err
    for r in results[1:]:
        for got, first in zip(r, results[0]):
            if isinstance(got, np.ndarray):
                np.testing.assert_array_equal(got, first)
            else:
                assert got == first


def test_run_chunks_takes_every_chunk_once_on_any_thread_count(codec_threads):
    """The dynamic schedule: each chunk claimed exactly once, whoever claims it."""

    @numba.njit("void(int64, int64[::1], int64[::1])", nogil=True)
    def count(n_chunks, hits, next_chunk):
        while True:
            c = threads.claim(next_chunk)
            if c >= n_chunks:
                break
            hits[c] += 1

    for n in (1, 2, 3, 8):
        codec_threads(n)
        for n_chunks in (0, 1, 5, 1000):
            hits = np.zeros(max(n_chunks, 1), dtype=np.int64)
            threads.run_chunks(count, n_chunks, n_chunks, hits)
            assert (hits[:n_chunks] == 1).all() and hits[n_chunks:].sum() == 0


def test_run_chunks_reraises_a_kernel_error(codec_threads):
    codec_threads(3)
    calls = []

    def boom(next_chunk):
        calls.append(1)
        raise IndexError("chunk failed")

    with pytest.raises(IndexError, match="chunk failed"):
        threads.run_chunks(boom, 10)
    assert len(calls) == 3  # the caller and both pool threads ran, and were all waited for
    with pytest.raises(ValueError, match=">= 1"):
        threads.set_threads(0)


def test_encode_trial_rejects_bad_input():
    rho = qp.class_radii(1.0, cases.BOX, 1)
    k, lx, ly = qp.trial_tables(1600, cases.BOX, 0.0, 0.0, rho)
    with pytest.raises(ValueError, match="equal length"):
        cpu.encode_trial(np.zeros(3), np.zeros(4), 0.0, 0.0, cases.BOX, 1600, rho, 0, k, lx, ly)
    with pytest.raises(ValueError, match="U must be"):
        cpu.encode_trial(np.zeros(3), np.zeros(3), 0.0, 0.0, cases.BOX, 0, rho, 0, k, lx, ly)
    with pytest.raises(ValueError, match="uint32"):
        cpu.encode_trial(np.zeros(3), np.zeros(3), 0.0, 0.0, cases.BOX, 1 << 32, rho, 0, k, lx, ly)
    # the caller's tables are checked against U and K, never trusted
    with pytest.raises(ValueError, match="lattice side"):
        cpu.encode_trial(np.zeros(3), np.zeros(3), 0.0, 0.0, cases.BOX, 1600, rho, 0, k + 1, lx, ly)
    with pytest.raises(ValueError, match="decode tables"):
        cpu.encode_trial(np.zeros(3), np.zeros(3), 0.0, 0.0, cases.BOX, 1600, rho, 0, k, lx[:-1], ly[:-1])
    with pytest.raises(ValueError, match="lattice coordinates"):
        cpu.nearest(np.zeros(3), np.zeros(3), 1600, cases.BOX, 0.0, 0.0, k, lx[:100], ly)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int64, np.int32])
def test_decode_points_equals_reference(dtype):
    rng = np.random.default_rng(5)
    rho = qp.class_radii(0.4, cases.BOX, 3)
    lx, ly = qp.decode_lut(1600, 3, cases.BOX, 0.01, -0.02, rho)
    theta = rng.integers(0, lx.shape[0], size=10001).astype(dtype)
    x, y = cpu.decode_points(theta, lx, ly)
    x0, y0 = qp.decode_points(theta, lx, ly)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    with pytest.raises(IndexError):
        cpu.decode_points(np.array([0, lx.shape[0]], dtype=dtype), lx, ly)


@pytest.mark.parametrize("bits", range(1, 33))
def test_pack_unpack_equal_reference(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 8, 9, 1001):
        theta = rng.integers(0, 1 << bits, size=n, dtype=np.uint64).astype(np.uint32)
        buf = cpu.pack_bits(theta, bits)
        assert buf.dtype == np.uint8
        np.testing.assert_array_equal(buf, qp.pack_bits(theta, bits))
        back = cpu.unpack_bits(buf, n, bits)
        assert back.dtype == np.uint32
        np.testing.assert_array_equal(back, theta)
        np.testing.assert_array_equal(back, qp.unpack_bits(buf, n, bits))
    if bits <= 16:
        theta16 = rng.integers(0, 1 << bits, size=333).astype(np.uint16)
        np.testing.assert_array_equal(cpu.pack_bits(theta16, bits), qp.pack_bits(theta16, bits))
    if bits < 32:
        # values wider than `bits` keep only their low bits, as in the reference
        wide = rng.integers(0, 1 << 32, size=100, dtype=np.uint64).astype(np.uint32)
        np.testing.assert_array_equal(cpu.pack_bits(wide, bits), qp.pack_bits(wide, bits))


def test_pack_unpack_reject_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        cpu.pack_bits(np.zeros(4, np.uint32), 0)
    with pytest.raises(ValueError, match="bits"):
        cpu.pack_bits(np.zeros(4, np.uint32), 33)
    with pytest.raises(ValueError, match="shorter"):
        cpu.unpack_bits(np.zeros(3, np.uint8), 4, 7)


@pytest.mark.parametrize("pad_cols", [0, 7, 1001])
def test_error_sum_matches_reference(pad_cols):
    from compressor import quant_primitives as qp
    from numba_kernels import cpu, threads

    rng = np.random.default_rng(pad_cols)
    n = 1001
    px, py = rng.normal(0, 0.02, n), rng.normal(0, 0.02, n)
    geo = qp.point_geometry(px, py, 0.1)
    rho = qp.class_radii(geo.R, 0.1, 2)
    theta, err = qp.encode_trial(px, py, geo.cx, geo.cy, 0.1, 1600, rho, pad_cols)
    lx, ly = qp.decode_lut(1600, 2, 0.1, geo.cx, geo.cy, rho)
    # rounding the table (as the codec does for the source dtype) changes nothing in the contract
    lx32, ly32 = lx.astype(np.float32).astype(np.float64), ly.astype(np.float32).astype(np.float64)
    for t in (theta, theta.astype(np.uint16)):
        assert cpu.error_sum(t, lx, ly, px, py, pad_cols) == err
        assert cpu.error_sum(t, lx32, ly32, px, py, pad_cols) == qp.error_sum(theta, lx32, ly32, px, py, pad_cols)


@pytest.mark.parametrize("scale", [0.001, 0.02, 1.0])
def test_radius_and_inner_matches_reference(scale):
    from compressor import quant_primitives as qp
    from numba_kernels import cpu, threads

    rng = np.random.default_rng(7)
    px, py = rng.normal(0, scale, 50001), rng.normal(0, scale, 50001)
    cx, cy = float(px.mean()), float(py.mean())
    assert cpu.radius_and_inner(px, py, cx, cy, 0.1) == qp.radius_and_inner(px, py, cx, cy, 0.1)
