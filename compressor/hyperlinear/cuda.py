"""HyperLinear on a CUDA device: the cached per-layer kernel arguments and the
kernel launches (a cached fast launch where numba-cuda offers one)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .probe import _cuda_kernels, _log_once
from .tables import _INT_VIEW, _PAIR_VIEW

if TYPE_CHECKING:
    from .module import HyperLinear

log = logging.getLogger(__name__)

class _CudaArgs(NamedTuple):
    """A layer's numba-cuda kernel arguments for one (device, dtype)."""
    keep: tuple  # the tensors the views alias, kept alive with them
    theta: object
    lut_x: object  # lut(dtype) as same-width integers (decode_rows)
    lut_y: object
    lut_xy: object  # packed pairs (decode_pairs), None for odd ``in`` or fp64
    lut_x32: object  # lut(dtype) widened to float32 (fused)
    lut_y32: object
    bias32: object  # bias in dtype, widened to float32 (fused), or None
    launches: dict  # prepared launches by (path, tokens, stream), None where none can be made


def _stamp(t: torch.Tensor) -> tuple[int, int]:
    """Identifies a tensor's current contents for caches: storage and in-place
    version (inference tensors have no version counter and cannot change outside
    inference mode)."""
    try:
        ver = t._version
    except RuntimeError:
        ver = -1
    return t.data_ptr(), ver


def _f64_bits(v: float) -> int:
    return int(np.array(v, dtype=np.float64).view(np.int64))


def _bits_f64(i: int) -> float:
    return float(np.array(i, dtype=np.int64).view(np.float64))


def _cuda_forward(m: HyperLinear, x: torch.Tensor, path: str, tokens: int, needs_grad: bool) -> torch.Tensor:
    """The numba-cuda paths. Also runs CPU tensors under ``NUMBA_ENABLE_CUDASIM=1``,
    which is how CI tests this orchestration (the kernels then take host arrays)."""
    k = _cuda_kernels()
    dtype = x.dtype
    if x.device.type == "cuda":
        dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
        stream = k.stream_for(torch.cuda.current_stream(x.device).cuda_stream, dev)
    else:
        stream = 0
    a = m._cuda_args(x.device, dtype)
    if path == "cuda-fused" and not needs_grad:
        # fp32 operands (the dtype's decoded weights and bias, widened), fp32
        # accumulation with the bias added in the kernel, one cast of the output
        x2 = x.detach().reshape(tokens, m.in_features).to(torch.float32).contiguous()
        out = torch.empty(tokens, m.out_features, dtype=torch.float32, device=x.device)
        _launch(k, a, ("fused", tokens, stream), stream, (x2,), (out,),
                lambda xa, oa: k.fused_linear_call(xa, a.theta, a.lut_x32, a.lut_y32, oa, a.bias32))
        return out.to(dtype).reshape(*x.shape[:-1], m.out_features)
    w = torch.empty(m.out_features, m.in_features, dtype=dtype, device=x.device)
    wv = w.view(_PAIR_VIEW[dtype] if a.lut_xy is not None else _INT_VIEW[dtype])
    _launch(k, a, ("decode", stream), stream, (), (wv,),
            lambda wa: k.decode_call(a.theta, a.lut_x, a.lut_y, a.lut_xy, wa))
    return F.linear(x, w, m._bias_as(dtype, x.device))


_MISSING = object()
_fast_launch = {"ok": True}  # cleared for the process if a prepared launch ever disagrees with numba's


def _launch(k, a: "_CudaArgs", key, stream, inputs: tuple, outputs: tuple, make_call) -> None:
    """Run the kernel call ``make_call(*views of inputs + outputs)`` (a
    ``KernelCall`` or ``None``) through the layer's prepared launch for ``key``
    (made on first use and checked once against numba's own launch), or through
    numba's dispatcher where none can be made (the simulator, for one)."""
    tensors = inputs + outputs
    pl = a.launches.get(key, _MISSING) if _fast_launch["ok"] else None
    if pl is not None and pl is not _MISSING:
        pl(*[t.data_ptr() for t in tensors])
        return
    call = make_call(*[k.kernel_arg(t) for t in tensors])
    if call is None:  # nothing to compute
        return
    call.launch(stream)
    if pl is None:
        return
    try:
        pl = call.prepare(stream)
    except k.FastLaunchUnavailable as exc:
        _log_once(("fast-launch", str(exc)), "HyperLinear numba-cuda: launching through numba's dispatcher (%s)", exc)
        a.launches[key] = None
        return
    # first use: the prepared launch must write, bit for bit, what numba's launch wrote
    check = [torch.empty_like(t) for t in outputs]
    pl(*[t.data_ptr() for t in inputs + tuple(check)])
    if all(torch.equal(c.view(torch.uint8), t.view(torch.uint8)) for c, t in zip(check, outputs)):
        a.launches[key] = pl
    else:
        _fast_launch["ok"] = False
        log.warning("HyperLinear numba-cuda: a prepared launch disagreed with numba's own launch; "
                    "launching through numba's dispatcher from now on")
