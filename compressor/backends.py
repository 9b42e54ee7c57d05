"""Backend choice for the codec's per-point kernels (torchao-style enum with AUTO).

``auto`` takes Numba-CUDA on a real GPU, else Numba CPU, else the NumPy
reference, and logs once why it fell back. An explicitly requested backend that
cannot run raises :class:`BackendUnavailableError`. Importing this module imports
neither numba nor numba.cuda: kernels load on first use.
"""

from __future__ import annotations

import enum
import importlib
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import numpy as np

from .errors import BackendUnavailableError

log = logging.getLogger(__name__)


class Backend(str, enum.Enum):
    AUTO = "auto"
    REFERENCE = "reference"
    NUMBA_CPU = "numba-cpu"
    NUMBA_CUDA = "numba-cuda"


# CLI --device spellings
DEVICE_TO_BACKEND = {"auto": Backend.AUTO, "cpu": Backend.NUMBA_CPU, "cuda": Backend.NUMBA_CUDA}


@dataclass(frozen=True)
class Kernels:
    """The per-point operations a backend provides (same signatures as
    :mod:`compressor.quant_primitives`)."""

    name: str
    encode_trial: Callable
    decode_points: Callable
    pack_bits: Callable
    unpack_bits: Callable
    error_sum: Callable
    radius_and_inner: Callable
    # moves a float64 point array to where encode_trial runs (identity on the CPU), so
    # a tensor's points are transferred once for all its trials
    to_device: Callable


@dataclass(frozen=True)
class ResolvedBackend:
    backend: Backend
    kernels: Kernels
    reason: str


def _from_module(name: str, mod: ModuleType) -> Kernels:
    return Kernels(name, mod.encode_trial, mod.decode_points, mod.pack_bits, mod.unpack_bits, mod.error_sum,
                   getattr(mod, "radius_and_inner", None) or _reference_radius(),
                   getattr(mod, "to_device", None) or _identity)


def _from_kernel_module(name: str, mod: ModuleType) -> Kernels:
    """A Numba kernel module as a backend: the kernels take the lattice and decode
    tables as arguments (``numba_kernels`` imports numpy and numba only), so the
    reference builds them here; a module without its own ``error_sum`` decodes
    with its kernel and sums on the host as the reference does."""
    from . import quant_primitives as qp

    def encode_trial(px, py, cx, cy, box_size, U, rho, pad_cols):
        k, lut_x, lut_y = qp.trial_tables(U, box_size, cx, cy, rho)
        return mod.encode_trial(px, py, cx, cy, box_size, U, rho, pad_cols, k, lut_x, lut_y)

    def error_sum(theta, lut_x, lut_y, px, py, pad_cols):
        dx, dy = mod.decode_points(theta, lut_x, lut_y)
        return qp.abs_error_sum(np.asarray(px, dtype=np.float64), np.asarray(py, dtype=np.float64), dx, dy,
                                int(pad_cols))

    return Kernels(name, encode_trial, mod.decode_points, mod.pack_bits, mod.unpack_bits,
                   getattr(mod, "error_sum", None) or error_sum,
                   getattr(mod, "radius_and_inner", None) or _reference_radius(),
                   getattr(mod, "to_device", None) or _identity)


def _identity(a):
    return a


def _reference_radius():
    from .quant_primitives import radius_and_inner

    return radius_and_inner


def _reference() -> Kernels:
    from . import quant_primitives

    return _from_module(Backend.REFERENCE.value, quant_primitives)


def _numba_cpu() -> Kernels:
    try:
        mod = importlib.import_module("numba_kernels.cpu")
    except ImportError as exc:
        raise BackendUnavailableError(f"numba-cpu backend unavailable: {exc}") from exc
    return _from_kernel_module(Backend.NUMBA_CPU.value, mod)


def cuda_status() -> tuple[bool, str]:
    """(usable, reason). A CUDA simulator does not count as a GPU for ``auto``."""
    try:
        mod = importlib.import_module("numba_kernels.cuda")
    except ImportError as exc:
        return False, f"numba-cuda not importable ({exc})"
    return mod.is_available()


def _numba_cuda() -> Kernels:
    ok, reason = cuda_status()
    if not ok:
        raise BackendUnavailableError(f"numba-cuda backend unavailable: {reason}")
    return _from_kernel_module(Backend.NUMBA_CUDA.value, importlib.import_module("numba_kernels.cuda"))


_cache: dict[Backend, ResolvedBackend] = {}


def resolve_backend(requested: str | Backend = Backend.AUTO) -> ResolvedBackend:
    try:
        b = Backend(requested)
    except ValueError:
        raise BackendUnavailableError(
            f"unknown backend {requested!r}; choose one of {[x.value for x in Backend]}"
        ) from None
    if b in _cache:
        return _cache[b]
    if b is Backend.REFERENCE:
        res = ResolvedBackend(b, _reference(), "requested")
    elif b is Backend.NUMBA_CPU:
        res = ResolvedBackend(b, _numba_cpu(), "requested")
    elif b is Backend.NUMBA_CUDA:
        res = ResolvedBackend(b, _numba_cuda(), "requested")
    else:
        ok, why = cuda_status()
        if ok:
            res = ResolvedBackend(Backend.NUMBA_CUDA, _numba_cuda(), "auto: CUDA GPU found")
        else:
            try:
                res = ResolvedBackend(Backend.NUMBA_CPU, _numba_cpu(), f"auto: no CUDA GPU ({why})")
            except BackendUnavailableError as exc:
                res = ResolvedBackend(Backend.REFERENCE, _reference(), f"auto: no CUDA GPU ({why}); {exc}")
        log.info("codec backend %s (%s)", res.backend.value, res.reason)
    _cache[b] = res
    return res


def warm_up(cuda: bool | None = None) -> dict:
    """``birkhoff warmup``: compile or load every kernel signature
    (:func:`numba_kernels.warmup.warm_up`), the codec's kernels called with the
    reference's tables."""
    from numba_kernels.warmup import warm_up as warm_kernels

    from . import quant_primitives as qp

    return warm_kernels(cuda=cuda, trial_tables=qp.trial_tables)
