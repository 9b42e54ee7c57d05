"""Algorithm 1 per tensor: search over U and K, raw fallbacks, dtypes, no input mutation."""

import numpy as np
import pytest
import torch

from compressor import HyperCompressionConfig, NonFiniteTensorError, TensorOverride, compress_tensor
from compressor import quant_primitives as qp


def _mae(entry, t):
    return (entry.decode().double() - t.double()).abs().mean().item()


def test_decoded_mae_is_reported_mae_and_input_untouched():
    torch.manual_seed(0)
    w = torch.randn(48, 37) * 0.03
    before = w.clone()
    e = compress_tensor("layer.weight", w, backend="reference")
    assert torch.equal(w, before)
    assert not e.raw and e.layout == "rows" and e.pad
    assert e.theta.shape == (48 * 19,) and e.theta.dtype == np.uint16
    assert e.mae == pytest.approx(_mae(e, w), abs=1e-12)
    assert e.bits == int(e.theta.max()).bit_length()


def test_search_picks_best_and_stops_at_target():
    torch.manual_seed(1)
    w = torch.randn(64, 64) * 0.02  # some outer points; K=1 at the first U meets a loose target
    e = compress_tensor("w", w, HyperCompressionConfig(target_mae=0.01, fallback_mae=0.01), backend="reference")
    assert (e.U, e.K) == (1225, 1)
    # with an unreachable target every (U, K) is tried and the best MAE wins
    cfg = HyperCompressionConfig(target_mae=0.0, points=(1225, 1600), max_classes=3)
    best = compress_tensor("w", w, cfg, backend="reference")
    maes = {}
    for U in (1225, 1600):
        for K in (1, 2, 3):
            maes[(U, K)] = compress_tensor("w", w, cfg.replace(points=(U,), max_classes=K, target_mae=1.0, fallback_mae=1.0),
                                           backend="reference").mae if K == 1 else None
    assert best.mae <= maes[(1225, 1)] and best.mae <= maes[(1600, 1)]


def test_all_inner_uses_no_classes():
    w = torch.rand(20, 20) * 0.01  # every point within the 0.1 box
    e = compress_tensor("w", w, backend="reference")
    assert e.K == 0 and int(e.theta.max()) < e.U


def test_fallback_keeps_raw():
    torch.manual_seed(2)
    w = torch.randn(32, 32) * 5.0  # huge spread: MAE far above 0.006
    e = compress_tensor("w", w, backend="reference")
    assert e.raw and e.reason == "fallback" and torch.equal(e.tensor, w)


def test_small_integer_buffer_and_override_stay_raw():
    assert compress_tensor("b", torch.randn(9), backend="reference").reason == "small"
    assert compress_tensor("ids", torch.arange(100), backend="reference").reason == "non-float"
    assert compress_tensor("pos", torch.randn(100), backend="reference", is_buffer=True).reason == "buffer"
    cfg = HyperCompressionConfig(overrides=(TensorOverride("*.norm.*", raw=True),))
    assert compress_tensor("a.norm.weight", torch.randn(100), cfg, backend="reference").reason == "override"
    assert not compress_tensor("a.fc.weight", torch.randn(100) * 0.01, cfg, backend="reference").raw


