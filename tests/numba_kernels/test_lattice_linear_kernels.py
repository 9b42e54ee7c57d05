"""The codec-v2 linear layer's CPU kernels (numba_kernels/lattice_linear_cpu.py) and the
on-device form (compressor/codec_v2/device.py), against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.codec_v2 import CodecV2Config, encode_tensor
from compressor.codec_v2.device import FUSED_MAX_TOKENS, DeviceForm, linear, prepare_x, split_rows

k = pytest.importorskip("numba_kernels.lattice_linear_cpu")


def _form(out_f=70, in_f=301, seed=0, outliers=True):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out_f, in_f)) * 0.02).astype(np.float32)
    if outliers:  # coordinates beyond int8: escapes
        w[3, 4] = 9.0
        w[3, 5] = -7.0
        w[50 % out_f, in_f - 1] = 5.0  # the odd last column
        w[10, 0] = 3.0
    v = encode_tensor(w, CodecV2Config(), name="layer.weight", kernels="numba-cpu")
    return v, v.decode_to_device_form()


def _fused(form, x, bias, bounds):
    x2 = np.ascontiguousarray(x, dtype=np.float32)
    xe, xo = prepare_x(x2, form.xt.shape[0])
    out = np.full((x2.shape[0], form.out_features), np.nan, dtype=np.float32)
    b = np.zeros(0, np.float32) if bias is None else bias
    for r0, r1 in bounds:
        k.fused_rows(xe, xo, form.xt, form.bt, form.step, form.esc_row, form.esc_col, form.esc_val, x2, b, out,
                     r0, r1)
    return out


def test_device_form_holds_8_bit_coordinates_and_decodes_like_the_checkpoint():
    v, f = _form()
    assert f.xt.dtype == np.int8 and f.bt.dtype == np.int8
    assert f.nbytes()["coords"] == f.out_features * 2 * f.xt.shape[0]  # one byte per weight (+ odd padding)
    assert f.esc_row.size >= 3  # the outliers
    assert np.all(np.diff(f.esc_row.astype(np.int64) * 10**6 + f.esc_col) > 0)  # sorted by (row, col)
    assert np.array_equal(f.dense(), v.decode())
    wt = np.full((f.in_features, f.out_features), np.nan, dtype=np.float32)
    for r0, r1 in ((0, 13), (13, 14), (14, f.out_features)):  # any split of the rows
        k.decode_rows_t(f.xt, f.bt, f.step, f.esc_row, f.esc_col, f.esc_val, wt, r0, r1)
    assert np.array_equal(wt.T, v.decode())


def test_bits_per_weight_on_device_are_8_plus_the_row_steps():
    rng = np.random.default_rng(1)
    w = torch.from_numpy((rng.standard_normal((256, 768)) * 0.02).astype(np.float32))
    f = encode_tensor(w, CodecV2Config(), name="w").decode_to_device_form()
    assert f.bits_per_weight == pytest.approx(8 + 32 / 768 + 96 * f.esc_row.size / w.numel())
    assert f.bits_per_weight < 8.05


@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_rows_matches_the_float64_product(tokens, with_bias):
    v, f = _form()
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, f.in_features)).astype(np.float32)
    bias = rng.standard_normal(f.out_features).astype(np.float32) if with_bias else None
    out = _fused(f, x, bias, [(0, f.out_features)])
    ref = x.astype(np.float64) @ v.decode().astype(np.float64).T + (0 if bias is None else bias)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 5])
def test_fused_rows_same_bits_for_any_row_split(tokens):
    _, f = _form(out_f=300, in_f=64, seed=3)
    x = np.random.default_rng(4).standard_normal((tokens, 64)).astype(np.float32)
    bias = np.linspace(-1, 1, 300).astype(np.float32)
    whole = _fused(f, x, bias, [(0, 300)])
    for bounds in (split_rows(300, 2), split_rows(300, 3), [(0, 1), (1, 299), (299, 300)], split_rows(300, 7)):
        assert np.array_equal(_fused(f, x, bias, bounds), whole)


def test_linear_paths_threads_and_shapes():
    v, f = _form(out_f=130, in_f=96, seed=5)
    w = torch.from_numpy(v.decode())
    bias = torch.randn(130)
    for tokens, path in ((1, "fused"), (FUSED_MAX_TOKENS, "fused"), (FUSED_MAX_TOKENS + 1, "decode")):
        x = torch.randn(2, tokens, 96) if tokens > 1 else torch.randn(96)
        ref = torch.nn.functional.linear(x.double(), w.double(), bias.double())
        outs = {}
        for threads in (1, 2, 3):
            y = linear(x, f, bias, threads=threads)
            assert y.shape == ref.shape and y.dtype == torch.float32
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
            outs[threads] = y
        if path == "fused":  # the fused product is the same bits whatever the threads
            assert all(torch.equal(outs[1], o) for o in outs.values())
        y2 = linear(x, f, bias, path="decode" if path == "fused" else "fused", threads=2)
        torch.testing.assert_close(y2.double(), ref, rtol=1e-5, atol=1e-5)


def test_linear_rejects_bad_inputs():
    _, f = _form(out_f=8, in_f=10, outliers=False)
    with pytest.raises(ValueError):
        linear(torch.randn(3, 11), f)
    with pytest.raises(ValueError):
        linear(torch.randn(3, 10, dtype=torch.float64), f)
    with pytest.raises(ValueError):
        linear(torch.randn(3, 10), f, path="nope")


def test_device_form_from_coords_refuses_inexact_steps():
    with pytest.raises(ValueError):
        DeviceForm.from_coords("t", np.zeros((2, 3), np.int64), np.zeros((2, 3), np.int64), 0.1,
                               np.ones(2, np.float16), 6)
