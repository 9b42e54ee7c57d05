"""HyperLinear on the CPU: per-thread decode workspaces, the thread pool that splits
a call's rows, and the decode and fused paths."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

from . import tables

# -- CPU workspace -------------------------------------------------------------------

_tls = threading.local()


def _cpu_workspace(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A reusable ``[rows, cols]`` buffer for this thread and dtype: one buffer for
    every layer (sized by the largest), never a per-layer float weight."""
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    need = rows * cols
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < need:
        with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
            buf = torch.empty(need, dtype=dtype)
        bufs[dtype] = buf
    return buf[:need].view(rows, cols)


_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()
_MIN_PARALLEL_WEIGHTS = 1 << 16


def _cpu_threads(rows: int, weights: int) -> int:
    """How many threads share a CPU kernel call: ``torch.get_num_threads()``, or 1
    for a layer too small to split."""
    n = torch.get_num_threads()
    if n <= 1 or weights < _MIN_PARALLEL_WEIGHTS or rows < 2 * n:
        return 1
    return n


def _cpu_pool(n: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < n - 1:
            _pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="hyperlinear-decode")
        return _pool


def _cpu_decode(k, theta: np.ndarray, lx: np.ndarray, ly: np.ndarray, out: np.ndarray) -> None:
    """Split the rows over ``torch.get_num_threads()`` threads (the kernel releases
    the GIL), the caller's thread taking one share."""
    rows = theta.shape[0]
    n = _cpu_threads(rows, out.size)
    if n == 1:
        k.decode_rows(theta, lx, ly, out)
        return
    pool = _cpu_pool(n)
    bounds = [rows * i // n for i in range(n + 1)]
    futs = [pool.submit(k.decode_rows, theta[a:b], lx, ly, out[a:b]) for a, b in zip(bounds[1:-1], bounds[2:])]
    k.decode_rows(theta[: bounds[1]], lx, ly, out[: bounds[1]])
    for f in futs:
        f.result()


_NO_BIAS = np.zeros(0, dtype=np.float32)


def _cpu_fused(k, x: np.ndarray, theta: np.ndarray, lut_xy: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """``out = x W^T + bias`` by :func:`fused_rows` over contiguous row blocks, one per
    thread (the caller's thread taking the first); no workspace, no OpenMP."""
    rows = theta.shape[0]
    n = _cpu_threads(rows, rows * x.shape[1])
    if n == 1:
        k.fused_rows(x, theta, lut_xy, bias, out, 0, rows)
        return
    pool = _cpu_pool(n)
    bounds = [rows * i // n for i in range(n + 1)]
    futs = [pool.submit(k.fused_rows, x, theta, lut_xy, bias, out, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
    k.fused_rows(x, theta, lut_xy, bias, out, 0, bounds[1])
    for f in futs:
        f.result()


@torch.compiler.disable  # numba kernels are opaque to dynamo: a graph break, not a crash
def _cpu_path(x: torch.Tensor, tokens: int) -> str:
    """numba-cpu: the fused kernel for a few tokens (fp32 accumulation, so not for
    fp64 inputs), decode + torch matmul above."""
    return "cpu-fused" if tokens <= tables.CPU_FUSED_MAX_TOKENS and x.dtype != torch.float64 else "cpu-decode"
