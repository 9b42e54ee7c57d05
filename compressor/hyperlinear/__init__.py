"""HyperLinear: a linear layer that keeps its weight as Hyper-Compression indices and
decodes them inside the matrix product (CPU: Numba kernels on a thread pool; CUDA:
Numba-CUDA kernels).

One job per module: :mod:`.module` (the ``nn.Module`` and its dispatch), :mod:`.cpu`
(workspaces, threads, the CPU paths), :mod:`.cuda` (kernel arguments and launches),
:mod:`.probe` (which kernels can run here) and :mod:`.tables` (constants, dtype
tables, the error). Callers use the names below.
"""

from __future__ import annotations

from .cuda import _cuda_forward
from .module import HyperLinear, hyperlinear_bytes
from .probe import _logged, numba_cpu_status, numba_cuda_status
from .tables import (
    CPU_FUSED_MAX_TOKENS,
    CUDA_FUSED_MAX_TOKENS,
    HYPERLINEAR_VERSION,
    UINT16_CODES,
    HyperLinearError,
    index_dtype,
)

__all__ = ["CPU_FUSED_MAX_TOKENS", "CUDA_FUSED_MAX_TOKENS", "HYPERLINEAR_VERSION", "UINT16_CODES", "HyperLinear",
           "HyperLinearError", "hyperlinear_bytes", "index_dtype", "numba_cpu_status", "numba_cuda_status",
           "_cuda_forward", "_logged"]
