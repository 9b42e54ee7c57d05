"""The codec-v2 tensor's stored layout and its validation, field by field.

Byte form (little-endian)::

    b"BKV2TNSR" | u32 header length | u32 CRC-32 of the header | header (JSON) |
    rel f16[rows] | model_m u16[n_m] | model_b u16[n_b] |
    block_words u32[nb] | block_crc u32[nb] | code_crc u32[nb] |
    esc_index i64[ne] | esc_value i32[ne] | payload u32[sum(block_words)]

The header carries a CRC-32 of every array but the payload (whose blocks carry their
own), so a flipped bit anywhere raises. :func:`header_sizes` checks the header before
any allocation sized by the file (caps on shape and counts); the ``check_*`` functions
then check every field: scales (finite, positive, normal), symbol models (frequencies
>= 1 summing to 2**16, ranges), block table (one block per ``block_rows`` rows, words
adding up to the payload), escapes (sorted, in range, outside their model's range).
Every error is a typed :class:`~compressor.errors.FormatError` naming the file and the
tensor.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any, Mapping

import numpy as np

from ..dtypes import FLOAT_NAMES
from ..errors import (ChecksumError, FormatError, IndexRangeError, ManifestError, ScaleError, SizeLimitError,
                      SymbolModelError, UnknownFormatError)
from . import lattice
from . import symbols as sy

FORMAT_NAME = "birkhoff.v2-tensor"
FORMAT_VERSION = 1
MAGIC = b"BKV2TNSR"
MAX_ELEMENTS = 1 << 34
MAX_HEADER = 1 << 20
MAX_BLOCKS = 1 << 24
DTYPES = FLOAT_NAMES
ROLES = ("linear", "embedding")

ARRAY_ORDER = (("rel", "<f2"), ("model_m", "<u2"), ("model_b", "<u2"), ("block_words", "<u4"),
               ("block_crc", "<u4"), ("code_crc", "<u4"), ("esc_index", "<i8"), ("esc_value", "<i4"))
_INT_FIELDS = ("block_rows", "n_blocks", "model_m_lo", "model_m_n", "model_b_lo", "model_b_n", "n_escapes",
               "payload_words", "arrays_crc")


def arrays_crc(arrays: Mapping[str, np.ndarray]) -> int:
    """The header's ``arrays_crc`` of these arrays (every array but the payload)."""
    crc = 0
    for key, dt in ARRAY_ORDER:
        crc = zlib.crc32(np.ascontiguousarray(arrays[key], dtype=dt).tobytes(), crc)
    return crc


