"""The fixed-width on-device form of a codec-v2 weight and its product.

Loading decodes the entropy-coded stream straight into this form, never into float
weights: int8 A2 coordinates ``xt = 2m + (b & 1)`` and ``bt = b`` (8 bits per
weight, pair-major ``[pairs, out]`` so that the kernels vectorize across rows), a float32 step per row,
and a short escape list (row, column, exact float32 weight) for the rare pairs whose
coordinates do not fit int8. :func:`linear` computes ``x W^T + b`` from it on
the CPU (``numba_kernels/lattice_linear_cpu.py``): the fused decode-in-the-product
kernel up to :data:`FUSED_MAX_TOKENS` tokens, a decode into a reusable float32
workspace + torch's matmul above. Phase 2 wires this into HyperLinear.
"""

from __future__ import annotations

import importlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import lattice

FUSED_MAX_TOKENS = 32
INT8_LO, INT8_HI = -128, 127
# A call shares its rows with the pool threads only above this many multiply-adds:
# handing work to a pool thread costs tens of microseconds, as much as the whole
# 768x2304 one-token product on one core (one thread beat two on a loaded 2-core
# VM; figures in docs/BENCHMARKS.md)
_MIN_PARALLEL_MACS = 1 << 22


@dataclass(frozen=True, eq=False)
class DeviceForm:
    """``W [out, in]`` as int8 lattice coordinates + float32 row steps + escapes."""

    name: str
    in_features: int
    xt: np.ndarray  # int8 [P, out]: X = 2m + (b & 1)
    bt: np.ndarray  # int8 [P, out]: b
    step: np.ndarray  # float32 [out]
    esc_row: np.ndarray  # int32 [E], sorted by (row, col)
    esc_col: np.ndarray  # int32 [E]
    esc_val: np.ndarray  # float32 [E]

    @property
    def out_features(self) -> int:
        return int(self.xt.shape[1])

    @classmethod
    def from_coords(cls, name: str, m: np.ndarray, b: np.ndarray, base: float, rel: np.ndarray,
                    cols: int) -> "DeviceForm":
        rows, pairs = m.shape
        steps = lattice.steps_f64(base, rel)
        step32 = steps.astype(np.float32)
        if not np.array_equal(step32.astype(np.float64), steps):  # row_steps guarantees it
            raise ValueError(f"{name}: row steps are not exact in float32")
        x = 2 * m + (b & 1)
        out_of = (x < INT8_LO) | (x > INT8_HI) | (b < INT8_LO) | (b > INT8_HI)
        er, ej = np.nonzero(out_of)  # row-major: sorted by row, then pair
        x8 = np.where(out_of, 0, x).astype(np.int8)
        b8 = np.where(out_of, 0, b).astype(np.int8)
        if er.size:
            w = lattice.decode_rows(m[er, ej][:, None], b[er, ej][:, None], steps[er], 2)  # [E, 2]
            cols_x, cols_y = 2 * ej, 2 * ej + 1
            keep_y = cols_y < cols
            rows_l = np.concatenate([er, er[keep_y]])
            cols_l = np.concatenate([cols_x, cols_y[keep_y]])
            vals_l = np.concatenate([w[:, 0], w[keep_y, 1]]).astype(np.float32)
            order = np.lexsort((cols_l, rows_l))
            esc = (rows_l[order].astype(np.int32), cols_l[order].astype(np.int32), vals_l[order])
        else:
            esc = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))
        return cls(name, int(cols), np.ascontiguousarray(x8.T), np.ascontiguousarray(b8.T), step32, *esc)

    # -- sizes ---------------------------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        return {"coords": self.xt.nbytes + self.bt.nbytes, "steps": self.step.nbytes,
                "escapes": self.esc_row.nbytes + self.esc_col.nbytes + self.esc_val.nbytes}

    @property
    def bits_per_weight(self) -> float:
        """Every byte the form holds (coordinates, steps, escapes) per weight."""
        return 8.0 * sum(self.nbytes().values()) / (self.out_features * self.in_features)

    # -- reference -------------------------------------------------------------------------
    def dense(self) -> np.ndarray:
        """float32 ``W`` by the NumPy reference (equals ``V2Tensor.decode()``)."""
        xx = self.xt.T.astype(np.int64)
        b = self.bt.T.astype(np.int64)
        m = (xx - (b & 1)) // 2
        w = lattice.decode_rows(m, b, self.step.astype(np.float64), self.in_features).astype(np.float32)
        w[self.esc_row, self.esc_col] = self.esc_val
        return w


