"""The HyperLinear module: a linear layer whose weight stays Hyper-Compression
indices, and its dispatch between the CPU and CUDA paths."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import quant_primitives as qp
from ..backends import Backend
from ..codec import CompressedTensor, RawTensor, compress_tensor
from ..config import HyperCompressionConfig
from ..dtypes import TORCH_BY_NAME, dtype_name
from ..errors import BackendUnavailableError, IndexRangeError
from .cpu import _NO_BIAS, _cpu_decode, _cpu_fused, _cpu_path, _cpu_workspace
from .cuda import _bits_f64, _cuda_forward, _CudaArgs, _f64_bits, _stamp
from .probe import _cpu_kernels, _cuda_kernels, _log_once, numba_cpu_status, numba_cuda_status
from . import tables
from .tables import (
    _CODE_DTYPES,
    _COMPUTE_DTYPES,
    _DTYPE_CODES,
    _INT_VIEW,
    _PAIR_VIEW,
    HYPERLINEAR_VERSION,
    UINT16_CODES,
    HyperLinearError,
    index_dtype,
)

# -- the module -------------------------------------------------------------------------

class HyperLinear(nn.Module):
    """A linear layer whose weight lives as Hyper-Compression indices.

    Build it with :meth:`from_compressed` (a checkpoint entry) or
    :meth:`from_linear` (an ``nn.Linear`` and a config). The plain constructor
    makes an empty layer (indices zero) of the given geometry, to be filled by
    ``load_state_dict``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, U: int, K: int,
                 cx: float, cy: float, radius: float, box_size: float,
                 weight_dtype: torch.dtype | str = torch.float32, backend: str = "auto",
                 device=None, name: str | None = None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise HyperLinearError(f"{name or 'HyperLinear'}: features must be >= 1, got {in_features}->{out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.name = name
        wd = weight_dtype if isinstance(weight_dtype, str) else dtype_name(weight_dtype)
        if wd not in _DTYPE_CODES:
            raise HyperLinearError(f"{name}: unsupported weight dtype {wd}")
        codec = torch.tensor([HYPERLINEAR_VERSION, int(U), int(K), _f64_bits(cx), _f64_bits(cy),
                              _f64_bits(radius), _f64_bits(box_size), _DTYPE_CODES[wd]], dtype=torch.int64)
        self._set_constants(codec)
        self.register_buffer("codec", codec.to(device))
        pairs = (self.in_features + 1) // 2
        self.register_buffer("theta", torch.zeros(self.out_features, pairs, dtype=index_dtype(self.n_codes),
                                                  device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=TORCH_BY_NAME[wd], device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._luts: dict = {}
        self.backend = Backend.AUTO.value
        self.set_backend(backend)
        self.register_load_state_dict_post_hook(HyperLinear._after_load)

    # -- constants --------------------------------------------------------------------
    def _set_constants(self, codec: torch.Tensor) -> None:
        vals = [int(v) for v in codec.detach().to("cpu").tolist()]
        if len(vals) != 8 or vals[0] != HYPERLINEAR_VERSION:
            raise HyperLinearError(f"{self.name}: unknown HyperLinear codec record {vals[:1]} "
                                   f"(this build knows version {HYPERLINEAR_VERSION})")
        U, K = vals[1], vals[2]
        if U < 1 or K < 0 or vals[7] not in _CODE_DTYPES:
            raise HyperLinearError(f"{self.name}: invalid codec constants U={U} K={K} dtype code={vals[7]}")
        self.U, self.K = U, K
        self.cx, self.cy, self.radius, self.box_size = (_bits_f64(v) for v in vals[3:7])
        self.weight_dtype = TORCH_BY_NAME[_CODE_DTYPES[vals[7]]]
        self._luts = {}

    @property
    def n_codes(self) -> int:
        return self.U * (self.K + 1)

    @staticmethod
    def _after_load(module: "HyperLinear", incompatible) -> None:
        module._set_constants(module.codec)
        module._validate_theta()

    def _validate_theta(self) -> None:
        """Kernels index the tables without bounds checks, so every index is checked
        once, here (on build and on every state-dict load)."""
        th = self.theta
        if th.is_meta:
            return
        if self.n_codes > UINT16_CODES and th.dtype == torch.uint16:
            raise HyperLinearError(f"{self.name}: U*(K+1)={self.n_codes} does not fit the uint16 index buffer")
        if th.numel():
            wide = th.to(torch.int32)  # torch has no max() for uint16
            mx = int(wide.max().item())
            mn = int(wide.min().item())
            if mx >= self.n_codes or mn < 0:
                raise IndexRangeError(f"index out of range [0, {self.n_codes}): min {mn}, max {mx}",
                                      tensor=self.name)

    def _apply(self, fn, *args, **kwargs):
        self._luts = {}
        return super()._apply(fn, *args, **kwargs)

    # -- constructors -----------------------------------------------------------------
    @classmethod
    def from_compressed(cls, entry: CompressedTensor, bias: torch.Tensor | RawTensor | CompressedTensor | None = None,
                        *, backend: str = "auto", device=None) -> "HyperLinear":
        """From a compressed checkpoint entry (rows layout, 2-D); ``bias`` may be a
        tensor or a checkpoint entry (decoded)."""
        if not isinstance(entry, CompressedTensor):
            raise HyperLinearError(f"{getattr(entry, 'name', '?')}: not a compressed tensor (raw entries stay nn.Linear)")
        if entry.layout != qp.LAYOUT_ROWS or len(entry.shape) != 2:
            raise HyperLinearError(f"{entry.name}: HyperLinear needs a rows-layout 2-D weight, got layout "
                                   f"{entry.layout!r} shape {entry.shape}")
        out_f, in_f = entry.shape
        theta = np.asarray(entry.theta_matrix())
        mod = cls(in_f, out_f, bias is not None, U=entry.U, K=entry.K, cx=entry.cx, cy=entry.cy,
                  radius=entry.radius, box_size=entry.box_size, weight_dtype=entry.dtype, backend=backend,
                  device="meta", name=entry.name)
        if theta.size and int(theta.max()) >= mod.n_codes:
            raise IndexRangeError(f"index {int(theta.max())} >= U*(K+1) = {mod.n_codes}", tensor=entry.name)
        np_idt = np.uint16 if index_dtype(mod.n_codes) == torch.uint16 else np.int32
        # a copy: the layer must not alias (or later mutate) the entry's indices
        mod.theta = torch.from_numpy(np.array(theta, dtype=np_idt, order="C")).to(device or "cpu")
        mod.codec = torch.tensor(mod._codec_list(), dtype=torch.int64, device=device or "cpu")
        if bias is not None:
            b = bias.decode() if isinstance(bias, (RawTensor, CompressedTensor)) else bias
            b = b.detach()
            if tuple(b.shape) != (out_f,):
                raise HyperLinearError(f"{entry.name}: bias shape {tuple(b.shape)} does not match out_features {out_f}")
            mod.bias = nn.Parameter(b.to(device=device or "cpu").clone(), requires_grad=False)
        return mod

    def _codec_list(self) -> list[int]:
        return [HYPERLINEAR_VERSION, self.U, self.K, _f64_bits(self.cx), _f64_bits(self.cy), _f64_bits(self.radius),
                _f64_bits(self.box_size), _DTYPE_CODES[dtype_name(self.weight_dtype)]]

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: HyperCompressionConfig | None = None, *, name: str = "weight",
                    codec_backend: str = "auto", backend: str = "auto") -> "HyperLinear":
        """Compress ``linear.weight`` with ``config`` (never modifying ``linear``); the
        bias is kept exactly. Raises if the codec keeps the weight raw."""
        entry = compress_tensor(name, linear.weight.detach(), config, backend=codec_backend)
        if isinstance(entry, RawTensor):
            raise HyperLinearError(f"{name}: the codec kept this weight raw ({entry.reason}); keep the nn.Linear")
        dev = linear.weight.device
        return cls.from_compressed(entry, None if linear.bias is None else linear.bias.detach(), backend=backend,
                                   device=dev)

    # -- decoding ---------------------------------------------------------------------
    def lut(self, dtype: torch.dtype | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode tables ``(lut_x, lut_y)``: ``CompressedTensor.lut()`` cast to ``dtype``."""
        dtype = dtype or self.weight_dtype
        device = torch.device(device) if device is not None else self.theta.device
        key = (device, dtype)
        hit = self._luts.get(key)
        if hit is None:
            rho = qp.class_radii(self.radius, self.box_size, self.K)
            lx, ly = qp.decode_lut(self.U, self.K, self.box_size, self.cx, self.cy, rho)
            with torch.inference_mode(False):
                tab = torch.from_numpy(np.stack([lx, ly])).to(dtype).to(device)
            hit = self._luts[key] = (tab[0], tab[1])
        return hit

    def _pair_table(self, dtype: torch.dtype) -> np.ndarray:
        """The CPU fused kernel's table: ``lut(dtype)`` widened to float32, ``(x, y)``
        interleaved, as int64 bit patterns (cached like the tables)."""
        key = ("pairs", dtype)
        hit = self._luts.get(key)
        if hit is None:
            lx, ly = self.lut(dtype, "cpu")
            hit = self._luts[key] = _cpu_kernels().pair_table(lx.float().numpy(), ly.float().numpy())
        return hit

    def _bias_as(self, dtype: torch.dtype, device, widen: bool = False) -> Optional[torch.Tensor]:
        """The bias cast to ``dtype`` (then to float32 when ``widen``: what the fused
        kernels add), cached until the bias changes in place; uncached while it
        trains, so autograd still reaches it."""
        b = self.bias
        if b is None:
            return None
        if b.requires_grad and torch.is_grad_enabled():
            b = b.to(dtype)
            return b.to(torch.float32) if widen else b
        if b.dtype == dtype and not widen:
            return b
        key = ("bias", dtype, widen)
        stamp = _stamp(b)
        hit = self._luts.get(key)
        if hit is None or hit[0] != stamp:
            with torch.inference_mode(False):
                c = b.detach().to(dtype)
                c = (c.to(torch.float32) if widen else c).contiguous()
            hit = self._luts[key] = (stamp, c)
        return hit[1]

    def _cuda_args(self, device: torch.device, dtype: torch.dtype) -> "_CudaArgs":
        """Kernel arguments that do not change between calls (indices, tables,
        bias), converted for numba once: per-call launch cost is what decides the
        small-token speed. Rebuilt when the indices or bias change in place."""
        k = _cuda_kernels()
        key = ("cuda-args", device, dtype)
        stamp = (_stamp(self.theta), None if self.bias is None else _stamp(self.bias))
        hit = self._luts.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        lx, ly = self.lut(dtype, device)
        ivt = _INT_VIEW[dtype]
        with torch.inference_mode(False):
            lx32, ly32 = (lx, ly) if dtype == torch.float32 else (lx.float(), ly.float())
            xy = None
            if dtype in _PAIR_VIEW and self.in_features % 2 == 0:
                packed = k.pack_pairs(lx.view(ivt).cpu().numpy(), ly.view(ivt).cpu().numpy())
                xy = torch.from_numpy(packed).to(device)
            b32 = None if self.bias is None else self._bias_as(dtype, device, widen=True).detach()
        keep = (self.theta, lx, ly, lx32, ly32, xy, b32)  # the views below alias these
        args = _CudaArgs(keep, k.kernel_arg(self.theta), k.kernel_arg(lx.view(ivt)), k.kernel_arg(ly.view(ivt)),
                         None if xy is None else k.kernel_arg(xy), k.kernel_arg(lx32), k.kernel_arg(ly32),
                         None if b32 is None else k.kernel_arg(b32), {})
        self._luts[key] = (stamp, args)
        return args

    def dequantize(self, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """The reference decode: ``W [out, in]`` (default: the source dtype, on the
        indices' device), equal to ``CompressedTensor.decode()``."""
        dtype = dtype or self.weight_dtype
        device = torch.device(device) if device is not None else self.theta.device
        lx, ly = self.lut(dtype, device)
        idx = self.theta.to(device=device, dtype=torch.int64)
        w = torch.stack([lx[idx], ly[idx]], dim=-1).reshape(self.out_features, -1)
        return w[:, : self.in_features].contiguous()

    # -- backend choice ---------------------------------------------------------------
    def set_backend(self, backend: str | Backend) -> "HyperLinear":
        """Pick this layer's backend; raises if an explicit one cannot run here."""
        try:
            b = Backend(backend)
        except ValueError:
            raise BackendUnavailableError(f"unknown HyperLinear backend {backend!r}; choose one of "
                                          f"{[x.value for x in Backend]}") from None
        if b is Backend.NUMBA_CPU:
            ok, why = numba_cpu_status()
            if not ok:
                raise BackendUnavailableError(f"numba-cpu HyperLinear backend unavailable: {why}")
        elif b is Backend.NUMBA_CUDA:
            ok, why = numba_cuda_status()
            if not ok:
                raise BackendUnavailableError(f"numba-cuda HyperLinear backend unavailable: {why}")
        self.backend = b.value
        return self

    def _choose(self, x: torch.Tensor, tokens: int) -> str:
        """``reference``, ``cpu-fused``, ``cpu-decode``, ``cuda-fused`` or ``cuda-decode``."""
        b = self.backend
        is_cuda = x.device.type == "cuda"
        if b == Backend.REFERENCE.value:
            return "reference"
        if b == Backend.NUMBA_CPU.value:
            if x.device.type != "cpu":
                raise BackendUnavailableError(f"{self.name}: numba-cpu backend got a {x.device.type} input")
            return _cpu_path(x, tokens)
        if b == Backend.NUMBA_CUDA.value:
            if not is_cuda:
                raise BackendUnavailableError(f"{self.name}: numba-cuda backend got a {x.device.type} input")
            return "cuda-fused" if tokens <= tables.CUDA_FUSED_MAX_TOKENS else "cuda-decode"
        # auto
        if x.device.type == "cpu":
            small = tokens <= tables.CPU_FUSED_MAX_TOKENS
            ok, why = numba_cpu_status()
            path = _cpu_path(x, tokens) if ok else "reference"
            limit = tables.CPU_FUSED_MAX_TOKENS
        elif is_cuda:
            small, limit = tokens <= tables.CUDA_FUSED_MAX_TOKENS, tables.CUDA_FUSED_MAX_TOKENS
            ok, why = numba_cuda_status()
            path = ("cuda-fused" if small else "cuda-decode") if ok else "reference"
        else:
            small, limit = tokens <= tables.CUDA_FUSED_MAX_TOKENS, tables.CUDA_FUSED_MAX_TOKENS
            ok, why, path = False, f"no numba kernels for device {x.device.type}", "reference"
        if x.dtype == torch.float64 and x.device.type == "cpu" and small and path == "cpu-decode":
            why = "fp64 input: the fused kernel accumulates in fp32"
        if x.dtype == torch.float64 and path.startswith("cuda-fused"):
            path, why = "cuda-decode", "fp64 input: the fused kernel accumulates in fp32"
        _log_once((x.device.type, x.dtype, small), "HyperLinear auto backend: %s for %s %s inputs with %s tokens (%s)",
                  path, x.device.type, x.dtype, f"<={limit}" if small else f">{limit}", why)
        return path

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _hyperlinear_forward(self, x)

    def extra_repr(self) -> str:
        bits = 8.0 * self.theta.element_size() * self.theta.shape[1] / self.in_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"U={self.U}, K={self.K}, box_size={self.box_size:g}, index={str(self.theta.dtype).replace('torch.', '')}, "
                f"bits_per_weight={bits:.2f}, weight_dtype={str(self.weight_dtype).replace('torch.', '')}, "
                f"backend={self.backend}")


def _hyperlinear_forward(m: HyperLinear, x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] != m.in_features:
        raise HyperLinearError(f"{m.name}: input has {x.shape[-1]} features, layer expects {m.in_features}")
    if x.dtype not in _COMPUTE_DTYPES:
        raise HyperLinearError(f"{m.name}: unsupported input dtype {x.dtype}")
    if x.device != m.theta.device:
        raise HyperLinearError(f"{m.name}: input on {x.device}, layer on {m.theta.device}")
    dtype = x.dtype
    tokens = x.numel() // m.in_features
    path = m._choose(x, tokens)
    if path == "reference":
        return F.linear(x, m.dequantize(dtype, x.device), m._bias_as(dtype, x.device))
    # a workspace that autograd would save must not be reused; the fused kernels have no backward
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if path == "cpu-fused" and needs_grad:
        path = "cpu-decode"
    if path == "cpu-fused":
        # like cuda-fused: fp32 operands (the dtype's decoded weights, widened), fp32
        # accumulation and bias, one cast of the output
        k = _cpu_kernels()
        x2 = x.detach().reshape(tokens, m.in_features).to(torch.float32).contiguous()
        out = torch.empty(tokens, m.out_features, dtype=torch.float32)
        b32 = _NO_BIAS if m.bias is None else m._bias_as(dtype, x.device, widen=True).detach().numpy()
        _cpu_fused(k, x2.numpy(), m.theta.numpy(), m._pair_table(dtype), b32, out.numpy())
        return out.to(dtype).reshape(*x.shape[:-1], m.out_features)
    if path == "cpu-decode":
        ivt = _INT_VIEW[dtype]
        lx, ly = m.lut(dtype, x.device)
        k = _cpu_kernels()
        w = torch.empty(m.out_features, m.in_features, dtype=dtype) if needs_grad else \
            _cpu_workspace(m.out_features, m.in_features, dtype)
        _cpu_decode(k, m.theta.numpy(), lx.view(ivt).numpy(), ly.view(ivt).numpy(), w.view(ivt).numpy())
        return F.linear(x, w, m._bias_as(dtype, x.device))
    return _cuda_forward(m, x, path, tokens, needs_grad)


def hyperlinear_bytes(m: HyperLinear) -> dict[str, int]:
    """Device bytes held by a layer: indices, constants (codec record, bias)."""
    return {
        "theta": m.theta.numel() * m.theta.element_size(),
        "codec": m.codec.numel() * m.codec.element_size(),
        "bias": 0 if m.bias is None else m.bias.numel() * m.bias.element_size(),
    }
