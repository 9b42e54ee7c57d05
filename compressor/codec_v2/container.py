"""One codec-v2 tensor: encode, the validated container, decode.

:func:`encode_tensor` quantizes a float tensor on the scale-adaptive A2 lattice
(:mod:`.lattice`) and entropy-codes the coordinates in blocks (:mod:`.symbols`);
:class:`V2Tensor` holds the result. ``V2Tensor.to_bytes()`` / ``from_bytes()`` is
its self-contained byte form (phase 2 may instead keep :meth:`V2Tensor.meta` in a
manifest and :meth:`V2Tensor.arrays` in a shard: :meth:`V2Tensor.from_parts` takes
those and runs the same validation).

Byte form (little-endian)::

    b"BKV2TNSR" | u32 header length | u32 CRC-32 of the header | header (JSON) |
    rel f16[rows] | model_m u16[n_m] | model_b u16[n_b] |
    block_words u32[nb] | block_crc u32[nb] | code_crc u32[nb] |
    esc_index i64[ne] | esc_value i32[ne] | payload u32[sum(block_words)]

The header carries a CRC-32 of every array but the payload (whose blocks carry their
own), so a flipped bit anywhere raises. Validation runs before any allocation
sized by the file (caps on shape and counts, exact total length), then checks every
field: scales (finite, positive, normal), symbol models (frequencies >= 1 summing to
2**16, ranges), block table (one block per ``block_rows`` rows, words adding up to the
payload), escapes (sorted, in range, outside their model's range). Decoding checks
each block's word CRC, that its ANS stream ends exactly at its symbols, the CRC of
the decoded symbols, and that its escapes are exactly the listed ones. Every error
is a typed :class:`~compressor.errors.FormatError` naming the file and the tensor.
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

from ..dtypes import FLOAT_NAMES, NAME_BY_TORCH
from ..errors import (ChecksumError, EntropyStreamError, FormatError, IndexRangeError, ManifestError,
                      NonFiniteTensorError, ScaleError, SizeLimitError, SymbolModelError, TruncatedDataError,
                      UnknownFormatError)
from . import lattice
from . import symbols as sy
from .config import CodecV2Config
from .kernels import V2Kernels, resolve

log = logging.getLogger(__name__)

FORMAT_NAME = "birkhoff.v2-tensor"
FORMAT_VERSION = 1
MAGIC = b"BKV2TNSR"
MAX_ELEMENTS = 1 << 34
MAX_HEADER = 1 << 20
MAX_BLOCKS = 1 << 24
DTYPES = FLOAT_NAMES
ROLES = ("linear", "embedding")

_ARRAY_ORDER = (("rel", "<f2"), ("model_m", "<u2"), ("model_b", "<u2"), ("block_words", "<u4"),
                ("block_crc", "<u4"), ("code_crc", "<u4"), ("esc_index", "<i8"), ("esc_value", "<i4"))


def _crc_arrays(arrays: Mapping[str, np.ndarray]) -> int:
    crc = 0
    for key, dt in _ARRAY_ORDER:
        crc = zlib.crc32(np.ascontiguousarray(arrays[key], dtype=dt).tobytes(), crc)
    return crc


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
            "arrays_crc": _crc_arrays(arrays),
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
        sizes = _sizes(meta, file, name)
        need = start + hlen + sum(n * np.dtype(dt).itemsize for (key, dt), n in zip(_ARRAY_ORDER, sizes[:-1]))
        need += 4 * sizes[-1]
        tname = meta.get("name") if isinstance(meta.get("name"), str) else name
        if len(view) != need:
            raise TruncatedDataError(f"v2 tensor is {len(view)} bytes, its header declares {need}"
                                     f" ({'truncated' if len(view) < need else 'trailing bytes'})",
                                     file=file, tensor=tname)
        arrays = {}
        off = start + hlen
        for (key, dt), n in zip(_ARRAY_ORDER, sizes[:-1]):
            nb = n * np.dtype(dt).itemsize
            arrays[key] = np.frombuffer(view[off:off + nb], dtype=dt).astype(np.dtype(dt).newbyteorder("="))
            off += nb
        arrays["payload"] = np.frombuffer(view[off:], dtype="<u4").astype(np.uint32)
        return cls.from_parts(meta, arrays, file=file)

    @classmethod
    def from_parts(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *,
                   file: str | None = None) -> "V2Tensor":
        """Build from :meth:`meta` and :meth:`arrays` (as stored), validating every field."""
        sizes = _sizes(meta, file, None)
        name = meta["name"]
        where = dict(file=file, tensor=name)
        want = dict(zip([k for k, _ in _ARRAY_ORDER] + ["payload"], sizes))
        dts = dict(_ARRAY_ORDER, payload="<u4")
        arr = {}
        for key, n in want.items():
            a = arrays.get(key)
            if not isinstance(a, np.ndarray) or a.ndim != 1 or a.shape[0] != n:
                got = None if not isinstance(a, np.ndarray) else a.shape
                raise ManifestError(f"array {key!r} has shape {got}, the header declares ({n},)", **where)
            if a.dtype != np.dtype(dts[key]).newbyteorder("="):
                raise ManifestError(f"array {key!r} has dtype {a.dtype}, expected {np.dtype(dts[key])}", **where)
            arr[key] = a
        if _crc_arrays(arr) != meta["arrays_crc"]:
            raise ChecksumError("v2 tensor arrays CRC mismatch (scales, models, block table or escapes)", **where)
        # scales
        base = meta["base"]
        if not lattice.base_is_valid(base):
            raise ScaleError(f"step base {base!r} is not a positive normal float32 with 13 significant bits", **where)
        rel = arr["rel"].astype(np.float16)
        relf = rel.astype(np.float64)
        bad = ~np.isfinite(relf) | (relf < lattice.FP16_MIN)
        if bad.any():
            i = int(np.argmax(bad))
            raise ScaleError(f"row {i} scale {float(relf[i])!r} is not a positive finite float16", **where)
        if relf.size and not (base * float(relf.min()) >= lattice.FLOAT32_MIN_NORMAL
                              and base * float(relf.max()) <= lattice.FLOAT32_MAX):
            raise ScaleError("a row step leaves float32's normal range", **where)
        # models
        models = []
        for key in ("m", "b"):
            model = sy.SymbolModel(int(meta[f"model_{key}_lo"]), arr[f"model_{key}"].astype(np.uint16))
            try:
                model.validate()
            except sy.ModelError as exc:
                raise SymbolModelError(f"symbol model of the {key} coordinates: {exc}", **where) from None
            models.append(model)
        model_m, model_b = models
        # block table
        words = arr["block_words"].astype(np.uint32)
        if words.size and int(words.min()) < 1:
            raise FormatError(f"block {int(np.argmin(words))} has no words", **where)
        if int(words.astype(np.int64).sum()) != sizes[-1]:
            raise FormatError(f"block words add up to {int(words.astype(np.int64).sum())}, "
                              f"the payload has {sizes[-1]}", **where)
        # escapes
        idx = arr["esc_index"].astype(np.int64)
        val = arr["esc_value"].astype(np.int32)
        shape = tuple(meta["shape"])
        rows = shape[0] if len(shape) > 1 else 1
        cols = math.prod(shape) // rows
        n_coords = 2 * rows * ((cols + 1) // 2)
        if idx.size:
            if int(idx.min()) < 0 or int(idx.max()) >= n_coords:
                raise IndexRangeError(f"escape position outside [0, {n_coords})", **where)
            if idx.size > 1 and not bool((np.diff(idx) > 0).all()):
                raise IndexRangeError("escape positions are not strictly increasing", **where)
            comp_b = (idx & 1).astype(bool)
            lo = np.where(comp_b, model_b.lo, model_m.lo)
            hi = np.where(comp_b, model_b.hi, model_m.hi)
            inside = (val >= lo) & (val <= hi)
            if inside.any():
                k = int(np.argmax(inside))
                raise IndexRangeError(f"escape {k} holds {int(val[k])}, inside its model's range "
                                      f"[{int(lo[k])}, {int(hi[k])}]: it must be coded, not escaped", **where)
            if int(np.abs(val.astype(np.int64)).max()) > lattice.MAX_COORD:
                raise IndexRangeError(f"escape value beyond +-{lattice.MAX_COORD}", **where)
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


def pack_parts(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    """The byte form of a header and its arrays (no validation: :meth:`V2Tensor.from_bytes`
    validates on the way in)."""
    header = json.dumps(dict(meta), sort_keys=True, separators=(",", ":")).encode()
    parts = [MAGIC, struct.pack("<II", len(header), zlib.crc32(header)), header]
    for key, dt in _ARRAY_ORDER:
        parts.append(np.ascontiguousarray(arrays[key], dtype=dt).tobytes())
    parts.append(np.ascontiguousarray(arrays["payload"], dtype="<u4").tobytes())
    return b"".join(parts)


def arrays_crc(arrays: Mapping[str, np.ndarray]) -> int:
    """The header's ``arrays_crc`` of these arrays (every array but the payload)."""
    return _crc_arrays(arrays)


