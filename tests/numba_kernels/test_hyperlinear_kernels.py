"""Numba CPU HyperLinear kernels against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from numba_kernels import hyperlinear_cpu as k


def _case(rows, n_in, n_codes, tdtype, seed=0):
    rng = np.random.default_rng(seed)
    pairs = (n_in + 1) // 2
    theta = rng.integers(0, n_codes, size=(rows, pairs)).astype(tdtype)
    theta[0, 0] = n_codes - 1
    lx = rng.standard_normal(n_codes)
    ly = rng.standard_normal(n_codes)
    return theta, lx, ly


def _numpy_decode(theta, lx, ly, n_in):
    w = np.empty((theta.shape[0], 2 * theta.shape[1]), dtype=lx.dtype)
    w[:, 0::2] = lx[theta.astype(np.int64)]
    w[:, 1::2] = ly[theta.astype(np.int64)]
    return w[:, :n_in]


@pytest.mark.parametrize("n_in", [1, 7, 8, 33])
@pytest.mark.parametrize("tdtype", [np.uint16, np.int32])
@pytest.mark.parametrize("fdtype,idtype", [(np.float32, np.int32), (np.float16, np.int16), (np.float64, np.int64)])
def test_decode_rows_copies_bit_patterns(n_in, tdtype, fdtype, idtype):
    n_codes = 70000 if tdtype == np.int32 else 6400
    theta, lx, ly = _case(5, n_in, n_codes, tdtype)
    lx, ly = lx.astype(fdtype), ly.astype(fdtype)
    out = np.full((5, n_in), np.nan, dtype=fdtype)
    k.decode_rows(theta, lx.view(idtype), ly.view(idtype), out.view(idtype))
    expected = _numpy_decode(theta, lx, ly, n_in)
    assert np.array_equal(out.view(idtype), expected.view(idtype) if expected.flags.c_contiguous
                          else np.ascontiguousarray(expected).view(idtype))


@pytest.mark.parametrize("n_tok", [1, 5, 16])
@pytest.mark.parametrize("n_in", [1, 7, 8, 65])
@pytest.mark.parametrize("tdtype", [np.uint16, np.int32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_rows_matches_numpy(n_tok, n_in, tdtype, with_bias):
    rows = 11  # two full blocks of ROW_BLOCK rows and a partial one
    n_codes = 70000 if tdtype == np.int32 else 6400
    theta, lx, ly = _case(rows, n_in, n_codes, tdtype, seed=n_in)
    lx, ly = lx.astype(np.float32), ly.astype(np.float32)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32) if with_bias else np.zeros(0, np.float32)
    ref = x.astype(np.float64) @ _numpy_decode(theta, lx, ly, n_in).astype(np.float64).T
    if with_bias:
        ref += bias
    table = k.pair_table(lx, ly)
    out = np.full((n_tok, rows), np.nan, np.float32)
    k.fused_rows(x, theta, table, bias, out, 0, rows)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    # row ranges (one per thread) write only their own columns
    part = np.full((n_tok, rows), np.nan, np.float32)
    k.fused_rows(x, theta, table, bias, part, 3, 9)
    np.testing.assert_allclose(part[:, 3:9], ref[:, 3:9], rtol=1e-4, atol=1e-5)
    assert np.isnan(part[:, :3]).all() and np.isnan(part[:, 9:]).all()
    k.fused_rows(x, theta, table, bias, part, 0, 3)
    k.fused_rows(x, theta, table, bias, part, 9, rows)
    assert np.array_equal(part, out)


def test_pair_table_interleaves_float32_bits():
    lx = np.array([1.5, -2.0, 3.25], np.float32)
    ly = np.array([0.5, 7.0, -1.0], np.float32)
    t = k.pair_table(lx, ly)
    assert t.dtype == np.int64 and t.shape == (3,)
    pairs = t.view(np.float32).reshape(3, 2)
    assert np.array_equal(pairs[:, 0], lx) and np.array_equal(pairs[:, 1], ly)
