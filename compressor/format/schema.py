"""The format's constants and schema tables: names and versions, load limits, dtype
tables, field sets, and the small checks and byte views every part shares."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Iterable

import numpy as np
import torch

from .. import quant_primitives as qp
from ..dtypes import DTYPES, NAME_BY_TORCH
from ..errors import ConfigError, SizeLimitError

log = logging.getLogger(__name__)

FORMAT_NAME = "birkhoff.hyper-compressed"
FORMAT_VERSION = 1  # the paper's codec (codec_version 1): what this build has always written
FORMAT_VERSION_V2 = 2  # codec v2 (codec_version 2): entropy-coded A2 lattice, compressor.codec_v2
#: format_version -> the codec_version its manifests carry (one codec per checkpoint)
CODEC_OF_FORMAT = {FORMAT_VERSION: 1, FORMAT_VERSION_V2: 2}
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".safetensors"

_GiB = 1 << 30
_MiB = 1 << 20
_IO_CHUNK = 16 * _MiB


@dataclass(frozen=True)
class LoadLimits:
    """Caps a loader enforces on declared sizes before allocating anything."""

    max_manifest_bytes: int = 64 * _MiB
    max_header_bytes: int = 100 * _MiB  # safetensors' own cap is 100 MB
    max_tensor_bytes: int = 64 * _GiB  # stored and decoded size of one tensor
    max_total_bytes: int = 256 * _GiB  # all shards, extra files, and all decoded tensors
    max_classes: int = 64  # K
    max_points_U: int = 2**24
    # U*(K+1): entries of a tensor's float64 decode tables (two of them). U and K
    # are each capped above, but the table costs their product
    max_decode_table: int = 2**22
    max_ndim: int = 8
    max_tensors: int = 1_000_000
    # JSON containers and elements of the manifest, counted before parsing: a
    # parsed empty list costs ~60 bytes for its 3 bytes of text
    max_manifest_nodes: int = 2_000_000

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise ConfigError(f"LoadLimits.{f.name} must be an integer >= 0, got {v!r}")



# writing checks structure, not the caps: those belong to whoever loads
_WRITE_LIMITS = LoadLimits(max_manifest_bytes=1 << 62, max_header_bytes=1 << 62, max_tensor_bytes=1 << 62,
                           max_total_bytes=1 << 62, max_classes=1 << 30, max_points_U=1 << 32,
                           max_decode_table=1 << 62, max_ndim=1 << 10, max_tensors=1 << 62,
                           max_manifest_nodes=1 << 62)

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TOP_REQUIRED = ("format", "format_version", "producer", "codec_version", "config", "source",
                 "extra_files", "shards", "tensors")
# per tensor a safetensors header needs its (JSON-escaped) name and about 100
# bytes of dtype/shape/offsets; anything far above is not a header we wrote
_HEADER_BYTES_PER_TENSOR = 512
_HEADER_BYTES_FIXED = 4096
_RAW_KEYS = frozenset({"raw", "raw_reason", "shape", "dtype", "shard", "sha256"})
_COMPRESSED_KEYS = frozenset({
    "raw", "shape", "dtype", "layout", "pad", "n_points", "centroid", "radius", "box_size",
    "U", "K", "bits", "mae", "abs_error_sum", "shard", "sha256",
})
_V2_KEYS = frozenset({
    "raw", "codec", "shape", "dtype", "role", "q", "stored_bytes", "bits_per_weight", "n_escapes",
    "abs_error_sum", "mae", "shard", "sha256",
})
_SAFETENSORS_METADATA = "__metadata__"


# -- small helpers -------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite_num(v: Any) -> bool:
    """A JSON number that is a finite float64 (a 400-digit integer is not: it has
    no float value and would raise later, where it is used)."""
    if not _is_num(v):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def is_plain_name(name: Any) -> bool:
    """A file name that stays inside the checkpoint directory (no separators, no ``..``)."""
    return isinstance(name, str) and bool(_PLAIN_NAME.match(name)) and ".." not in name


class _DuplicateKeys:
    """``object_pairs_hook`` that remembers every duplicated key and the object holding it."""

    def __init__(self) -> None:
        self.found: list[tuple[str, dict]] = []

    def __call__(self, pairs):
        d: dict = {}
        for k, v in pairs:
            if k in d:
                self.found.append((k, d))
            d[k] = v
        return d


def json_nodes(raw: bytes) -> int:
    """An upper bound on the containers and elements JSON text parses into
    (brackets and commas inside strings count too): what parsing will allocate
    is bounded by this, so it is checked before parsing."""
    return raw.count(b"[") + raw.count(b"{") + raw.count(b",") + 1


def _parse_json(raw: bytes, path: str, error: type, max_nodes: int | None = None):
    if max_nodes is not None:
        nodes = json_nodes(raw)
        if nodes > max_nodes:
            raise SizeLimitError(f"JSON text of {len(raw)} bytes holds up to {nodes} values, above the cap of "
                                 f"{max_nodes}", file=path)
    dups = _DuplicateKeys()
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=dups)
    except UnicodeDecodeError as exc:
        raise error(f"not UTF-8 text: {exc}", file=path) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so is a 5000-digit int
        raise error(f"not valid JSON: {exc}", file=path) from None
    return obj, dups.found


# -- checksums and writing -------------------------------------------------------------

def _stored_array(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """The stored bytes of a tensor as a C-contiguous little-endian numpy array."""
    if isinstance(t, torch.Tensor):
        t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(DTYPES["bfloat16"].int_view)
        a = t.numpy()
    else:
        a = np.asarray(t)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a)


def tensor_sha256(t: torch.Tensor | np.ndarray) -> str:
    """sha256 of a tensor's stored bytes (C order, little endian; bf16 via its 16-bit view)."""
    a = _stored_array(t)
    h = hashlib.sha256()
    if a.size:
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _as_torch(name: str, t: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"tensor {name!r}: expected a torch.Tensor or numpy array, got {type(t).__name__}")
    if t.dtype not in NAME_BY_TORCH:
        raise ConfigError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in this format")
    # a private contiguous copy: safetensors refuses tensors that share storage
    return t.detach().to("cpu").contiguous().clone()


def stored_tensor(entry, pack_bits=qp.pack_bits) -> torch.Tensor:
    """The form an entry takes in a shard: packed uint8 indices, or the raw tensor.
    ``pack_bits`` lets a caller use a faster backend's packer (same bytes)."""
    if entry.raw:
        return entry.tensor.detach().to("cpu").contiguous()
    if hasattr(entry, "stored"):  # a codec-v2 entry: its self-validating byte form
        return entry.stored()
    packed = pack_bits(np.asarray(entry.theta), entry.bits)
    return torch.from_numpy(packed)
