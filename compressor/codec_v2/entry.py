"""A codec-v2 tensor as a checkpoint entry: what a shard stores for it, what the
manifest says of it, and its decoded and on-device forms.

``V2Entry`` speaks the same protocol as the paper codec's ``CompressedTensor`` and
``RawTensor`` (``name``, ``raw``, ``shape``, ``dtype``, ``numel``,
``abs_error_sum``, ``meta()``, ``decode()``), so one checkpoint writer, loader and
report serve both codecs. In a shard it is one 1-D uint8 array: the tensor's
self-validating byte form (:meth:`V2Tensor.to_bytes`: header with CRC, row
scales, symbol tables, block table with CRCs of the coded words and of the
decoded symbols, escapes, payload). The manifest repeats the fields a reader
checks against that header (shape, dtype, role) and the figures a report shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..dtypes import DTYPES
from .config import CodecV2Config
from .container import V2Tensor
from .kernels import V2Kernels, resolve

@dataclass(frozen=True, eq=False)
class V2Entry:
    name: str
    tensor: V2Tensor
    abs_error_sum: float

    raw = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> str:
        return self.tensor.dtype

    @property
    def numel(self) -> int:
        return self.tensor.numel

    @property
    def stored_bytes(self) -> int:
        return self.tensor.nbytes

    def stored(self) -> torch.Tensor:
        """The shard's array: the byte form as 1-D uint8."""
        return torch.from_numpy(np.frombuffer(self.tensor.to_bytes(), dtype=np.uint8).copy())

    def meta(self) -> dict[str, Any]:
        t = self.tensor
        return {"raw": False, "codec": "v2", "shape": list(t.shape), "dtype": t.dtype, "role": t.role, "q": t.q,
                "stored_bytes": t.nbytes, "bits_per_weight": t.bits_per_weight,
                "n_escapes": int(t.esc_index.shape[0]), "abs_error_sum": self.abs_error_sum,
                "mae": self.abs_error_sum / max(t.numel, 1)}

    def decode(self, kernels=None) -> torch.Tensor:
        """The weights in their source dtype (``kernels``: codec-v2 kernels or a name;
        the paper codec's kernels, which a shared caller may pass, mean "auto")."""
        k = kernels if isinstance(kernels, (V2Kernels, str)) else "auto"
        w = torch.from_numpy(self.tensor.decode(k))
        return w.to(DTYPES[self.dtype].torch)

    def device_form(self):
        """The fixed-width form a lattice linear layer holds (never float weights)."""
        return self.tensor.decode_to_device_form()


def encode_entry(name: str, tensor: torch.Tensor, cfg: CodecV2Config, *, role: str, q: float,
                 kernels: V2Kernels | str = "auto") -> V2Entry:
    """Encode one tensor and measure its error (float64 sum of |decoded - source|)."""
    from .encode import _as_numpy, encode_tensor

    k = kernels if isinstance(kernels, V2Kernels) else resolve(kernels)
    t = encode_tensor(tensor, cfg, name=name, role=role, q=q, kernels=k)
    src, _ = _as_numpy(tensor)
    err = float(np.abs(t.decode(k).astype(np.float64) - src.astype(np.float64)).sum())
    return V2Entry(name, t, err)
