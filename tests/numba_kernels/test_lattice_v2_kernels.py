"""Codec v2 quantizer kernels (Numba CPU and CUDA on the simulator) against the NumPy
reference, bit for bit, for any thread count."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from compressor.codec_v2 import lattice as L
from compressor.codec_v2.kernels import resolve
from compressor.errors import BackendUnavailableError

cpu = pytest.importorskip("numba_kernels.lattice_v2_cpu")


def _cases():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((40, 67)) * np.geomspace(1e-3, 3, 40)[:, None]).astype(np.float32)
    w[5, 7] = 250.0  # an outlier: coordinate far outside int8
    w[9, :] = 0.0  # a zero row
    w[11, 3] = -w[11, 3]
    # exact lattice points and half-way points (ties)
    w[12, :8] = np.array([0.5, 0.0, 1.5, 0.0, 0.0, 0.8660254, -0.5, -0.8660254], dtype=np.float32)
    yield "float32 odd cols", w
    yield "float64 even cols", rng.laplace(0, 0.05, (33, 96))
    yield "one row", rng.standard_normal((1, 5)).astype(np.float32)


def _steps(w, q=0.17):
    base, rel = L.row_steps(L.row_sumsq(w), w.shape[1], q)
    return L.steps_f64(base, rel)


def test_constants_match_the_reference():
    import numba_kernels.lattice_linear_cpu as lin
    import numba_kernels.lattice_v2_cuda as cu

    for mod in (cpu, cu):
        assert mod.SQRT3 == L.SQRT3 and mod.H == L.H and mod.U_CLAMP == L.U_CLAMP
    assert lin.H == L.H


@pytest.mark.parametrize("label,w", list(_cases()), ids=[c[0] for c in _cases()])
def test_cpu_kernels_equal_reference(label, w):
    ss = np.empty(w.shape[0])
    cpu.row_sumsq(w, ss)
    assert np.array_equal(ss, L.row_sumsq(w))
    steps = _steps(w)
    m_ref, b_ref = L.encode_rows(w, steps)
    m = np.empty(m_ref.shape, dtype=np.int32)
    b = np.empty_like(m)
    cpu.encode_rows(w, steps, m, b)
    assert np.array_equal(m, m_ref) and np.array_equal(b, b_ref)
    out = np.empty(w.shape, dtype=np.float32)
    cpu.decode_rows(m, b, steps, out)
    assert np.array_equal(out, L.decode_rows(m_ref, b_ref, steps, w.shape[1]).astype(np.float32))
    out64 = np.empty(w.shape, dtype=np.float64)
    cpu.decode_rows(m, b, steps, out64)
    assert np.array_equal(out64, L.decode_rows(m_ref, b_ref, steps, w.shape[1]))


def test_cpu_kernels_same_bits_for_any_thread_count():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((501, 130)).astype(np.float32)
    steps = _steps(w)
    results = []
    before = numba.get_num_threads()
    try:
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS), numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n)
            ss = np.empty(w.shape[0])
            cpu.row_sumsq(w, ss)
            m = np.empty((501, 65), dtype=np.int32)
            b = np.empty_like(m)
            cpu.encode_rows(w, steps, m, b)
            out = np.empty(w.shape, dtype=np.float32)
            cpu.decode_rows(m, b, steps, out)
            results.append((ss, m, b, out))
    finally:
        numba.set_num_threads(before)
    for r in results[1:]:
        assert all(np.array_equal(x, y) for x, y in zip(r, results[0]))


def test_backend_wrappers_agree():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((20, 31)).astype(np.float32)
    ref, nb = resolve("reference"), resolve("numba-cpu")
    steps = _steps(w)
    assert np.array_equal(ref.row_sumsq(w), nb.row_sumsq(w))
    (m1, b1), (m2, b2) = ref.encode_rows(w, steps), nb.encode_rows(w, steps)
    assert np.array_equal(m1, m2) and np.array_equal(b1, b2)
    assert np.array_equal(ref.decode_rows(m1, b1, steps, 31), nb.decode_rows(m2, b2, steps, 31))
    for k in (ref, nb):  # a step far too small for the row: refused, never a wrapped integer
        with pytest.raises(ValueError):
            k.encode_rows(w, np.full(20, 1e-30))
    with pytest.raises(BackendUnavailableError):
        resolve("no-such-backend")


def test_cuda_kernels_on_the_simulator_equal_reference():
    if not numba.config.ENABLE_CUDASIM:
        pytest.skip("the CUDA simulator tests run with NUMBA_ENABLE_CUDASIM=1 (scripts/test.sh sets it)")
    k = resolve("numba-cuda", allow_simulator=True)
    rng = np.random.default_rng(7)
    w = rng.standard_normal((6, 9)).astype(np.float32) * 0.1
    w[2, 4] = 30.0
    w[3, :4] = np.array([0.5, 0.0, 1.5, 0.0], dtype=np.float32) * float(_steps(w)[3])
    steps = _steps(w)
    assert np.array_equal(k.row_sumsq(w), L.row_sumsq(w))
    m, b = k.encode_rows(w, steps)
    m_ref, b_ref = L.encode_rows(w, steps)
    assert np.array_equal(m, m_ref) and np.array_equal(b, b_ref)
    assert np.array_equal(k.decode_rows(m, b, steps, 9, np.float32),
                          L.decode_rows(m_ref, b_ref, steps, 9).astype(np.float32))


def test_cuda_unavailable_without_a_gpu_unless_simulated():
    import numba_kernels.lattice_v2_cuda as cu

    ok, why = cu.is_available()
    if not ok:
        with pytest.raises(BackendUnavailableError):
            resolve("numba-cuda")
