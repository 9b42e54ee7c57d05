"""HyperLinear's constants and dtype tables, its error, and the index dtype rule."""

from __future__ import annotations

import logging

import torch

from ..dtypes import DTYPES, FLOAT_NAMES, FLOAT_TORCH
from ..errors import BirkhoffError

log = logging.getLogger(__name__)

HYPERLINEAR_VERSION = 1
CUDA_FUSED_MAX_TOKENS = 16  # the fused kernel's per-thread accumulators (numba_kernels.hyperlinear_cuda.MAX_TOKENS)
# CPU: fused decode-and-dot up to this many tokens, decode + torch matmul above. Measured
# on 2 cores for the six SAM shapes: fused faster than decode + matmul at 1..32 tokens on
# every shape, slower at 64 for 5120->1280 (docs/BENCHMARKS.md (HyperLinear section))
CPU_FUSED_MAX_TOKENS = 32
UINT16_CODES = 1 << 16

# the weight dtype's code in the module's stored meta buffer: fixed numbers, not the
# dtype table's order, so that a saved HyperLinear keeps its meaning
_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_COMPUTE_DTYPES = FLOAT_TORCH
# same-width integer views: the decode kernels move bit patterns
_INT_VIEW = {DTYPES[n].torch: DTYPES[n].int_view for n in FLOAT_NAMES}
# twice-as-wide integer views: the CUDA pair decode stores both weights of an index at once
_PAIR_VIEW = {torch.float32: torch.int64, torch.float16: torch.int32, torch.bfloat16: torch.int32}


class HyperLinearError(BirkhoffError, ValueError):
    """A HyperLinear cannot be built from the given tensors, or gets bad input."""


def index_dtype(n_codes: int) -> torch.dtype:
    """uint16 while every index fits (8 bits per weight), else int32."""
    return torch.uint16 if n_codes <= UINT16_CODES else torch.int32
