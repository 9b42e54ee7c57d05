"""Numba-CUDA HyperLinear kernels against NumPy (CI: NUMBA_ENABLE_CUDASIM=1, host arrays)."""

from __future__ import annotations

import os

import numpy as np
import pytest

k = pytest.importorskip("numba_kernels.hyperlinear_cuda")

# On a GPU numba copies these host arrays in and out; without one, only the simulator runs them.
if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not k.cuda.is_available():
    pytest.skip("no GPU: CUDA kernel tests run under NUMBA_ENABLE_CUDASIM=1 (scripts/test.sh sets it)",
                allow_module_level=True)


def _case(rows, n_in, n_codes, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.integers(0, n_codes, size=(rows, (n_in + 1) // 2)).astype(np.uint16)
    theta[-1, -1] = n_codes - 1
    return theta, rng.standard_normal(n_codes).astype(np.float32), rng.standard_normal(n_codes).astype(np.float32)


def _numpy_decode(theta, lx, ly, n_in):
    w = np.empty((theta.shape[0], 2 * theta.shape[1]), dtype=lx.dtype)
    w[:, 0::2] = lx[theta]
    w[:, 1::2] = ly[theta]
    return np.ascontiguousarray(w[:, :n_in])


@pytest.mark.parametrize("rows,n_in", [(5, 7), (6, 8)])
def test_decode_rows_sim(rows, n_in):
    theta, lx, ly = _case(rows, n_in, 40)
    out = np.full((rows, n_in), np.nan, np.float32)
    k.decode_rows(theta, lx.view(np.int32), ly.view(np.int32), out.view(np.int32))
    assert np.array_equal(out.view(np.int32), _numpy_decode(theta, lx, ly, n_in).view(np.int32))
    half = np.zeros((rows, n_in), np.float16)  # 16-bit path (fp16 / bf16 bit patterns)
    k.decode_rows(theta, lx.astype(np.float16).view(np.int16), ly.astype(np.float16).view(np.int16), half.view(np.int16))
    assert np.array_equal(half, _numpy_decode(theta, lx.astype(np.float16), ly.astype(np.float16), n_in))


@pytest.mark.parametrize("rows,n_in,n_tok", [(5, 7, 3), (5, 8, 1), (9, 70, 16)])
def test_fused_linear_sim(rows, n_in, n_tok):
    theta, lx, ly = _case(rows, n_in, 40, seed=n_tok)
    x = np.random.default_rng(1).standard_normal((n_tok, n_in)).astype(np.float32)
    out = np.full((n_tok, rows), np.nan, np.float32)
    k.fused_linear(x, theta, lx, ly, out)
    ref = x.astype(np.float64) @ _numpy_decode(theta, lx, ly, n_in).astype(np.float64).T
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_fused_linear_rejects_too_many_tokens():
    theta, lx, ly = _case(2, 4, 40)
    with pytest.raises(ValueError, match="at most"):
        k.fused_linear(np.zeros((k.MAX_TOKENS + 1, 4), np.float32), theta, lx, ly,
                       np.zeros((k.MAX_TOKENS + 1, 2), np.float32))


def test_fused_linear_adds_bias_sim():
    theta, lx, ly = _case(9, 12, 40, seed=3)
    x = np.random.default_rng(2).standard_normal((4, 12)).astype(np.float32)
    bias = np.random.default_rng(3).standard_normal(9).astype(np.float32)
    out = np.full((4, 9), np.nan, np.float32)
    k.fused_linear(x, theta, lx, ly, out, 0, bias)
    ref = x.astype(np.float64) @ _numpy_decode(theta, lx, ly, 12).astype(np.float64).T + bias
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="bias has 8 entries"):
        k.fused_linear(x, theta, lx, ly, out, 0, bias[:8])


@pytest.mark.parametrize("fdtype,idtype", [(np.float32, np.int32), (np.float16, np.int16)])
def test_pack_pairs_puts_x_first_in_memory(fdtype, idtype):
    lx = np.array([1.5, -2.0, np.inf], fdtype)
    ly = np.array([-0.25, 3.0, -np.nan], fdtype)
    packed = k.pack_pairs(lx.view(idtype), ly.view(idtype))
    assert packed.itemsize == 2 * lx.itemsize
    # stored little-endian, each word reads back as (x, y) in the table's dtype
    pairs = packed.view(fdtype).reshape(-1, 2)
    assert np.array_equal(pairs[:, 0].view(idtype), lx.view(idtype))
    assert np.array_equal(pairs[:, 1].view(idtype), ly.view(idtype))
    with pytest.raises(ValueError, match="two equal"):
        k.pack_pairs(lx.view(idtype), ly.astype(np.float64).view(np.int64))


@pytest.mark.parametrize("fdtype,idtype", [(np.float32, np.int32), (np.float16, np.int16)])
def test_decode_pairs_sim(fdtype, idtype):
    rows, n_in = 7, 10
    theta, lx, ly = _case(rows, n_in, 40, seed=5)
    lx, ly = lx.astype(fdtype), ly.astype(fdtype)
    w = np.full((rows, n_in), np.nan, fdtype)
    wide = np.int64 if fdtype == np.float32 else np.int32
    k.decode_pairs(theta, k.pack_pairs(lx.view(idtype), ly.view(idtype)), w.view(wide))
    assert np.array_equal(w.view(idtype), _numpy_decode(theta, lx, ly, n_in).view(idtype))
    with pytest.raises(ValueError, match="out has shape"):
        k.decode_pairs(theta, k.pack_pairs(lx.view(idtype), ly.view(idtype)), np.zeros((rows, 4), wide))


def test_stream_for_maps_the_default_stream_to_numbas():
    # torch's default stream (handle 0) is the legacy default stream, numba's 0;
    # other handles need a GPU (the simulator has no external streams)
    assert k.stream_for(0) == 0 and k.stream_for(0, device_index=3) == 0


class _Dev:
    """Stands for a device array: only its interface's data pointer is read."""

    def __init__(self, ptr):
        self.__cuda_array_interface__ = {"data": (ptr, False)}


def test_pointer_slots_are_checked_against_real_pointers():
    import ctypes

    # numba's flattening of (array, int, array): meminfo, parent, nitems, itemsize, data, shape, strides
    flat = [0, 0, 6, 4, 0x1000, 2, 3, 12, 4, ctypes.c_int64(1), 0, 0, 3, 4, ctypes.c_void_p(0x2000), 3, 4]
    starts = [0, 9, 10]
    args = (_Dev(0x1000), 1, _Dev(0x2000))
    assert k.pointer_slots((flat, starts), args, (0, 2)) == (4, 14)
    with pytest.raises(k.FastLaunchUnavailable, match="argument 2"):
        k.pointer_slots((flat, starts), (args[0], 1, _Dev(0x3000)), (0, 2))
    new = k.substitute(flat, (4, 14), (0x5000, 0x6000))
    assert new[4] == 0x5000 and isinstance(new[14], ctypes.c_void_p) and new[14].value == 0x6000
    assert flat[4] == 0x1000 and flat[14].value == 0x2000  # the template is never modified
    assert new[:4] == flat[:4] and new[9] is flat[9]


def test_prepared_launch_refuses_under_the_simulator():
    if not k.is_simulator():
        pytest.skip("on a GPU the prepared launch runs: test_numba_cuda_backend_on_gpu covers it")
    theta, lx, ly = _case(4, 6, 40)
    with pytest.raises(k.FastLaunchUnavailable, match="simulator"):
        k.fused_linear_call(np.zeros((1, 6), np.float32), theta, lx, ly, np.zeros((1, 4), np.float32)).prepare()
