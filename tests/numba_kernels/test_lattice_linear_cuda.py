"""The codec-v2 linear layer's CUDA kernels (numba_kernels/lattice_linear_cuda.py) on
Numba's CUDA simulator, against the on-device form's NumPy reference: the decode bit
for bit (the checkpoint's weights), the fused product within float32 rounding."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from compressor.codec_v2 import CodecV2Config, encode_tensor
from compressor.codec_v2.device import prepare_x

cu = pytest.importorskip("numba_kernels.lattice_linear_cuda")
if not (numba.config.ENABLE_CUDASIM or cu.cuda.is_available()):
    pytest.skip("needs a CUDA GPU, or NUMBA_ENABLE_CUDASIM=1 (scripts/test.sh sets it without one)",
                allow_module_level=True)


def _form(out_f=24, in_f=121, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out_f, in_f)) * 0.02).astype(np.float32)
    w[3, 4], w[3, 5], w[7, in_f - 1], w[10, 0] = 9.0, -7.0, 5.0, 3.0  # escapes, the odd last column among them
    v = encode_tensor(w, CodecV2Config(), name="layer.weight", kernels="numba-cpu")
    f = v.decode_to_device_form()
    assert f.esc_row.size >= 3
    return v, f


def _esc_ptr(f):
    ptr = np.zeros(f.out_features + 1, dtype=np.int32)
    ptr[1:] = np.cumsum(np.bincount(f.esc_row, minlength=f.out_features))
    return ptr


def test_constants_match_the_reference():
    from compressor.codec_v2 import lattice as L

    assert cu.H == L.H


def test_decode_t_writes_the_checkpoints_weights_bit_for_bit():
    v, f = _form()
    wt = np.full((f.in_features, f.out_features), np.nan, dtype=np.float32)
    cu.decode_t(f.xt, f.bt, f.step, f.esc_row, f.esc_col, f.esc_val, wt)
    assert np.array_equal(wt.T, v.decode())


@pytest.mark.parametrize("tokens,with_bias", [(1, True), (3, False), (16, True)])
def test_fused_matches_the_float64_product(tokens, with_bias):
    v, f = _form(seed=tokens)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((tokens, f.in_features)).astype(np.float32)
    bias = rng.standard_normal(f.out_features).astype(np.float32) if with_bias else None
    xe, xo = prepare_x(x, f.xt.shape[0])
    out = np.full((tokens, f.out_features), np.nan, dtype=np.float32)
    cu.fused(xe, xo, f.xt, f.bt, f.step, _esc_ptr(f), f.esc_col, f.esc_val, x, bias, out)
    ref = x.astype(np.float64) @ v.decode().astype(np.float64).T + (0 if bias is None else bias)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_fused_refuses_too_many_tokens():
    _, f = _form()
    x = np.zeros((cu.MAX_TOKENS + 1, f.in_features), np.float32)
    xe, xo = prepare_x(x, f.xt.shape[0])
    with pytest.raises(ValueError, match="at most"):
        cu.fused(xe, xo, f.xt, f.bt, f.step, _esc_ptr(f), f.esc_col, f.esc_val, x, None,
                 np.zeros((x.shape[0], f.out_features), np.float32))
