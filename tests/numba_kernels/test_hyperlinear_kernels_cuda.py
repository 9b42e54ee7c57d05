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
