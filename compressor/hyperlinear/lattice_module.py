"""LatticeLinear: the HyperLinear of codec v2. A linear layer whose weight stays the
fixed-width lattice form (:class:`compressor.codec_v2.device.DeviceForm`): int8
coordinates ``xt = 2m + (b & 1)`` and ``bt = b`` (8 bits per weight), a float32
step per row and a short escape list. Loading builds it from the entropy-coded
stream directly; float weights exist only inside a product.

Paths:

* float32 on the CPU: the Numba kernels of :func:`compressor.codec_v2.device.linear`
  (decode inside the product up to 32 tokens, a decode into a reused workspace and
  torch's matmul above), the same bits as the NumPy reference;
* a CUDA tensor, where numba-cuda runs: the kernels of
  :mod:`numba_kernels.lattice_linear_cuda`: up to 16 tokens the fused kernel (decode
  inside the product, fp32 accumulation), above a decode of ``W^T`` into a float32
  workspace (the checkpoint's bits) and torch's matmul in the input's dtype;
* anything else (a call that needs gradients, bf16/fp16 on the CPU, CUDA without
  numba-cuda): the weight is decoded with torch ops, through float64 like the
  checkpoint's own decode, into a fresh tensor and ``F.linear`` runs; logged once
  per reason.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..codec_v2.lattice import H as _H  # float64 sqrt(3)/2: the A2 row height
from .probe import numba_cuda_status
from .tables import HyperLinearError

log = logging.getLogger(__name__)

#: buffers a LatticeLinear keeps in its state dict (besides ``bias``)
BUFFERS = ("xt", "bt", "step", "esc_row", "esc_col", "esc_val")
CUDA_FUSED_MAX_TOKENS = 16
_said: set[str] = set()


def _say_once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        log.info("LatticeLinear: %s", reason)


class LatticeLinear(nn.Module):
    """Build with :meth:`from_entry` (a codec-v2 checkpoint entry)."""

    def __init__(self, form, bias: torch.Tensor | None, *, name: str | None = None, device=None,
                 backend: str = "auto"):
        super().__init__()
        # "auto", or "numba-cuda" to run the CUDA kernels (on CPU tensors under
        # NUMBA_ENABLE_CUDASIM=1: how CI tests that path)
        self.backend = backend
        self._esc_ptr: dict = {}
        self.in_features = int(form.in_features)
        self.out_features = int(form.out_features)
        self.name = name or form.name
        dev = torch.device(device) if device is not None else torch.device("cpu")
        for key in BUFFERS:
            self.register_buffer(key, torch.from_numpy(np.ascontiguousarray(getattr(form, key))).to(dev))
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise HyperLinearError(f"{self.name}: bias shape {tuple(bias.shape)} != ({self.out_features},)")
            self.bias = nn.Parameter(bias.detach().to(dev, torch.float32).clone(), requires_grad=False)
        else:
            self.bias = None

    @classmethod
    def from_entry(cls, entry, bias=None, *, device=None, name: str | None = None) -> "LatticeLinear":
        """``entry``: a :class:`compressor.codec_v2.entry.V2Entry` of a 2-D weight."""
        if len(entry.shape) != 2:
            raise HyperLinearError(f"{entry.name}: a linear weight is 2-D, got shape {list(entry.shape)}")
        b = bias.decode() if hasattr(bias, "decode") else bias
        return cls(entry.device_form(), b, name=name or entry.name, device=device)

    # -- the form, for the CPU kernels ------------------------------------------------
    def _form(self):
        from ..codec_v2.device import DeviceForm

        return DeviceForm(self.name, self.in_features, self.xt.numpy(), self.bt.numpy(), self.step.numpy(),
                          self.esc_row.numpy(), self.esc_col.numpy(), self.esc_val.numpy())

    def dequantize(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """``W [out, in]`` decoded with torch ops (a fresh tensor on ``device``), through
        float64 as the checkpoint's decode: the same weights bit for bit."""
        dev = torch.device(device) if device is not None else self.xt.device
        s = self.step.to(dev, torch.float64)[:, None]
        w = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=dev)
        w[:, 0::2] = (s * (self.xt.to(dev).t().to(torch.float64) * 0.5)).to(torch.float32)
        w[:, 1::2] = (s * (self.bt.to(dev).t().to(torch.float64) * _H)).to(torch.float32)[:, : self.in_features // 2]
        if self.esc_row.numel():
            w[self.esc_row.to(dev).long(), self.esc_col.to(dev).long()] = self.esc_val.to(dev)
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise HyperLinearError(f"{self.name}: input has {x.shape[-1]} features, layer expects {self.in_features}")
        if x.device != self.xt.device:
            raise HyperLinearError(f"{self.name}: input on {x.device}, layer on {self.xt.device}")
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if self.backend == "numba-cuda" or (x.device.type == "cuda" and numba_cuda_status()[0]):
            if not needs_grad and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
                return self._cuda_forward(x)
        elif x.device.type == "cpu" and x.dtype == torch.float32 and not needs_grad:
            from ..codec_v2.device import linear

            return linear(x, self._form(), self.bias)
        _say_once("no kernel for this call " + ("(gradients)" if needs_grad else f"({x.dtype} on {x.device.type})")
                  + ": the weight is decoded with torch ops")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype, x.device), bias)

    def _esc_offsets(self) -> torch.Tensor:
        """Row offsets of the escape list (CSR, int32 ``[out + 1]``) on the layer's
        device, made once per escape list."""
        key = (self.esc_row.device, self.esc_row.data_ptr(), self.esc_row.numel())
        ptr = self._esc_ptr.get(key)
        if ptr is None:
            counts = torch.bincount(self.esc_row.long(), minlength=self.out_features)
            ptr = torch.zeros(self.out_features + 1, dtype=torch.int32, device=self.esc_row.device)
            ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
            self._esc_ptr = {key: ptr}
        return ptr

    def _cuda_forward(self, x: torch.Tensor) -> torch.Tensor:
        import importlib

        k = importlib.import_module("numba_kernels.lattice_linear_cuda")
        hk = importlib.import_module("numba_kernels.hyperlinear_cuda")  # array and stream helpers
        if x.device.type == "cuda":
            dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
            stream = hk.stream_for(torch.cuda.current_stream(x.device).cuda_stream, dev)
        else:
            stream = 0
        a = hk.kernel_arg
        tokens = x.numel() // self.in_features
        if tokens <= CUDA_FUSED_MAX_TOKENS:
            x2 = x.detach().reshape(tokens, self.in_features).to(torch.float32).contiguous()
            pairs = self.xt.shape[0]
            xe = (x2[:, 0::2] * 0.5).contiguous()
            xo = torch.zeros(tokens, pairs, dtype=torch.float32, device=x.device)
            xo[:, : self.in_features // 2] = x2[:, 1::2] * np.float32(_H)
            out = torch.empty(tokens, self.out_features, dtype=torch.float32, device=x.device)
            bias = None if self.bias is None else a(self.bias.detach())
            k.fused(a(xe), a(xo), a(self.xt), a(self.bt), a(self.step), a(self._esc_offsets()), a(self.esc_col),
                    a(self.esc_val), a(x2), bias, a(out), stream)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        wt = torch.empty(self.in_features, self.out_features, dtype=torch.float32, device=x.device)
        k.decode_t(a(self.xt), a(self.bt), a(self.step), a(self.esc_row), a(self.esc_col), a(self.esc_val),
                   a(wt), stream)
        w = wt.t() if x.dtype == torch.float32 else wt.t().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        bits = 8.0 * (self.xt.nbytes + self.bt.nbytes) / (self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"codec=v2, coords=int8, bits_per_weight={bits:.2f}, escapes={int(self.esc_row.numel())}")
