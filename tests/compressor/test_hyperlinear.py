"""HyperLinear against its reference: x @ dequantize().T + b (and the codec's decode)."""

from __future__ import annotations

import io
import os
import logging

import numpy as np
import pytest
import torch
from torch import nn

from compressor.codec import CompressedTensor, compress_tensor
from compressor.config import HyperCompressionConfig
from compressor.errors import BackendUnavailableError, IndexRangeError
from compressor.hyperlinear import HyperLinear, HyperLinearError, hyperlinear_bytes, numba_cuda_status

# Tolerances (documented in docs/BENCHMARKS.md (HyperLinear section)): fp32 rtol 1e-4 (+ atol 1e-5 for
# near-zero outputs); fp16 / bf16 outputs are compared with the fp32 product of the same
# half-precision operands, within a few units in the last place of the output dtype.
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}
CPU_BACKENDS = ["reference", "numba-cpu", "auto"]


def _weight(out_f, in_f, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * scale
    w[0, 0] = 0.4  # an outlier, so outer classes (K >= 1) are used
    return w


def _layer(out_f, in_f, bias=True, seed=0, backend="auto", config=None):
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(_weight(out_f, in_f, seed))
        if bias:
            lin.bias.copy_(torch.linspace(-0.5, 0.5, out_f))
    return lin, HyperLinear.from_linear(lin, config, name="layer.weight", codec_backend="reference", backend=backend)


def _expected(hl, x):
    w = hl.dequantize(x.dtype).to(torch.float32)
    y = x.to(torch.float32) @ w.T
    if hl.bias is not None:
        y = y + hl.bias.to(x.dtype).to(torch.float32)
    return y


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f,bias", [(33, True), (33, False), (64, True)])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 2, 3)])
def test_forward_matches_dequantized_reference(backend, dtype, in_f, bias, lead):
    _, hl = _layer(19, in_f, bias=bias, backend=backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    y = hl(x)
    assert y.shape == (*lead, 19) and y.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.to(torch.float32), _expected(hl, x), rtol=rtol, atol=atol)


def test_large_token_count_numba_cpu():
    _, hl = _layer(48, 70, backend="numba-cpu")
    x = torch.randn(300, 70)
    torch.testing.assert_close(hl(x), _expected(hl, x), rtol=1e-4, atol=1e-5)


def test_dequantize_equals_codec_decode_and_lut():
    w = _weight(12, 9)
    entry = compress_tensor("m.weight", w, backend="reference")
    assert isinstance(entry, CompressedTensor) and entry.K >= 1
    hl = HyperLinear.from_compressed(entry, torch.zeros(12))
    assert torch.equal(hl.dequantize(), entry.decode())
    lx, ly = entry.lut()
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        tx, ty = hl.lut(dt)
        assert torch.equal(tx, torch.from_numpy(lx).to(dt)) and torch.equal(ty, torch.from_numpy(ly).to(dt))
    # the layer holds a copy, not a view of the entry's indices
    assert not np.shares_memory(hl.theta.numpy(), entry.theta)


def test_state_dict_round_trip(tmp_path):
    lin, hl = _layer(10, 15)
    x = torch.randn(4, 15)
    y = hl(x)
    sd = hl.state_dict()
    assert set(sd) == {"theta", "codec", "bias"} and sd["theta"].dtype == torch.uint16
    # a differently configured empty layer takes every constant from the state dict
    fresh = HyperLinear(15, 10, True, U=4, K=0, cx=0.0, cy=0.0, radius=1.0, box_size=1.0)
    fresh.load_state_dict(sd)
    assert (fresh.U, fresh.K, fresh.cx, fresh.radius) == (hl.U, hl.K, hl.cx, hl.radius)
    assert torch.equal(fresh(x), y)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    again = HyperLinear(15, 10, True, U=4, K=0, cx=0.0, cy=0.0, radius=1.0, box_size=1.0)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(again.dequantize(), hl.dequantize())
    from safetensors.torch import load_file, save_file

    save_file(sd, str(tmp_path / "hl.safetensors"))
    st = HyperLinear(15, 10, True, U=4, K=0, cx=0.0, cy=0.0, radius=1.0, box_size=1.0)
    st.load_state_dict(load_file(str(tmp_path / "hl.safetensors")))
    assert torch.equal(st(x), y)


def test_corrupt_indices_rejected_on_load():
    _, hl = _layer(6, 8)
    sd = {k: v.clone() for k, v in hl.state_dict().items()}
    sd["theta"][2, 1] = hl.n_codes  # one past the table
    fresh = HyperLinear(8, 6, True, U=hl.U, K=hl.K, cx=0.0, cy=0.0, radius=1.0, box_size=0.1)
    with pytest.raises(IndexRangeError):
        fresh.load_state_dict(sd)
    codec = sd["codec"].clone()
    codec[0] = 99
    with pytest.raises(HyperLinearError, match="version"):
        fresh.load_state_dict({**hl.state_dict(), "codec": codec})


def test_half_keeps_constants_exact():
    _, hl = _layer(8, 12)
    w = hl.dequantize()
    hl.half()
    assert hl.codec.dtype == torch.int64 and hl.bias.dtype == torch.float16
    assert torch.equal(hl.dequantize(torch.float32), w)
    x = torch.randn(3, 12, dtype=torch.float16)
    torch.testing.assert_close(hl(x).float(), _expected(hl, x), rtol=4e-3, atol=4e-3)


def test_memory_is_eight_bits_per_weight():
    _, hl = _layer(32, 64)
    nbytes = hyperlinear_bytes(hl)
    assert nbytes["theta"] * 8 == 8 * 32 * 64  # uint16 per pair of weights
    assert not any(p.dtype.is_floating_point and p.numel() >= 32 * 64 for p in hl.parameters())
    assert not any(b.dtype.is_floating_point for b in hl.buffers())
    assert "bits_per_weight=8.00" in repr(hl) and "U=" in repr(hl) and "K=" in repr(hl)


def test_int32_indices_when_codes_exceed_uint16():
    cfg = HyperCompressionConfig(points=(40000,), target_mae=0.0)
    _, hl = _layer(6, 10, config=cfg)
    assert hl.n_codes > 65536 and hl.theta.dtype == torch.int32
    x = torch.randn(2, 10)
    for b in ("reference", "numba-cpu"):
        hl.set_backend(b)
        torch.testing.assert_close(hl(x), _expected(hl, x), rtol=1e-4, atol=1e-5)


def test_from_linear_refuses_weights_the_codec_keeps_raw():
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 8) * 10)  # far above the fallback MAE
    with pytest.raises(HyperLinearError, match="raw"):
        HyperLinear.from_linear(lin, name="big.weight", codec_backend="reference")


