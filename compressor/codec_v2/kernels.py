"""Which implementation runs codec v2's per-row work: the NumPy reference, Numba CPU
or Numba CUDA (same results bit for bit). ``auto`` takes CUDA on a real GPU, else
Numba CPU, else the reference. Importing this module imports no numba.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..backends import Backend
from ..errors import BackendUnavailableError
from . import lattice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class V2Kernels:
    """``row_sumsq(w) -> ss``, ``encode_rows(w, steps) -> (m, b)`` (int32, or int64 from
    the reference: the same values),
    ``decode_rows(m, b, steps, cols, dtype) -> w``: host arrays in and out."""

    name: str
    row_sumsq: Callable
    encode_rows: Callable
    decode_rows: Callable


def _reference() -> V2Kernels:
    def decode(m, b, steps, cols, dtype=np.float32):
        return lattice.decode_rows(m, b, steps, cols).astype(dtype)

    return V2Kernels(Backend.REFERENCE.value, lattice.row_sumsq, lattice.encode_rows, decode)


def _from_module(name: str, mod) -> V2Kernels:
    def row_sumsq(w):
        out = np.empty(w.shape[0], dtype=np.float64)
        mod.row_sumsq(np.ascontiguousarray(w), out)
        return out

    def encode(w, steps):
        rows, cols = w.shape
        m = np.empty((rows, (cols + 1) // 2), dtype=np.int32)
        b = np.empty_like(m)
        mod.encode_rows(np.ascontiguousarray(w), np.ascontiguousarray(steps, dtype=np.float64), m, b)
        lim = lattice.MAX_COORD
        if m.size and max(int(m.max()), -int(m.min()), int(b.max()), -int(b.min())) > lim:
            raise ValueError(f"a lattice coordinate exceeds {lim}: the step is far too small for the row")
        return m, b

    def decode(m, b, steps, cols, dtype=np.float32):
        out = np.empty((m.shape[0], cols), dtype=dtype)
        mod.decode_rows(np.ascontiguousarray(m), np.ascontiguousarray(b),
                        np.ascontiguousarray(steps, dtype=np.float64), out)
        return out

    return V2Kernels(name, row_sumsq, encode, decode)


def _cuda_status() -> tuple[bool, str]:
    try:
        mod = importlib.import_module("numba_kernels.lattice_v2_cuda")
    except ImportError as exc:
        return False, f"numba-cuda not importable ({exc})"
    return mod.is_available()


_cache: dict[Backend, V2Kernels] = {}


def resolve(requested: str | Backend = Backend.AUTO, *, allow_simulator: bool = False) -> V2Kernels:
    """The kernels for ``requested``; an explicit backend that cannot run raises
    :class:`BackendUnavailableError`. ``allow_simulator`` lets tests run the CUDA
    kernels under ``NUMBA_ENABLE_CUDASIM=1``."""
    try:
        b = Backend(requested)
    except ValueError:
        raise BackendUnavailableError(f"unknown backend {requested!r}; choose one of "
                                      f"{[x.value for x in Backend]}") from None
    key = b if not allow_simulator else None
    if key in _cache:
        return _cache[key]
    if b is Backend.REFERENCE:
        k = _reference()
    elif b is Backend.NUMBA_CPU:
        try:
            k = _from_module(b.value, importlib.import_module("numba_kernels.lattice_v2_cpu"))
        except ImportError as exc:
            raise BackendUnavailableError(f"numba-cpu backend unavailable: {exc}") from exc
    elif b is Backend.NUMBA_CUDA:
        ok, why = _cuda_status()
        if not ok and not (allow_simulator and why == "CUDA simulator"):
            raise BackendUnavailableError(f"numba-cuda backend unavailable: {why}")
        k = _from_module(b.value, importlib.import_module("numba_kernels.lattice_v2_cuda"))
    else:
        ok, why = _cuda_status()
        if ok:
            k = resolve(Backend.NUMBA_CUDA)
        else:
            try:
                k = resolve(Backend.NUMBA_CPU)
            except BackendUnavailableError:
                k = _reference()
        if not ok:
            log.info("codec v2 backend %s (no CUDA GPU: %s)", k.name, why)
    if key is not None:
        _cache[key] = k
    return k
