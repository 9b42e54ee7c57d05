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

import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from ..dtypes import DTYPES
from ..errors import ManifestError
from .config import CodecV2Config
from .container import V2Tensor
from .kernels import V2Kernels, resolve

#: manifest keys of a v2 entry (besides ``shard`` and ``sha256``, which the writer adds)
META_KEYS = ("raw", "codec", "shape", "dtype", "role", "q", "stored_bytes", "bits_per_weight", "n_escapes",
             "abs_error_sum", "mae")


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


def check_against_manifest(t: V2Tensor, m: Mapping[str, Any], *, file: str, name: str) -> None:
    """The stored header must say what the manifest says (a tensor moved, renamed or
    swapped between shards is refused, never decoded under another name)."""
    for key, have in (("name", t.name), ("shape", list(t.shape)), ("dtype", t.dtype), ("role", t.role)):
        want = name if key == "name" else m[key]
        if have != want:
            raise ManifestError(f"stored v2 header has {key} {have!r}, the manifest declares {want!r}",
                                file=file, tensor=name)


def timed_encode(tensors: Mapping[str, torch.Tensor], plans, cfg: CodecV2Config,
                 kernels: V2Kernels | str = "auto") -> tuple[dict[str, V2Entry | None], float]:
    """Encode every tensor whose plan says ``v2`` (others map to ``None``: the caller
    keeps them raw); returns the entries and the codec seconds."""
    k = kernels if isinstance(kernels, V2Kernels) else resolve(kernels)
    out: dict[str, V2Entry | None] = {}
    t0 = time.perf_counter()
    for name, t in tensors.items():
        p = plans[name]
        out[name] = encode_entry(name, t, cfg, role=p.role, q=p.q, kernels=k) if p.action == "v2" else None
    return out, time.perf_counter() - t0