def pack_parts(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    """The byte form of a header and its arrays (no validation: :meth:`V2Tensor.from_bytes`
    validates on the way in)."""
    header = json.dumps(dict(meta), sort_keys=True, separators=(",", ":")).encode()
    parts = [MAGIC, struct.pack("<II", len(header), zlib.crc32(header)), header]
    for key, dt in ARRAY_ORDER:
        parts.append(np.ascontiguousarray(arrays[key], dtype=dt).tobytes())
    parts.append(np.ascontiguousarray(arrays["payload"], dtype="<u4").tobytes())
    return b"".join(parts)


# -- the header ----------------------------------------------------------------------------

def _check_header_fields(meta: Mapping[str, Any], where: dict) -> None:
    """Format, version, field types, dtype, role, lattice and coder."""
    if meta.get("format") != FORMAT_NAME:
        raise UnknownFormatError(f"unknown tensor format {meta.get('format')!r}", **where)
    if meta.get("version") != FORMAT_VERSION:
        raise UnknownFormatError(f"v2 tensor version {meta.get('version')!r}; this build reads {FORMAT_VERSION}",
                                 **where)
    for key in _INT_FIELDS:
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


def _checked_shape(meta: Mapping[str, Any], where: dict) -> tuple[int, int]:
    """``(rows, pairs)`` of the header's shape, within the caps."""
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
    return rows, (numel // rows + 1) // 2


def header_sizes(meta: Mapping[str, Any], file, name) -> tuple[int, ...]:
    """Check the header's fields and caps; the array lengths it declares, in
    :data:`ARRAY_ORDER` then the payload."""
    tname = meta.get("name") if isinstance(meta.get("name"), str) else name
    where = dict(file=file, tensor=tname)
    _check_header_fields(meta, where)
    rows, pairs = _checked_shape(meta, where)
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


# -- the arrays ----------------------------------------------------------------------------

def check_arrays(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], sizes: tuple[int, ...],
                 where: dict) -> dict[str, np.ndarray]:
    """Each array as the header declares it (length, dtype), and their CRC."""
    want = dict(zip([k for k, _ in ARRAY_ORDER] + ["payload"], sizes))
    dts = dict(ARRAY_ORDER, payload="<u4")
    arr = {}
    for key, n in want.items():
        a = arrays.get(key)
        if not isinstance(a, np.ndarray) or a.ndim != 1 or a.shape[0] != n:
            got = None if not isinstance(a, np.ndarray) else a.shape
            raise ManifestError(f"array {key!r} has shape {got}, the header declares ({n},)", **where)
        if a.dtype != np.dtype(dts[key]).newbyteorder("="):
            raise ManifestError(f"array {key!r} has dtype {a.dtype}, expected {np.dtype(dts[key])}", **where)
        arr[key] = a
    if arrays_crc(arr) != meta["arrays_crc"]:
        raise ChecksumError("v2 tensor arrays CRC mismatch (scales, models, block table or escapes)", **where)
    return arr


def check_scales(base, rel: np.ndarray, where: dict) -> np.ndarray:
    """The per-tensor base and the float16 row scales; returns the scales."""
    if not lattice.base_is_valid(base):
        raise ScaleError(f"step base {base!r} is not a positive normal float32 with 13 significant bits", **where)
    rel = rel.astype(np.float16)
    relf = rel.astype(np.float64)
    bad = ~np.isfinite(relf) | (relf < lattice.FP16_MIN)
    if bad.any():
        i = int(np.argmax(bad))
        raise ScaleError(f"row {i} scale {float(relf[i])!r} is not a positive finite float16", **where)
    if relf.size and not (base * float(relf.min()) >= lattice.FLOAT32_MIN_NORMAL
                          and base * float(relf.max()) <= lattice.FLOAT32_MAX):
        raise ScaleError("a row step leaves float32's normal range", **where)
    return rel


def check_models(meta: Mapping[str, Any], arr: Mapping[str, np.ndarray], where: dict):
    """The symbol models of the m and b coordinates, validated."""
    models = []
    for key in ("m", "b"):
        model = sy.SymbolModel(int(meta[f"model_{key}_lo"]), arr[f"model_{key}"].astype(np.uint16))
        try:
            model.validate()
        except sy.ModelError as exc:
            raise SymbolModelError(f"symbol model of the {key} coordinates: {exc}", **where) from None
        models.append(model)
    return models[0], models[1]


def check_block_words(words: np.ndarray, payload_words: int, where: dict) -> np.ndarray:
    words = words.astype(np.uint32)
    if words.size and int(words.min()) < 1:
        raise FormatError(f"block {int(np.argmin(words))} has no words", **where)
    if int(words.astype(np.int64).sum()) != payload_words:
        raise FormatError(f"block words add up to {int(words.astype(np.int64).sum())}, "
                          f"the payload has {payload_words}", **where)
    return words


def check_escapes(idx: np.ndarray, val: np.ndarray, shape: tuple[int, ...], model_m, model_b, where: dict) -> None:
    """Escape positions sorted and in range; values outside their model's range."""
    rows = shape[0] if len(shape) > 1 else 1
    cols = math.prod(shape) // rows
    n_coords = 2 * rows * ((cols + 1) // 2)
    if not idx.size:
        return
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
