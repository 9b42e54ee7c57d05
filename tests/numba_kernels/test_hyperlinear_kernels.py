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


U32 = 2.0 ** -24  # unit roundoff of float32


def _dot_error_bound(x, w, bias):
    """Rigorous bound on ``|fl32(x W^T + b) - (x W^T + b)|`` for ANY summation order,
    with or without FMA (Higham, Accuracy and Stability of Numerical Algorithms,
    eq. 3.5: a length-n dot product computed in precision u is within
    ``gamma_n * |x|^T |w|`` of the exact one, gamma_n = n u / (1 - n u)). The bias is
    one more term with weight 1. The float64 reference's own error (u = 2^-53)
    is far below this. Every x86-64 (SSE2, AVX2, AVX-512; FMA or not) and every
    vectorization LLVM may choose meets it, which a fixed rtol/atol does not promise."""
    n = x.shape[1] + (1 if bias.size else 0)
    gamma = n * U32 / (1 - n * U32)
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    if bias.size:
        mag += np.abs(bias.astype(np.float64))
    return gamma * mag


def _row_splits(rows, rng):
    """Row ranges as thread pools of 1..5 threads cut them, every single row, and random cuts."""
    splits = [[rows * i // n for i in range(n + 1)] for n in (1, 2, 3, 5)]
    splits.append(list(range(rows + 1)))
    for _ in range(3):
        cuts = sorted(set(rng.integers(1, rows, size=rng.integers(1, 5)).tolist()))
        splits.append([0, *cuts, rows])
    return splits


@pytest.mark.parametrize("n_tok", [1, 5, 16])
@pytest.mark.parametrize("n_in", [1, 7, 8, 16, 65, 100, 257])
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
    w = _numpy_decode(theta, lx, ly, n_in)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    if with_bias:
        ref += bias
    table = k.pair_table(lx, ly)
    out = np.full((n_tok, rows), np.nan, np.float32)
    k.fused_rows(x, theta, table, bias, out, 0, rows)
    # float32 sums in an order LLVM picks for the target's vector width: within the
    # rounding bound of the exact product, not bit-equal to NumPy's (see _dot_error_bound)
    err = np.abs(out.astype(np.float64) - ref)
    bound = _dot_error_bound(x, w, bias)
    assert (err <= bound).all(), f"max error {err.max():.3g} above its bound {bound[err > bound].min():.3g}"
    # row ranges (one per thread) write only their own columns
    part = np.full((n_tok, rows), np.nan, np.float32)
    k.fused_rows(x, theta, table, bias, part, 3, 9)
    assert np.isnan(part[:, :3]).all() and np.isnan(part[:, 9:]).all()


@pytest.mark.parametrize("n_in", [7, 16, 17, 31, 33, 64, 65, 100, 768])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_rows_same_bits_for_any_row_split(n_in, with_bias):
    """The thread pool cuts the rows by thread count; each row's sum must not depend
    on where it falls in a range. Exact on every machine: all rows of one build run
    the same code (issue 10: a separate short-block loop differed on AVX2 CPUs)."""
    rows = 23
    theta, lx, ly = _case(rows, n_in, 6400, np.uint16, seed=n_in)
    table = k.pair_table(lx.astype(np.float32), ly.astype(np.float32))
    rng = np.random.default_rng(n_in)
    bias = rng.standard_normal(rows).astype(np.float32) if with_bias else np.zeros(0, np.float32)
    for n_tok in (1, 3):
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        whole = np.full((n_tok, rows), np.nan, np.float32)
        k.fused_rows(x, theta, table, bias, whole, 0, rows)
        for bounds in _row_splits(rows, rng):
            part = np.full((n_tok, rows), np.nan, np.float32)
            for a, b in zip(bounds[:-1], bounds[1:]):
                k.fused_rows(x, theta, table, bias, part, a, b)
            assert np.array_equal(part.view(np.int32), whole.view(np.int32)), f"split {bounds}"


def test_pair_table_interleaves_float32_bits():
    lx = np.array([1.5, -2.0, 3.25], np.float32)
    ly = np.array([0.5, 7.0, -1.0], np.float32)
    t = k.pair_table(lx, ly)
    assert t.dtype == np.int64 and t.shape == (3,)
    pairs = t.view(np.float32).reshape(3, 2)
    assert np.array_equal(pairs[:, 0], lx) and np.array_equal(pairs[:, 1], ly)
