"""LatticeLinear: the HyperLinear of codec v2. A linear layer whose weight stays the
fixed-width lattice form (:class:`compressor.codec_v2.device.DeviceForm`): int8
coordinates ``xt = 2m + (b & 1)`` and ``bt = b`` (8 bits per weight), a float32
step per row and a short escape list. Loading builds it from the entropy-coded
stream directly; float weights exist only inside a product.

Paths:

* float32 on the CPU: the Numba kernels of :func:`compressor.codec_v2.device.linear`
  (decode inside the product up to 32 tokens, a decode into a reused workspace and
  torch's matmul above), the same bits as the NumPy reference;
* anything else (another dtype, a CUDA tensor, or a call that needs gradients):
  the weight is decoded with torch ops on the input's device into a fresh tensor
  and ``F.linear`` runs; logged once per reason. No CUDA kernel of the v2 product
  exists yet (issue 12 leaves it for a lent GPU).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .tables import HyperLinearError

log = logging.getLogger(__name__)

#: buffers a LatticeLinear keeps in its state dict (besides ``bias``)
BUFFERS = ("xt", "bt", "step", "esc_row", "esc_col", "esc_val")
_H = float(np.sqrt(3.0) / 2.0)
_said: set[str] = set()


def _say_once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        log.info("LatticeLinear: %s", reason)


class LatticeLinear(nn.Module):
    """Build with :meth:`from_entry` (a codec-v2 checkpoint entry)."""

    def __init__(self, form, bias: torch.Tensor | None, *, name: str | None = None, device=None):
        super().__init__()
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
        """``W [out, in]`` decoded with torch ops (a fresh tensor on ``device``)."""
        dev = torch.device(device) if device is not None else self.xt.device
        s = self.step.to(dev, torch.float32)[:, None]
        w = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=dev)
        w[:, 0::2] = s * (self.xt.to(dev).t().to(torch.float32) * 0.5)
        w[:, 1::2] = (s * (self.bt.to(dev).t().to(torch.float32) * _H))[:, : self.in_features // 2]
        if self.esc_row.numel():
            w[self.esc_row.to(dev).long(), self.esc_col.to(dev).long()] = self.esc_val.to(dev)
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise HyperLinearError(f"{self.name}: input has {x.shape[-1]} features, layer expects {self.in_features}")
        if x.device != self.xt.device:
            raise HyperLinearError(f"{self.name}: input on {x.device}, layer on {self.xt.device}")
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if x.device.type == "cpu" and x.dtype == torch.float32 and not needs_grad:
            from ..codec_v2.device import linear

            return linear(x, self._form(), self.bias)
        _say_once("no kernel for this call " + ("(gradients)" if needs_grad else f"({x.dtype} on {x.device.type})")
                  + ": the weight is decoded with torch ops")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype, x.device), bias)

    def device_bytes(self) -> dict[str, int]:
        return {"coords": self.xt.nbytes + self.bt.nbytes, "steps": self.step.nbytes,
                "escapes": self.esc_row.nbytes + self.esc_col.nbytes + self.esc_val.nbytes,
                "bias": 0 if self.bias is None else self.bias.nbytes}

    def extra_repr(self) -> str:
        bits = 8.0 * (self.xt.nbytes + self.bt.nbytes) / (self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"codec=v2, coords=int8, bits_per_weight={bits:.2f}, escapes={int(self.esc_row.numel())}")