def _sizes(meta: Mapping[str, Any], file, name) -> tuple[int, ...]:
    """Check the header's fields and caps; the array lengths it declares, in
    ``_ARRAY_ORDER`` then the payload."""
    tname = meta.get("name") if isinstance(meta.get("name"), str) else name
    where = dict(file=file, tensor=tname)
    if meta.get("format") != FORMAT_NAME:
        raise UnknownFormatError(f"unknown tensor format {meta.get('format')!r}", **where)
    if meta.get("version") != FORMAT_VERSION:
        raise UnknownFormatError(f"v2 tensor version {meta.get('version')!r}; this build reads {FORMAT_VERSION}",
                                 **where)
    ints = ("block_rows", "n_blocks", "model_m_lo", "model_m_n", "model_b_lo", "model_b_n", "n_escapes",
            "payload_words", "arrays_crc")
    for key in ints:
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool):
            raise ManifestError(f"header field {key!r} must be an integer, got {meta.get(key)!r}", **where)
    for key in ("q", "base"):
        if not isinstance(meta.get(key), float):
            raise ManifestError(f"header field {key!r} must be a number, got {meta.get(key)!r}", **where)
    if not isinstance(meta.get("name"), str):
        raise ManifestError("header field 'name' must be a string", **where)
    if meta.get("dtype") not in DTYPES:
        raise ManifestError(f"unsupported dtype {meta.get('dtype')!r}", **where)
    if meta.get("role") not in ROLES:
        raise ManifestError(f"unknown role {meta.get('role')!r}", **where)
    if meta.get("lattice") != "a2":
        raise UnknownFormatError(f"unknown lattice {meta.get('lattice')!r}", **where)
    if meta.get("coder") != sy.CODER:
        raise UnknownFormatError(f"unknown entropy coder {meta.get('coder')!r}; this build reads {sy.CODER}",
                                 **where)
    shape = meta.get("shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise ManifestError(f"shape must be a list of 1..8 positive integers, got {shape!r}", **where)
    numel = math.prod(shape)
    if numel > MAX_ELEMENTS:
        raise SizeLimitError(f"shape {shape} has {numel} elements, over the cap {MAX_ELEMENTS}", **where)
    if numel < 2:
        raise ManifestError(f"shape {shape} has fewer than 2 elements", **where)
    rows = shape[0] if len(shape) > 1 else 1
    cols = numel // rows
    pairs = (cols + 1) // 2
    br = meta["block_rows"]
    if not 1 <= br <= rows:
        raise ManifestError(f"block_rows {br} outside [1, {rows}]", **where)
    nb = -(-rows // br)
    if meta["n_blocks"] != nb:
        raise ManifestError(f"n_blocks {meta['n_blocks']} but {rows} rows in blocks of {br} make {nb}", **where)
    if nb > MAX_BLOCKS:
        raise SizeLimitError(f"{nb} blocks exceed the cap {MAX_BLOCKS}", **where)
    for key in ("m", "b"):
        n = meta[f"model_{key}_n"]
        if not 2 <= n <= sy.MAX_MODEL_SYMBOLS:
            raise SymbolModelError(f"symbol model of the {key} coordinates has {n} entries, expected "
                                   f"2..{sy.MAX_MODEL_SYMBOLS}", **where)
    ne = meta["n_escapes"]
    if not 0 <= ne <= 2 * rows * pairs:
        raise SizeLimitError(f"{ne} escapes for {2 * rows * pairs} coordinates", **where)
    words = meta["payload_words"]
    # an ANS word carries at most 32 bits and a symbol costs at least 2**-16... of a bit:
    # cap by 2 symbols per pair at 16 bits each, plus a flush per block
    if not 0 <= words <= 2 * rows * pairs + 4 * nb:
        raise SizeLimitError(f"payload of {words} words exceeds the cap for {rows * pairs} pairs", **where)
    return (rows, meta["model_m_n"], meta["model_b_n"], nb, nb, nb, ne, ne, words)


# -- encoding ------------------------------------------------------------------------------

def _as_numpy(w) -> tuple[np.ndarray, str]:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(w, torch.Tensor):
        dt = NAME_BY_TORCH.get(w.dtype)
        if dt not in FLOAT_NAMES:
            raise TypeError(f"unsupported dtype {w.dtype}")
        t = w.detach().to("cpu")
        return (t.float() if dt in ("float16", "bfloat16") else t).numpy(), dt
    a = np.asarray(w)
    if a.dtype == np.float16:
        return a.astype(np.float32), "float16"
    if a.dtype not in (np.float32, np.float64):
        raise TypeError(f"unsupported dtype {a.dtype}")
    return a, str(a.dtype)


def role_of(name: str, cfg: CodecV2Config) -> str:
    return "embedding" if cfg.is_embedding(name) else "linear"


def step_for(role: str, cfg: CodecV2Config) -> float:
    return cfg.rel_step * (cfg.embedding_factor if role == "embedding" else 1.0)


def encode_tensor(w, cfg: CodecV2Config | None = None, *, name: str = "tensor", role: str | None = None,
                  q: float | None = None, kernels: V2Kernels | str = "auto") -> V2Tensor:
    """Encode one float tensor (NumPy or torch; never modified). ``role`` defaults to
    the config's embedding patterns; ``q`` (relative step) defaults to the config's
    knob for that role (:func:`compressor.codec_v2.rate.plan_tensors` passes its own).
    Raises NonFiniteTensorError for NaN/Inf, ValueError when the tensor cannot be
    coded (fewer than 2 elements, a dynamic range beyond the caps): keep it raw."""
    cfg = cfg or CodecV2Config()
    k = kernels if isinstance(kernels, V2Kernels) else resolve(kernels)
    a, dt = _as_numpy(w)
    if a.ndim == 0 or a.size < 2:
        raise ValueError(f"{name}: v2 codes tensors of at least 2 elements, got shape {a.shape}")
    if a.size > MAX_ELEMENTS:
        raise ValueError(f"{name}: {a.size} elements exceed the cap {MAX_ELEMENTS}")
    if not np.isfinite(a).all():
        raise NonFiniteTensorError("tensor holds NaN or Inf", tensor=name)
    role = role or role_of(name, cfg)
    if role not in ROLES:
        raise ValueError(f"{name}: unknown role {role!r}")
    q = float(q if q is not None else step_for(role, cfg))
    rows2d = lattice.as_rows(a)
    rows, cols = rows2d.shape
    base, rel = lattice.row_steps(k.row_sumsq(rows2d), cols, q)
    m, b = k.encode_rows(rows2d, lattice.steps_f64(base, rel))
    return _entropy_code(name, a.shape, dt, role, q, base, rel, m, b, cfg.block_pairs)


def _entropy_code(name, shape, dt, role, q, base, rel, m, b, block_pairs) -> V2Tensor:
    rows, pairs = m.shape
    model_m = sy.build_model(m)
    model_b = sy.build_model(b)
    m_sym, m_esc = sy.to_symbols(m.ravel(), model_m)
    b_sym, b_esc = sy.to_symbols(b.ravel(), model_b)
    esc_pos = np.sort(np.concatenate([2 * np.flatnonzero(m_esc), 2 * np.flatnonzero(b_esc) + 1]))
    comp_b = (esc_pos & 1).astype(bool)
    src = np.where(comp_b, b.ravel()[esc_pos // 2], m.ravel()[esc_pos // 2]) if esc_pos.size else \
        np.zeros(0, dtype=np.int64)
    block_rows = max(1, min(rows, block_pairs // max(pairs, 1)))
    nb = -(-rows // block_rows)
    cm_m, cm_b = model_m.constriction_model(), model_b.constriction_model()
    words, wcrc, ccrc, chunks = [], [], [], []
    for kb in range(nb):
        p0, p1 = kb * block_rows * pairs, min(rows, (kb + 1) * block_rows) * pairs
        bs, ms = b_sym[p0:p1], m_sym[p0:p1]
        enc = sy.encode_block(bs, ms, cm_b, cm_m)
        chunks.append(enc)
        words.append(enc.shape[0])
        wcrc.append(zlib.crc32(np.ascontiguousarray(enc, dtype="<u4").tobytes()))
        ccrc.append(sy.symbols_crc(bs, ms))
    t = V2Tensor(name=name, shape=tuple(int(d) for d in shape), dtype=dt, role=role, q=q, base=float(base),
                 rel=rel, model_m=model_m, model_b=model_b, block_rows=block_rows,
                 block_words=np.array(words, dtype=np.uint32), block_crc=np.array(wcrc, dtype=np.uint32),
                 code_crc=np.array(ccrc, dtype=np.uint32), esc_index=esc_pos.astype(np.int64),
                 esc_value=src.astype(np.int32), payload=np.concatenate(chunks).astype(np.uint32))
    t._cm.update(m=cm_m, b=cm_b)
    return t