def test_explicit_backend_that_cannot_run_raises():
    _, hl = _layer(4, 6)
    with pytest.raises(BackendUnavailableError):
        hl.set_backend("no-such-backend")
    if not numba_cuda_status()[0]:
        with pytest.raises(BackendUnavailableError):
            hl.set_backend("numba-cuda")
    hl.set_backend("numba-cpu")
    if torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError):
            hl.cuda()(torch.randn(2, 6, device="cuda"))


def test_bad_input_raises():
    _, hl = _layer(4, 6)
    with pytest.raises(HyperLinearError, match="features"):
        hl(torch.randn(2, 5))
    with pytest.raises(HyperLinearError, match="dtype"):
        hl(torch.ones(2, 6, dtype=torch.int32))


def test_auto_logs_its_choice_once(caplog):
    import compressor.hyperlinear as hlmod

    hlmod._logged.clear()
    _, hl = _layer(4, 6)
    with caplog.at_level(logging.INFO, logger="compressor.hyperlinear"):
        for _ in range(3):
            hl(torch.randn(2, 6))
    msgs = [r.getMessage() for r in caplog.records if "auto backend" in r.getMessage()]
    assert len(msgs) == 1 and "cpu-fused" in msgs[0]


def test_no_grad_inference_mode_and_autograd_wrt_input():
    _, hl = _layer(8, 10)
    x = torch.randn(3, 10)
    ref = _expected(hl, x)
    with torch.no_grad():
        torch.testing.assert_close(hl(x), ref, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        y1 = hl(x)
    torch.testing.assert_close(y1, ref, rtol=1e-4, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    hl(xg).sum().backward()
    torch.testing.assert_close(xg.grad, hl.dequantize().sum(0).expand(3, 10), rtol=1e-4, atol=1e-5)
    # a later call reusing the workspace must not corrupt the saved-for-backward weight
    xg2 = x.clone().requires_grad_(True)
    out = hl(xg2)
    hl(torch.randn(3, 10))
    out.sum().backward()
    torch.testing.assert_close(xg2.grad, xg.grad)


def test_torch_compile_runs():
    _, hl = _layer(8, 10)
    model = nn.Sequential(nn.Linear(10, 10), hl, nn.GELU())
    x = torch.randn(4, 10)
    with torch.no_grad():
        ref = model(x)
        got = torch.compile(model)(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def _no_decode(*args, **kwargs):
    raise AssertionError("the decode path ran; the fused path was expected")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f", [33, 64, 701])  # 701: 96x701 weights, split over the thread pool
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(1,), (16,), (1, 1), (2, 8)])
def test_cpu_fused_matches_dequantized_reference(monkeypatch, dtype, in_f, bias, lead):
    import compressor.hyperlinear as hlmod

    monkeypatch.setattr(hlmod.module, "_cpu_decode", _no_decode)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # exercise the row split even on one core
    out_f = 96 if in_f == 701 else 19
    _, hl = _layer(out_f, in_f, bias=bias)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    assert hl._choose(x, x.numel() // in_f) == "cpu-fused"
    with torch.inference_mode():
        y = hl(x)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.to(torch.float32), _expected(hl, x), rtol=rtol, atol=atol)
    hl.set_backend("numba-cpu")  # the explicit CPU backend takes the same path at few tokens
    torch.testing.assert_close(hl(x), y, rtol=0, atol=0)


def test_auto_cpu_path_by_token_count():
    import compressor.hyperlinear as hlmod

    _, hl = _layer(8, 10)
    assert hl._choose(torch.randn(1, 10), 1) == "cpu-fused"
    assert hl._choose(torch.randn(16, 10), 16) == "cpu-fused"
    limit = hlmod.CPU_FUSED_MAX_TOKENS
    assert hl._choose(torch.randn(limit, 10), limit) == "cpu-fused"
    assert hl._choose(torch.randn(limit + 1, 10), limit + 1) == "cpu-decode"
    # fp64 inputs keep fp64 accumulation: decode + matmul
    assert hl._choose(torch.randn(1, 10, dtype=torch.float64), 1) == "cpu-decode"
    hl.set_backend("reference")
    assert hl._choose(torch.randn(1, 10), 1) == "reference"


def test_cpu_fused_falls_back_to_decode_for_autograd():
    _, hl = _layer(8, 10)
    x = torch.randn(1, 10, requires_grad=True)
    y = hl(x)
    assert y.grad_fn is not None
    y.sum().backward()
    torch.testing.assert_close(x.grad, hl.dequantize().sum(0, keepdim=True), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f,bias", [(33, True), (64, False)])
def test_cpu_decode_path_at_few_tokens(monkeypatch, dtype, in_f, bias):
    """The decode + matmul path stays exact below the fused threshold too."""
    import compressor.hyperlinear as hlmod

    monkeypatch.setattr(hlmod.tables, "CPU_FUSED_MAX_TOKENS", 0)
    _, hl = _layer(19, in_f, bias=bias, backend="numba-cpu")
    x = torch.randn(2, 3, in_f).to(dtype)
    assert hl._choose(x, 6) == "cpu-decode"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(hl(x).to(torch.float32), _expected(hl, x), rtol=rtol, atol=atol)


def _cuda_sim():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        pytest.skip("the numba-cuda orchestration runs on host tensors only under NUMBA_ENABLE_CUDASIM=1 "
                    "(scripts/test.sh sets it where there is no GPU)")
    from compressor import hyperlinear as hlmod

    return hlmod


@pytest.mark.parametrize("path", ["cuda-fused", "cuda-decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f,bias", [(9, True), (10, False), (10, True)])
def test_cuda_orchestration_under_simulator(path, dtype, in_f, bias):
    """The numba-cuda forward (cached kernel arguments, packed pair decode for even
    ``in``, bias inside the fused kernel) on host tensors through the simulator."""
    hlmod = _cuda_sim()
    _, hl = _layer(6, in_f, bias=bias)
    x = torch.randn(2, 2, in_f, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = hlmod._cuda_forward(hl, x, path, 4, needs_grad=False)
    assert y.shape == (2, 2, 6) and y.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.to(torch.float32), _expected(hl, x), rtol=rtol, atol=atol)
    args = hl._cuda_args(x.device, dtype)
    assert (args.lut_xy is not None) == (in_f % 2 == 0)
    if path == "cuda-decode":  # the decoded workspace is exact: compare with the bias-free product too
        w = hl.dequantize(dtype)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w, None if hl.bias is None else hl.bias.to(dtype)))


def test_cuda_orchestration_fp64_and_cache_invalidation():
    hlmod = _cuda_sim()
    _, hl = _layer(5, 8, bias=True)
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = hlmod._cuda_forward(hl, x, "cuda-decode", 3, needs_grad=False)
    torch.testing.assert_close(y, x @ hl.dequantize(torch.float64).T + hl.bias.double())
    assert hl._cuda_args(x.device, torch.float64).lut_xy is None  # no 128-bit pairs: per-weight decode
    # an in-place change of the bias or the indices (load_state_dict copies in place) is seen
    first = hl._cuda_args(x.device, torch.float32)
    with torch.no_grad():
        hl.bias.add_(1.0)
    xf = x.float()
    y2 = hlmod._cuda_forward(hl, xf, "cuda-fused", 3, needs_grad=False)
    torch.testing.assert_close(y2, _expected(hl, xf), rtol=1e-4, atol=1e-5)
    assert hl._cuda_args(x.device, torch.float32) is not first
    sd = hl.state_dict()
    sd["theta"] = torch.from_numpy(np.ascontiguousarray(sd["theta"].numpy()[:, ::-1]))
    hl.load_state_dict(sd)
    y3 = hlmod._cuda_forward(hl, xf, "cuda-decode", 3, needs_grad=False)
    torch.testing.assert_close(y3, xf @ hl.dequantize(torch.float32).T + hl.bias, rtol=1e-5, atol=1e-6)


def test_bias_cache_follows_in_place_changes_and_autograd():
    _, hl = _layer(4, 6, bias=True, backend="reference")
    x = torch.randn(2, 6, dtype=torch.bfloat16)
    first = hl._bias_as(torch.bfloat16, x.device)
    assert hl._bias_as(torch.bfloat16, x.device) is first  # cached while unchanged
    with torch.no_grad():
        hl.bias.mul_(2.0)
    assert torch.equal(hl._bias_as(torch.bfloat16, x.device), hl.bias.to(torch.bfloat16))
    hl.bias.requires_grad_(True)
    hl(x.float()).sum().backward()
    assert hl.bias.grad is not None and torch.equal(hl.bias.grad, torch.full((4,), 2.0))


def _gpu():
    ok, why = numba_cuda_status()
    if not ok:
        pytest.skip(f"needs a CUDA GPU with numba-cuda ({why}); the same orchestration runs under the simulator "
                    "in test_cuda_orchestration_under_simulator")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f,bias", [(33, True), (64, False), (64, True)])
@pytest.mark.parametrize("lead", [(1,), (16,), (2, 300)])
def test_numba_cuda_backend_on_gpu(dtype, in_f, bias, lead):
    """On a real GPU: the fused path (<= 16 tokens) and the decode path, against
    the dequantized reference, with the layer's auto choice and the explicit
    backend; the second call of each goes through the prepared launch."""
    _gpu()
    _, hl = _layer(40, in_f, bias=bias)
    x = torch.randn(*lead, in_f, generator=torch.Generator().manual_seed(7)).to(dtype)
    ref = _expected(hl, x)
    hl, xc = hl.cuda(), x.cuda()
    rtol, atol = TOL[dtype]
    for backend in ("auto", "numba-cuda"):
        hl.set_backend(backend)
        with torch.inference_mode():
            first = hl(xc)
            second = hl(xc)
            third = hl(xc + 1)
        assert first.device.type == "cuda" and first.dtype == dtype and first.shape == (*lead, 40)
        torch.testing.assert_close(first.float().cpu(), ref, rtol=rtol, atol=atol)
        assert torch.equal(first, second)
        torch.testing.assert_close(third.float().cpu(), _expected(hl.cpu(), x + 1), rtol=rtol, atol=atol)
        hl = hl.cuda()
