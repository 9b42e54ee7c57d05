"""Rate control of codec v2 across the tensors of a checkpoint (data-free).

**The allocation rule** (measured on MiniLM, note i12 / bench_codec_v2_design.py):
every coded tensor gets the same *relative* step ``q`` (so the same relative RMS
error, ``0.2635 q``, row by row), except embedding tables, which get
``embedding_factor * q``. Measured against the alternatives at equal size:

* equal relative error beat equal absolute error (reverse water-filling on the
  weights' MSE, i.e. one absolute step for every tensor) and a step per row that
  ignores the row's scale;
* a table read one row per token tolerates a coarser step than a matrix every token
  goes through: factor 3 gave the best cosine per bit of 1, 2, 3 and 4.

**The knob**: a preset (``faithful`` / ``small``), a relative error, or a mean
bits-per-weight budget over the coded tensors, met by bisection on ``q`` with the
rule above (on a row sample: ideal entropy of the coordinates plus the row scales),
then checked against the real coded size.

**What stays raw**: 1-D tensors (biases, norms: few bytes, and the other methods of
the frontier keep them too), integer tensors, tensors under ``min_elements``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import NonFiniteTensorError
from .config import CodecV2Config
from .container import V2Tensor
from .encode import _as_numpy, encode_tensor, role_of
from .kernels import V2Kernels, resolve
from . import lattice
from . import symbols as sy

log = logging.getLogger(__name__)

SAMPLE_PAIRS = 1 << 15
ROW_SCALE_BITS = 16
TABLE_ENTRY_BITS = 16
HEADER_BITS = 8 * 450  # the byte form's fixed part and JSON header (measured 400-450 bytes)


@dataclass(frozen=True)
class TensorPlan:
    name: str
    action: str  # "v2" or "raw"
    role: str | None = None
    q: float | None = None
    reason: str = ""


def roles_from_module(module) -> dict[str, str]:
    """``{"<name>.weight": "embedding"}`` for every ``nn.Embedding`` of a torch module:
    the role a model source gives without relying on names."""
    from torch import nn

    return {f"{name}.weight" if name else "weight": "embedding" for name, m in module.named_modules()
            if isinstance(m, nn.Embedding)}


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.kind == "f"


def raw_reason(a: np.ndarray, cfg: CodecV2Config) -> str | None:
    if not _is_float(a):
        return f"{a.dtype} tensor"
    if a.ndim < 2:
        return "1-D tensor"
    if a.size < cfg.min_elements:
        return f"fewer than {cfg.min_elements} elements"
    return None


def _arrays(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for name, t in tensors.items():
        try:
            out[name] = _as_numpy(t)[0]
        except TypeError:  # integer / bool tensors: kept raw
            out[name] = t.numpy() if hasattr(t, "numpy") else np.asarray(t)
    return out


def plan_tensors(tensors: Mapping[str, Any], cfg: CodecV2Config | None = None, *,
                 roles: Mapping[str, str] | None = None, kernels: V2Kernels | str = "auto") -> dict[str, TensorPlan]:
    """Per tensor: raw or v2, its role and relative step ``q``."""
    cfg = cfg or CodecV2Config()
    arrays = _arrays(tensors)
    plans: dict[str, TensorPlan] = {}
    factors: dict[str, float] = {}
    for name, a in arrays.items():
        why = raw_reason(a, cfg)
        if why:
            plans[name] = TensorPlan(name, "raw", reason=why)
            continue
        role = (roles or {}).get(name) or role_of(name, cfg)
        factors[name] = cfg.embedding_factor if role == "embedding" else 1.0
        plans[name] = TensorPlan(name, "v2", role=role)
    if cfg.bits_per_weight is not None and factors:
        q = solve_rel_step({n: arrays[n] for n in factors}, factors, cfg.bits_per_weight, kernels)
    else:
        q = cfg.rel_step
    for name, f in factors.items():
        p = plans[name]
        plans[name] = TensorPlan(name, "v2", role=p.role, q=q * f)
    return plans


def _sample_rows(a: np.ndarray) -> np.ndarray:
    rows2d = lattice.as_rows(a)
    pairs = (rows2d.shape[1] + 1) // 2
    take = max(1, min(rows2d.shape[0], SAMPLE_PAIRS // max(pairs, 1)))
    idx = np.linspace(0, rows2d.shape[0] - 1, take).round().astype(np.int64)
    return np.ascontiguousarray(rows2d[np.unique(idx)])


def _entropy_bits(v: np.ndarray) -> float:
    c = np.bincount((v - v.min()).ravel())
    c = c[c > 0]
    return float(-(c * np.log2(c / c.sum())).sum())


class _Samples:
    """Row samples of many tensors, stacked by row length so that one kernel call
    per length encodes them all (a bisection step is then a few calls, not one per
    tensor); the row sums do not depend on ``q`` and are computed once."""

    def __init__(self, arrays: Mapping[str, np.ndarray], factors: Mapping[str, float], kernels: V2Kernels):
        by_cols: dict[int, list[str]] = {}
        self.rows2d = {}
        for n, a in arrays.items():
            r = _sample_rows(a)
            self.rows2d[n] = r
            by_cols.setdefault(r.shape[1], []).append(n)
        self.groups = []
        for cols, names in by_cols.items():
            stack = np.ascontiguousarray(np.concatenate([self.rows2d[n] for n in names]))
            ss = kernels.row_sumsq(stack)
            bounds = np.cumsum([0] + [self.rows2d[n].shape[0] for n in names])
            self.groups.append((cols, names, stack, ss, bounds))
        self.factors = factors
        self.weight = {n: a.size for n, a in arrays.items()}
        self.total = sum(self.weight.values())

    def bits_per_weight(self, q: float, kernels: V2Kernels) -> float:
        """Estimated mean coded bits per weight at relative step ``q``: per tensor, the
        ideal entropy of its sample's coordinates, the float16 row scales, the symbol
        tables (as built for the sample) and the header."""
        acc = 0.0
        for cols, names, stack, ss, bounds in self.groups:
            steps = np.empty(stack.shape[0], dtype=np.float64)
            for n, r0, r1 in zip(names, bounds[:-1], bounds[1:]):
                base, rel = lattice.row_steps(ss[r0:r1], cols, q * self.factors[n])
                steps[r0:r1] = lattice.steps_f64(base, rel)
            m, b = kernels.encode_rows(stack, steps)
            for n, r0, r1 in zip(names, bounds[:-1], bounds[1:]):
                mk, bk = m[r0:r1], b[r0:r1]
                per_weight = (_entropy_bits(mk) + _entropy_bits(bk) + ROW_SCALE_BITS * (r1 - r0)) / ((r1 - r0) * cols)
                fixed = HEADER_BITS + TABLE_ENTRY_BITS * (sy.build_model(mk).n + sy.build_model(bk).n)
                acc += per_weight * self.weight[n] + fixed
        return acc / self.total


def solve_rel_step(arrays: Mapping[str, np.ndarray], factors: Mapping[str, float], target_bpw: float,
                   kernels: V2Kernels | str = "auto") -> float:
    """The ``q`` whose rule (``q * factor`` per tensor) gives ``target_bpw`` mean bits
    per weight over these tensors: bisection on ``log q`` over row samples (bits fall
    monotonically as ``q`` grows), to 1% in ``q``."""
    k = kernels if isinstance(kernels, V2Kernels) else resolve(kernels)
    samples = _Samples(arrays, factors, k)
    lo, hi = math.log(1e-3), math.log(8.0)  # q range: ~12 bits down to ~0.1 bit per weight
    while hi - lo > 0.01:
        mid = 0.5 * (lo + hi)
        if samples.bits_per_weight(math.exp(mid), k) > target_bpw:
            lo = mid
        else:
            hi = mid
    q = math.exp(hi)
    log.info("bits_per_weight %.3f -> relative step q = %.4f", target_bpw, q)
    return q


def _raw_copy(t) -> np.ndarray:
    """The tensor's bytes as a NumPy array (bfloat16 as its uint16 bit pattern)."""
    if hasattr(t, "detach"):
        import torch

        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return t.numpy().copy()
    return np.array(t, copy=True)


