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