def test_override_settings_apply():
    cfg = HyperCompressionConfig(overrides=(TensorOverride("big.*", points=(2500,), max_classes=1),))
    s = cfg.settings_for("big.weight")
    assert s.points == (2500,) and s.max_classes == 1 and s.box_size == 0.1
    e = compress_tensor("big.weight", torch.randn(40, 40) * 0.05, cfg.replace(target_mae=0.0), backend="reference")
    assert e.U == 2500 and e.K in (0, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_roundtrip(dtype):
    torch.manual_seed(3)
    w = (torch.randn(16, 30) * 0.02).to(dtype)
    e = compress_tensor("w", w, backend="reference")
    d = e.decode()
    assert d.dtype == dtype and d.shape == w.shape
    assert e.mae == pytest.approx(_mae(e, w), abs=1e-12)


def test_conv_flat_layout_odd_count():
    torch.manual_seed(4)
    w = torch.randn(3, 5, 3, 3) * 0.02  # 135 elements: odd, flat
    e = compress_tensor("conv.weight", w, backend="reference")
    assert e.layout == "flat" and e.pad and e.n_points == 68
    assert e.decode().shape == w.shape
    assert e.mae == pytest.approx(_mae(e, w), abs=1e-12)


def test_nonfinite_is_error_naming_tensor_or_raw_when_asked():
    w = torch.randn(10, 10)
    w[3, 3] = float("nan")
    with pytest.raises(NonFiniteTensorError, match="enc.weight") as info:
        compress_tensor("enc.weight", w, backend="reference", file="model.safetensors")
    assert info.value.file == "model.safetensors" and info.value.tensor == "enc.weight"
    e = compress_tensor("enc.weight", w, HyperCompressionConfig(nonfinite="raw"), backend="reference")
    assert e.raw and e.reason == "nonfinite"


def test_error_sum_matches_reference_definition():
    torch.manual_seed(5)
    w = torch.randn(30, 31) * 0.02
    e = compress_tensor("w", w, backend="reference")
    pts = qp.tensor_points(w.double().numpy(), "rows")
    lx, ly = e.lut()
    dx, dy = qp.decode_points(e.theta, lx, ly)
    # the search's float64 error (padded y excluded) agrees with the dtype-exact one for fp32 sources
    assert qp.abs_error_sum(pts.px, pts.py, dx, dy, pts.pad_cols) / w.numel() == pytest.approx(e.mae, rel=1e-6)


# -- issue 9: relative limits. Near-zero and constant tensors are kept exactly, -----------------
# -- never replaced by lattice noise that the absolute MAE limits would let through ------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_zero_and_constant_tensors_stay_exact(dtype):
    for t in (torch.zeros(384, dtype=dtype), torch.full((64, 33), 0.5, dtype=dtype), torch.ones(100, dtype=dtype)):
        e = compress_tensor("b", t, backend="reference")
        assert e.raw and e.reason == "constant"
        assert torch.equal(e.decode(), t)
    # the paper's rule alone (relative limit off) compresses a zero bias into noise
    noisy = compress_tensor("b", torch.zeros(384), HyperCompressionConfig(relative_fallback=None),
                            backend="reference")
    assert not noisy.raw and noisy.decode().abs().max() > 1e-4


def test_near_zero_and_subnormal_tensors_stay_exact():
    g = torch.Generator().manual_seed(4)
    tiny = torch.randn(64, 64, generator=g, dtype=torch.float64) * 1e-310  # subnormals
    e = compress_tensor("t", tiny, backend="reference")
    assert e.raw and e.reason == "relative" and torch.equal(e.decode(), tiny)
    small = torch.randn(384, generator=g) * 4e-4  # a key bias: lattice spacing >> values
    e = compress_tensor("k.bias", small, backend="reference")
    assert e.raw and e.reason == "relative" and torch.equal(e.decode(), small)
    # the search itself is the paper's: with the rule off the same tensor is compressed, its
    # error is several times its size
    off = compress_tensor("k.bias", small, HyperCompressionConfig(relative_fallback=None), backend="reference")
    assert not off.raw and off.mae > small.abs().mean().item()


def test_normal_tensors_are_untouched_by_the_relative_rule():
    """For ordinary weights the decision and the stored indices are exactly the paper
    codec's: the relative rule only ever sends a tensor raw."""
    g = torch.Generator().manual_seed(5)
    for w in (torch.randn(64, 65, generator=g) * 0.02, torch.randn(384, generator=g) * 0.05 + 1.0):
        on = compress_tensor("w", w, backend="reference")
        off = compress_tensor("w", w, HyperCompressionConfig(relative_fallback=None), backend="reference")
        assert not on.raw and not off.raw
        assert (on.U, on.K, on.bits, on.mae) == (off.U, off.K, off.bits, off.mae)
        np.testing.assert_array_equal(on.theta, off.theta)
    # the limit is a setting: a strict one sends the same tensor raw
    strict = compress_tensor("w", w, HyperCompressionConfig(relative_fallback=1e-6), backend="reference")
    assert strict.raw and strict.reason == "relative"


def test_huge_values_raise_naming_the_tensor_or_stay_raw():
    from compressor.errors import OutOfRangeTensorError

    w = torch.rand(40, dtype=torch.float64) * 1e300
    with pytest.raises(OutOfRangeTensorError) as info:
        compress_tensor("x.weight", w, backend="reference", file="m.safetensors")
    assert "x.weight" in str(info.value) and "m.safetensors" in str(info.value)
    e = compress_tensor("x.weight", w, HyperCompressionConfig(nonfinite="raw"), backend="reference")
    assert e.raw and torch.equal(e.decode(), w)