@dataclass
class EncodedSet:
    """The result of :func:`encode_tensors`: v2 tensors and raw tensors by name."""

    entries: dict[str, V2Tensor | np.ndarray]
    plans: dict[str, TensorPlan]
    seconds: float

    def coded_bytes(self) -> int:
        return sum(e.nbytes if isinstance(e, V2Tensor) else e.nbytes for e in self.entries.values())

    def stats(self, source_bytes: int | None = None) -> dict[str, Any]:
        v2 = [e for e in self.entries.values() if isinstance(e, V2Tensor)]
        raw = [e for e in self.entries.values() if not isinstance(e, V2Tensor)]
        n_all = sum(e.numel if isinstance(e, V2Tensor) else e.size for e in self.entries.values())
        v2_bytes = sum(e.nbytes for e in v2)
        v2_n = sum(e.numel for e in v2)
        total = v2_bytes + sum(e.nbytes for e in raw)
        out = {"bytes": total, "bits_per_weight": 8.0 * total / max(n_all, 1),
               "coded_bits_per_weight": 8.0 * v2_bytes / max(v2_n, 1), "v2_tensors": len(v2),
               "raw_tensors": len(raw), "seconds": self.seconds}
        if source_bytes:
            out["ratio"] = source_bytes / total
        return out

    def decoded(self, kernels: V2Kernels | str = "auto") -> dict[str, np.ndarray]:
        return {n: (e.decode(kernels) if isinstance(e, V2Tensor) else e) for n, e in self.entries.items()}


def encode_tensors(tensors: Mapping[str, Any], cfg: CodecV2Config | None = None, *,
                   roles: Mapping[str, str] | None = None, kernels: V2Kernels | str = "auto") -> EncodedSet:
    """Plan and encode every tensor (inputs never modified); ``seconds`` is the codec
    time, planning included."""
    cfg = cfg or CodecV2Config()
    k = kernels if isinstance(kernels, V2Kernels) else resolve(kernels)
    t0 = time.perf_counter()
    plans = plan_tensors(tensors, cfg, roles=roles, kernels=k)
    entries: dict[str, V2Tensor | np.ndarray] = {}
    for name, t in tensors.items():
        p = plans[name]
        if p.action == "v2":
            try:
                entries[name] = encode_tensor(t, cfg, name=name, role=p.role, q=p.q, kernels=k)
                continue
            except NonFiniteTensorError:
                raise
            except ValueError as exc:  # a dynamic range the codec refuses: keep it exact
                log.info("%s: kept raw (%s)", name, exc)
                plans[name] = TensorPlan(name, "raw", reason=str(exc))
        entries[name] = _raw_copy(t)
    return EncodedSet(entries, plans, time.perf_counter() - t0)
