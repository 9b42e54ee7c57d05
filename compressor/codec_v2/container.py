"""One codec-v2 tensor: the validated container and its decoding.

:func:`~.encode.encode_tensor` builds a :class:`V2Tensor`; ``V2Tensor.to_bytes()`` /
``from_bytes()`` is its self-contained byte form (phase 2 may instead keep
:meth:`V2Tensor.meta` in a manifest and :meth:`V2Tensor.arrays` in a shard:
:meth:`V2Tensor.from_parts` takes those and runs the same validation). The layout and
the checks of every field are :mod:`.layout`. Decoding checks each block's word CRC,
that its ANS stream ends exactly at its symbols, the CRC of the decoded symbols, and
that its escapes are exactly the listed ones. Every error is a typed
:class:`~compressor.errors.FormatError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

from ..errors import (ChecksumError, EntropyStreamError, ManifestError, SizeLimitError, TruncatedDataError,
                      UnknownFormatError)
from . import lattice, layout
from . import symbols as sy
from .kernels import V2Kernels, resolve
from .layout import (ARRAY_ORDER, FORMAT_NAME, FORMAT_VERSION, MAGIC, MAX_HEADER,
                     arrays_crc, pack_parts)

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class V2Tensor:
    """An entropy-coded lattice tensor (see the module docstring)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str
    q: float
    base: float
    rel: np.ndarray
    model_m: sy.SymbolModel
    model_b: sy.SymbolModel
    block_rows: int
    block_words: np.ndarray
    block_crc: np.ndarray
    code_crc: np.ndarray
    esc_index: np.ndarray
    esc_value: np.ndarray
    payload: np.ndarray
    lattice: str = "a2"
    _cm: dict = field(default_factory=dict, repr=False, compare=False)

    # -- geometry --------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def cols(self) -> int:
        return self.numel // self.rows

    @property
    def pairs(self) -> int:
        return (self.cols + 1) // 2

    @property
    def n_blocks(self) -> int:
        return -(-self.rows // self.block_rows)

    def block_bounds(self, k: int) -> tuple[int, int]:
        r0 = k * self.block_rows
        return r0, min(self.rows, r0 + self.block_rows)

    def steps(self) -> np.ndarray:
        """float64 row steps (exact, also in float32)."""
        return lattice.steps_f64(self.base, self.rel)

    @property
    def nbytes(self) -> int:
        """Size of :meth:`to_bytes` (computed once: the tensor is immutable)."""
        n = self._cm.get("nbytes")
        if n is None:
            n = self._cm["nbytes"] = len(self.to_bytes())
        return n

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    # -- parts -------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        arrays = self.arrays()
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "name": self.name, "shape": list(self.shape),
            "dtype": self.dtype, "role": self.role, "lattice": self.lattice, "q": self.q, "base": self.base,
            "coder": sy.CODER, "block_rows": self.block_rows, "n_blocks": self.n_blocks,
            "model_m_lo": self.model_m.lo, "model_m_n": self.model_m.n,
            "model_b_lo": self.model_b.lo, "model_b_n": self.model_b.n,
            "n_escapes": int(self.esc_index.shape[0]), "payload_words": int(self.payload.shape[0]),
            "arrays_crc": arrays_crc(arrays),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {"rel": self.rel, "model_m": self.model_m.freqs, "model_b": self.model_b.freqs,
                "block_words": self.block_words, "block_crc": self.block_crc, "code_crc": self.code_crc,
                "esc_index": self.esc_index, "esc_value": self.esc_value, "payload": self.payload}

    def to_bytes(self) -> bytes:
        return pack_parts(self.meta(), self.arrays())

    @classmethod
    def from_bytes(cls, blob: bytes, *, file: str | None = None, name: str | None = None) -> "V2Tensor":
        """Parse and validate a byte form; ``name`` is what errors say before the header
        is read."""
        view = memoryview(blob)
        where = dict(file=file, tensor=name)
        if len(view) < len(MAGIC) + 8:
            raise TruncatedDataError(f"v2 tensor is {len(view)} bytes, shorter than its fixed header", **where)
        if bytes(view[:len(MAGIC)]) != MAGIC:
            raise UnknownFormatError(f"not a v2 tensor (magic {bytes(view[:len(MAGIC)])!r})", **where)
        hlen, hcrc = struct.unpack("<II", view[len(MAGIC):len(MAGIC) + 8])
        if hlen > MAX_HEADER:
            raise SizeLimitError(f"v2 tensor header of {hlen} bytes exceeds {MAX_HEADER}", **where)
        start = len(MAGIC) + 8
        if len(view) < start + hlen:
            raise TruncatedDataError(f"v2 tensor header truncated ({len(view) - start} of {hlen} bytes)", **where)
        raw = bytes(view[start:start + hlen])
        if zlib.crc32(raw) != hcrc:
            raise ChecksumError("v2 tensor header CRC mismatch", **where)
        try:
            meta = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"v2 tensor header is not JSON: {exc}", **where) from None
        if not isinstance(meta, dict):
            raise ManifestError("v2 tensor header is not a JSON object", **where)
        sizes = layout.header_sizes(meta, file, name)
        need = start + hlen + sum(n * np.dtype(dt).itemsize for (key, dt), n in zip(ARRAY_ORDER, sizes[:-1]))
        need += 4 * sizes[-1]
        tname = meta.get("name") if isinstance(meta.get("name"), str) else name
        if len(view) != need:
            raise TruncatedDataError(f"v2 tensor is {len(view)} bytes, its header declares {need}"
                                     f" ({'truncated' if len(view) < need else 'trailing bytes'})",
                                     file=file, tensor=tname)
        arrays = {}
        off = start + hlen
        for (key, dt), n in zip(ARRAY_ORDER, sizes[:-1]):
            nb = n * np.dtype(dt).itemsize
            arrays[key] = np.frombuffer(view[off:off + nb], dtype=dt).astype(np.dtype(dt).newbyteorder("="))
            off += nb
        arrays["payload"] = np.frombuffer(view[off:], dtype="<u4").astype(np.uint32)
        return cls.from_parts(meta, arrays, file=file)

    @classmethod
    def from_parts(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *,
                   file: str | None = None) -> "V2Tensor":
        """Build from :meth:`meta` and :meth:`arrays` (as stored), validating every field
        (:mod:`.layout`)."""
        sizes = layout.header_sizes(meta, file, None)
        name = meta["name"]
        where = dict(file=file, tensor=name)
        arr = layout.check_arrays(meta, arrays, sizes, where)
        base = meta["base"]
        rel = layout.check_scales(base, arr["rel"], where)
        model_m, model_b = layout.check_models(meta, arr, where)
        words = layout.check_block_words(arr["block_words"], sizes[-1], where)
        idx = arr["esc_index"].astype(np.int64)
        val = arr["esc_value"].astype(np.int32)
        shape = tuple(meta["shape"])
        layout.check_escapes(idx, val, shape, model_m, model_b, where)
        return cls(name=name, shape=shape, dtype=meta["dtype"], role=meta["role"], q=float(meta["q"]),
                   base=float(base), rel=rel, model_m=model_m, model_b=model_b,
                   block_rows=int(meta["block_rows"]), block_words=words,
                   block_crc=arr["block_crc"].astype(np.uint32), code_crc=arr["code_crc"].astype(np.uint32),
                   esc_index=idx, esc_value=val, payload=arr["payload"].astype(np.uint32),
                   lattice=meta["lattice"])

    # -- decoding ----------------------------------------------------------------------
    def _models(self):
        if "m" not in self._cm:
            self._cm["m"] = self.model_m.constriction_model()
            self._cm["b"] = self.model_b.constriction_model()
        return self._cm["m"], self._cm["b"]

    def decode_block(self, k: int, *, file: str | None = None) -> tuple[int, int, np.ndarray, np.ndarray]:
        """``(r0, r1, m, b)``: block ``k``'s rows and int64 coordinates, checked."""
        where = dict(file=file, tensor=self.name)
        if not 0 <= k < self.n_blocks:
            raise IndexError(k)
        offs = self._word_offsets()
        w = self.payload[offs[k]:offs[k + 1]]
        if zlib.crc32(np.ascontiguousarray(w, dtype="<u4").tobytes()) != int(self.block_crc[k]):
            raise ChecksumError(f"block {k}: CRC of its coded words mismatch", **where)
        r0, r1 = self.block_bounds(k)
        n = (r1 - r0) * self.pairs
        cm_m, cm_b = self._models()
        try:
            b_sym, m_sym = sy.decode_block(w, n, cm_b, cm_m)
        except sy.StreamError as exc:
            raise EntropyStreamError(f"block {k}: {exc}", **where) from None
        if sy.symbols_crc(b_sym, m_sym) != int(self.code_crc[k]):
            raise ChecksumError(f"block {k}: CRC of its decoded symbols mismatch (wrong symbol model or "
                                f"corrupted stream)", **where)
        m = m_sym.astype(np.int64) + self.model_m.lo
        b = b_sym.astype(np.int64) + self.model_b.lo
        esc_m = np.flatnonzero(m_sym == self.model_m.escape)
        esc_b = np.flatnonzero(b_sym == self.model_b.escape)
        p0 = r0 * self.pairs
        pos = np.sort(np.concatenate([2 * (p0 + esc_m), 2 * (p0 + esc_b) + 1]))
        e0, e1 = np.searchsorted(self.esc_index, [2 * p0, 2 * (p0 + n)])
        if pos.shape[0] != e1 - e0 or not np.array_equal(pos, self.esc_index[e0:e1]):
            raise EntropyStreamError(f"block {k}: its {pos.shape[0]} escape symbols disagree with the "
                                     f"{e1 - e0} listed escapes", **where)
        if pos.size:
            vals = self.esc_value[e0:e1].astype(np.int64)
            is_b = (pos & 1).astype(bool)
            local = pos // 2 - p0
            m[local[~is_b]] = vals[~is_b]
            b[local[is_b]] = vals[is_b]
        return r0, r1, m.reshape(r1 - r0, self.pairs), b.reshape(r1 - r0, self.pairs)

    def _word_offsets(self) -> np.ndarray:
        off = self._cm.get("offs")
        if off is None:
            off = self._cm["offs"] = np.concatenate([[0], np.cumsum(self.block_words.astype(np.int64))])
        return off

    def iter_blocks(self, *, file: str | None = None) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """Streaming decode: ``(r0, r1, m, b)`` block by block."""
        for k in range(self.n_blocks):
            yield self.decode_block(k, file=file)

    def coords(self, *, file: str | None = None, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """All coordinates ``(m, b)``, int64 ``[rows, pairs]``. ``workers > 1`` decodes
        blocks on a thread pool (blocks are independent)."""
        m = np.empty((self.rows, self.pairs), dtype=np.int64)
        b = np.empty_like(m)
        if workers > 1 and self.n_blocks > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as ex:
                parts = list(ex.map(lambda k: self.decode_block(k, file=file), range(self.n_blocks)))
        else:
            parts = self.iter_blocks(file=file)
        for r0, r1, mk, bk in parts:
            m[r0:r1] = mk
            b[r0:r1] = bk
        return m, b

    def decode(self, kernels: V2Kernels | str | None = None, *, file: str | None = None) -> np.ndarray:
        """The decoded weights as float32, shaped like the source (the caller casts to
        ``self.dtype``)."""
        k = kernels if isinstance(kernels, V2Kernels) else resolve(kernels or "auto")
        m, b = self.coords(file=file)
        return k.decode_rows(m, b, self.steps(), self.cols, np.float32).reshape(self.shape)

    def decode_to_device_form(self, *, file: str | None = None):
        """The fixed-width form HyperLinear holds (:class:`.device.DeviceForm`): never
        float weights."""
        from .device import DeviceForm

        m, b = self.coords(file=file)
        return DeviceForm.from_coords(self.name, m, b, self.base, self.rel, self.cols)
