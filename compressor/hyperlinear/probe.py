"""Which HyperLinear kernels can run here (Numba CPU, Numba-CUDA), probed once, and
the once-per-process log of the automatic choice."""

from __future__ import annotations

import importlib
import logging
import threading

import torch

log = logging.getLogger(__name__)


# -- backend availability ---------------------------------------------------------

_avail_cache: dict[str, tuple[bool, str]] = {}


def _cpu_kernels():
    return importlib.import_module("numba_kernels.hyperlinear_cpu")


def _cuda_kernels():
    return importlib.import_module("numba_kernels.hyperlinear_cuda")


def numba_cpu_status() -> tuple[bool, str]:
    if "cpu" not in _avail_cache:
        try:
            _cpu_kernels()
            _avail_cache["cpu"] = (True, "numba importable")
        except Exception as exc:  # ImportError, or numba failing to initialise
            _avail_cache["cpu"] = (False, f"numba_kernels.hyperlinear_cpu not importable ({exc})")
    return _avail_cache["cpu"]


def numba_cuda_status() -> tuple[bool, str]:
    """Usable for torch CUDA tensors: needs a real GPU (the simulator takes host arrays)."""
    if "cuda" not in _avail_cache:
        if not torch.cuda.is_available():
            _avail_cache["cuda"] = (False, "torch sees no CUDA device")
        else:
            try:
                mod = _cuda_kernels()
                if mod.is_simulator():
                    _avail_cache["cuda"] = (False, "numba runs the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
                else:
                    _avail_cache["cuda"] = (True, "numba-cuda importable")
            except Exception as exc:
                _avail_cache["cuda"] = (False, f"numba_kernels.hyperlinear_cuda not importable ({exc})")
    return _avail_cache["cuda"]


_logged: set = set()
_log_lock = threading.Lock()


def _log_once(key, msg, *args) -> None:
    with _log_lock:
        if key in _logged:
            return
        _logged.add(key)
    log.info(msg, *args)