# -- the CPU product ---------------------------------------------------------------------------

_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()
_tls = threading.local()
_NO_BIAS = np.zeros(0, dtype=np.float32)


def _kernels():
    return importlib.import_module("numba_kernels.lattice_linear_cpu")


def _pool_for(n: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < n - 1:
            _pool = ThreadPoolExecutor(max_workers=max(1, n - 1), thread_name_prefix="lattice-linear")
        return _pool


def split_rows(rows: int, n: int) -> list[tuple[int, int]]:
    return [(rows * i // n, rows * (i + 1) // n) for i in range(n)]


def run_split(fn, rows: int, threads: int, *args) -> None:
    """``fn(*args, r0, r1)`` over ``threads`` contiguous row ranges, the caller's
    thread taking the first (the kernels release the GIL)."""
    if threads <= 1:
        fn(*args, 0, rows)
        return
    bounds = split_rows(rows, threads)
    pool = _pool_for(threads)
    futs = [pool.submit(fn, *args, a, b) for a, b in bounds[1:]]
    fn(*args, *bounds[0])
    for f in futs:
        f.result()


def _threads(form: DeviceForm, threads: Optional[int], tokens: int, path: str) -> int:
    """``threads`` if given, else torch's thread count for work large enough to split."""
    if threads is not None:
        return max(1, int(threads))
    import torch

    n = torch.get_num_threads()
    macs = form.out_features * form.in_features * (tokens if path == "fused" else 1)
    return 1 if n <= 1 or macs < _MIN_PARALLEL_MACS or form.out_features < 2 * n else n


def _workspace(rows: int, cols: int) -> np.ndarray:
    """A reusable float32 buffer per thread (one for every layer, sized by the largest)."""
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.size < rows * cols:
        buf = _tls.buf = np.empty(rows * cols, dtype=np.float32)
    return buf[:rows * cols].reshape(rows, cols)


def prepare_x(x2: np.ndarray, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """``(xe, xo)`` of the fused kernel: ``x_even / 2`` and ``x_odd * float32(sqrt(3)/2)``
    (zero for an odd ``in``'s padding)."""
    t, n_in = x2.shape
    xe = np.ascontiguousarray(x2[:, 0::2] * np.float32(0.5))
    xo = np.zeros((t, pairs), dtype=np.float32)
    np.multiply(x2[:, 1::2], np.float32(lattice.H), out=xo[:, : n_in // 2])
    return xe, xo


def linear(x, form: DeviceForm, bias=None, *, threads: Optional[int] = None, path: str = "auto"):
    """``x W^T + bias`` for a float32 CPU tensor ``x [..., in]`` (torch), ``W`` from
    ``form``. ``path``: ``fused`` (decode in the product), ``decode`` (decode into a
    workspace + torch matmul) or ``auto`` (fused up to :data:`FUSED_MAX_TOKENS` tokens)."""
    import torch
    import torch.nn.functional as F

    if x.shape[-1] != form.in_features:
        raise ValueError(f"{form.name}: input has {x.shape[-1]} features, the layer expects {form.in_features}")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"{form.name}: the CPU kernels take float32 CPU inputs, got {x.dtype} on {x.device}")
    tokens = x.numel() // form.in_features
    if path == "auto":
        path = "fused" if tokens <= FUSED_MAX_TOKENS else "decode"
    k = _kernels()
    n = _threads(form, threads, tokens, path)
    if path == "fused":
        x2 = x.detach().reshape(tokens, form.in_features).contiguous().numpy()
        xe, xo = prepare_x(x2, form.xt.shape[0])
        out = np.empty((tokens, form.out_features), dtype=np.float32)
        b = _NO_BIAS if bias is None else np.ascontiguousarray(bias.detach().numpy(), dtype=np.float32)
        run_split(k.fused_rows, form.out_features, n, xe, xo, form.xt, form.bt, form.step, form.esc_row,
                  form.esc_col, form.esc_val, x2, b, out)
        return torch.from_numpy(out).reshape(*x.shape[:-1], form.out_features)
    if path != "decode":
        raise ValueError(f"unknown path {path!r}")
    wt = _workspace(form.in_features, form.out_features)
    run_split(k.decode_rows_t, form.out_features, n, form.xt, form.bt, form.step, form.esc_row, form.esc_col,
              form.esc_val, wt)
    return F.linear(x, torch.from_numpy(wt).t(), bias)
