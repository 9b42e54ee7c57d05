"""The on-disk format of a Hyper-Compressed checkpoint, and its validating loader.

A checkpoint is a directory::

    manifest.json            # written last: its presence commits the checkpoint
    shard-00000.safetensors  # tensors, keyed by their full name
    config.json ...          # copied architecture files ("extra_files")

The manifest (canonical JSON, ``sort_keys``, ``indent=1``)::

    {"format": "birkhoff.hyper-compressed", "format_version": 1,
     "producer": {"name": ..., "version": ...}, "codec_version": 1,
     "config": HyperCompressionConfig.to_dict(), "source": {...free-form...},
     "extra_files": {name: {"bytes", "sha256"}},
     "shards": {name: {"bytes", "sha256" (whole file)}},
     "tensors": {name: CompressedTensor.meta() | RawTensor.meta() + {"shard", "sha256"}}}

In a shard a compressed tensor is a 1-D uint8 array of its bit-packed indices
(``ceil(n_points * bits / 8)`` bytes); a raw tensor is stored as itself. A
tensor's sha256 is over its stored bytes (C order, little endian).

Loading trusts nothing: :func:`read_manifest` checks every field and every size
against :class:`LoadLimits` before anything is allocated, and
:func:`load_stored_tensors` parses each safetensors header itself and compares it
with the manifest before reading a byte of data. Every error is a
:class:`~compressor.errors.FormatError` subclass naming the file and the tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import stat
import struct
import uuid
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np
import torch

from . import quant_primitives as qp
from .codec import CODEC_VERSION, DTYPE_NAMES, TORCH_TO_NAME, CompressedTensor, RawTensor
from .config import HyperCompressionConfig
from .errors import (
    ChecksumError,
    ConfigError,
    DTypeMismatchError,
    DuplicateTensorError,
    IndexRangeError,
    ManifestError,
    MissingFileError,
    MissingTensorError,
    PackedLengthError,
    ShardHeaderError,
    SizeLimitError,
    SourceError,
    TruncatedDataError,
    UnexpectedTensorError,
    UnknownFormatError,
)

log = logging.getLogger(__name__)

FORMAT_NAME = "birkhoff.hyper-compressed"
FORMAT_VERSION = 1
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


# manifest dtype name -> (safetensors code, item size, little-endian numpy dtype of the stored bytes)
_STORED = {
    "float32": ("F32", 4, "<f4"),
    "float16": ("F16", 2, "<f2"),
    "bfloat16": ("BF16", 2, "<u2"),  # numpy has no bf16: carried as uint16, viewed in torch
    "float64": ("F64", 8, "<f8"),
    "int8": ("I8", 1, "i1"),
    "int16": ("I16", 2, "<i2"),
    "int32": ("I32", 4, "<i4"),
    "int64": ("I64", 8, "<i8"),
    "uint8": ("U8", 1, "u1"),
    "bool": ("BOOL", 1, "u1"),
}
assert set(_STORED) == set(DTYPE_NAMES)
_FLOAT_NAMES = frozenset({"float32", "float16", "bfloat16", "float64"})
# every dtype the safetensors spec defines, with its item size (header sanity only)
_ST_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}

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


def _fsync_dir(directory: str) -> None:
    # the rename itself must reach the disk for the write to be durable
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    from .destination import _umask as umask

    return umask()


@contextlib.contextmanager
def _atomic_file(directory: str, name: str):
    """Yield a temporary path in ``directory``; when the body returns (having
    fsynced what it wrote) the file is renamed onto ``name`` and the directory
    synced, and when it raises the temporary file is removed: readers only ever
    see a whole file."""
    tmp = _tmp_path(directory, name)
    try:
        yield tmp
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def _tmp_path(directory: str, name: str) -> str:
    return os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def _hash_stream(src, dst=None) -> tuple[int, str]:
    """Bytes and sha256 of what is left in ``src``, copied to ``dst`` on the way
    when one is given."""
    h = hashlib.sha256()
    n = 0
    while True:
        chunk = src.read(_IO_CHUNK)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return n, h.hexdigest()


def _hash_file(path: str) -> tuple[int, str]:
    with open(path, "rb") as f:
        return _hash_stream(f)


def _open_regular(path: str, missing_error: type, what: str, tensor: str | None = None):
    """Open ``path`` for reading, refusing anything that is not a regular file.
    O_NONBLOCK keeps a FIFO planted under a shard's name from hanging the open."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise missing_error(f"{what} is missing", file=path, tensor=tensor) from None
    except OSError as exc:
        raise missing_error(f"{what} cannot be opened: {exc}", file=path, tensor=tensor) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise missing_error(f"{what} is not a regular file", file=path, tensor=tensor)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def _read_exact(f, n: int, path: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TruncatedDataError(f"file ends inside the {what} ({len(data)} of {n} bytes)", file=path)
    return data


def _readinto_exact(f, buf: np.ndarray, path: str, tensor: str) -> None:
    mv = memoryview(buf).cast("B")
    got = 0
    while got < len(mv):
        k = f.readinto(mv[got:])
        if not k:
            raise TruncatedDataError(f"file ends inside tensor data ({got} of {len(mv)} bytes)",
                                     file=path, tensor=tensor)
        got += k


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
            t = t.view(torch.int16)
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
    if t.dtype not in TORCH_TO_NAME:
        raise ConfigError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in this format")
    # a private contiguous copy: safetensors refuses tensors that share storage
    return t.detach().to("cpu").contiguous().clone()


def write_shard(directory, filename: str, tensors: Mapping[str, torch.Tensor]) -> dict:
    """Write one safetensors shard atomically; returns ``{"file", "bytes", "sha256"}``.

    The file is written under a temporary name in ``directory``, hashed while it is
    written (never read back), fsynced and only then renamed, so a reader never sees
    a partial shard.
    """
    directory = os.fspath(directory)
    if not is_plain_name(filename) or not filename.endswith(SHARD_SUFFIX):
        raise ConfigError(f"shard name {filename!r} must be a plain file name ending in {SHARD_SUFFIX}")
    if _SAFETENSORS_METADATA in tensors:
        raise ConfigError(f"{_SAFETENSORS_METADATA!r} is reserved by safetensors and cannot name a tensor")
    data = {name: _as_torch(name, t) for name, t in tensors.items()}
    with _atomic_file(directory, filename) as tmp:
        with open(tmp, "wb") as f:
            nbytes, digest = _write_safetensors(f, data, {"format": FORMAT_NAME})
            f.flush()
            os.fsync(f.fileno())
        # shards are shared data like the manifest
        os.chmod(tmp, 0o666 & ~_umask())
    return {"file": filename, "bytes": nbytes, "sha256": digest}


def _write_safetensors(f, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> tuple[int, str]:
    """Stream ``tensors`` to ``f`` in the safetensors layout (the order and header the
    ``safetensors`` package writes: larger items first, then by name; the header padded
    with spaces to 8 bytes), hashing every byte on its way out. Returns (bytes, sha256)."""
    arrays = {n: _stored_array(t) for n, t in tensors.items()}
    codes = {n: _STORED[TORCH_TO_NAME[t.dtype]][0] for n, t in tensors.items()}
    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    header: dict[str, Any] = {_SAFETENSORS_METADATA: dict(metadata)}
    pos = 0
    for n in order:
        header[n] = {"dtype": codes[n], "shape": list(tensors[n].shape), "data_offsets": [pos, pos + arrays[n].nbytes]}
        pos += arrays[n].nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    h = hashlib.sha256()
    total = 0
    for chunk in _safetensors_chunks(struct.pack("<Q", len(raw)) + raw, (arrays[n] for n in order)):
        h.update(chunk)
        f.write(chunk)
        total += len(chunk)
    return total, h.hexdigest()


def _safetensors_chunks(head: bytes, arrays):
    yield head
    for a in arrays:
        flat = memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")
        for i in range(0, len(flat), _IO_CHUNK):
            yield flat[i:i + _IO_CHUNK]


def copy_extra_file(src_path, directory, name: str) -> dict:
    """Copy an architecture file (``config.json``...) into the checkpoint atomically;
    returns ``{"bytes", "sha256"}`` for the manifest's ``extra_files``."""
    directory = os.fspath(directory)
    src_path = os.fspath(src_path)
    if not is_plain_name(name) or name == MANIFEST_NAME or name.endswith(SHARD_SUFFIX):
        raise ConfigError(f"extra file name {name!r} must be a plain file name, not the manifest or a shard")
    src, _ = _open_regular(src_path, SourceError, "source file")
    with _atomic_file(directory, name) as tmp, src, open(tmp, "wb") as dst:
        n, digest = _hash_stream(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
    return {"bytes": n, "sha256": digest}


def write_extra_bytes(content: bytes, directory, name: str) -> dict:
    """Write an architecture file given as bytes (a module's ``config.json``) into
    the checkpoint atomically; returns ``{"bytes", "sha256"}``."""
    directory = os.fspath(directory)
    if not is_plain_name(name) or name == MANIFEST_NAME or name.endswith(SHARD_SUFFIX):
        raise ConfigError(f"extra file name {name!r} must be a plain file name, not the manifest or a shard")
    with _atomic_file(directory, name) as tmp, open(tmp, "wb") as dst:
        dst.write(content)
        dst.flush()
        os.fsync(dst.fileno())
    return {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int, prefix: str = "shard") -> dict[str, list[str]]:
    """Assign tensors to shards in the given order, opening a new shard whenever the
    next tensor would push the current one above ``max_shard_bytes`` of data
    (the safetensors header comes on top). Deterministic: same input, same plan."""
    if not _is_int(max_shard_bytes) or max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    if not is_plain_name(f"{prefix}-00000{SHARD_SUFFIX}"):
        raise ConfigError(f"shard prefix {prefix!r} must make plain file names")
    plan: dict[str, list[str]] = {}
    current: list[str] = []
    used = 0
    for name, size in sizes.items():
        if not _is_int(size) or size < 0:
            raise ConfigError(f"tensor {name!r}: size must be an integer >= 0, got {size!r}")
        if size > max_shard_bytes:
            raise ConfigError(
                f"tensor {name!r} holds {size} bytes, more than max_shard_bytes={max_shard_bytes}; "
                "raise the shard size"
            )
        if current and used + size > max_shard_bytes:
            plan[f"{prefix}-{len(plan):05d}{SHARD_SUFFIX}"] = current
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        plan[f"{prefix}-{len(plan):05d}{SHARD_SUFFIX}"] = current
    return plan


def stored_tensor(entry: CompressedTensor | RawTensor, pack_bits=qp.pack_bits) -> torch.Tensor:
    """The form an entry takes in a shard: packed uint8 indices, or the raw tensor.
    ``pack_bits`` lets a caller use a faster backend's packer (same bytes)."""
    if entry.raw:
        return entry.tensor.detach().to("cpu").contiguous()
    packed = pack_bits(np.asarray(entry.theta), entry.bits)
    return torch.from_numpy(packed)


def manifest_entry(entry: CompressedTensor | RawTensor, shard: str, stored: torch.Tensor | None = None) -> dict:
    """``entry.meta()`` plus its shard and the sha256 of its stored bytes."""
    stored = stored_tensor(entry) if stored is None else stored
    return {**entry.meta(), "shard": shard, "sha256": tensor_sha256(stored)}


def _canonical_json(manifest: dict) -> bytes:
    try:
        return (json.dumps(manifest, sort_keys=True, indent=1) + "\n").encode("ascii")
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"manifest is not JSON-serializable: {exc}", file=MANIFEST_NAME) from None


def write_manifest(directory, manifest: dict) -> None:
    """Validate and write ``manifest.json`` atomically. Write it LAST: its presence
    marks the checkpoint committed. Canonical JSON: identical inputs, identical bytes.

    The bytes are parsed back and validated exactly as :func:`read_manifest` would,
    so a manifest this function writes is one the loader accepts.
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST_NAME)
    raw = _canonical_json(manifest)
    _manifest_from_bytes(raw, path, _WRITE_LIMITS)
    with _atomic_file(directory, MANIFEST_NAME) as tmp, open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())


# -- manifest validation -----------------------------------------------------------------

class _Spec(NamedTuple):
    """What the loader expects of one stored tensor."""

    name: str
    shard: str
    sha256: str
    raw: bool
    dtype: str  # manifest dtype name (the original dtype for compressed tensors)
    shape: tuple[int, ...]  # shape of the tensor as stored
    stored_bytes: int
    n_points: int = 0
    bits: int = 0
    n_codes: int = 0  # U * (K + 1): every index must be below it


def _short(v: Any, n: int = 80) -> str:
    """``repr`` cut short: an error message must not echo a 60 MB value."""
    try:
        text = repr(v)
    except ValueError:  # an int too long to print
        return f"<{type(v).__name__} too large to print>"
    return text if len(text) <= n else text[:n] + "..."


def _check_sha(v: Any, path: str, what: str, tensor: str | None = None) -> str:
    if not (isinstance(v, str) and _SHA256.match(v)):
        raise ManifestError(f"{what}: sha256 must be 64 lowercase hex digits, got {_short(v)}", file=path, tensor=tensor)
    return v


def _check_files(section: Any, path: str, label: str, limits: LoadLimits) -> int:
    """Validate a ``{name: {"bytes", "sha256"}}`` section; returns the total bytes."""
    if not isinstance(section, dict):
        raise ManifestError(f"{label!r} must be an object", file=path)
    total = 0
    for name, rec in section.items():
        if not is_plain_name(name):
            raise ManifestError(f"{label}: file name {_short(name)} is not a plain file name "
                                "(no path separators, no '..')", file=path)
        if name == MANIFEST_NAME:
            raise ManifestError(f"{label}: {_short(name)} is reserved", file=path)
        if not isinstance(rec, dict) or set(rec) != {"bytes", "sha256"}:
            raise ManifestError(f"{label}[{_short(name)}] must hold exactly 'bytes' and 'sha256'", file=path)
        n = rec["bytes"]
        if not _is_int(n) or n < 0:
            raise ManifestError(f"{label}[{_short(name)}].bytes must be an integer >= 0, got {_short(n)}", file=path)
        if n > limits.max_total_bytes:
            raise SizeLimitError(f"{label}[{_short(name)}] declares {n} bytes, above max_total_bytes="
                                 f"{limits.max_total_bytes}", file=path)
        _check_sha(rec["sha256"], path, f"{label}[{_short(name)}]")
        total += n
    return total


def _check_shape(v: Any, path: str, name: str, limits: LoadLimits) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise ManifestError(f"shape must be a list, got {_short(v)}", file=path, tensor=name)
    if len(v) > limits.max_ndim:
        raise SizeLimitError(f"shape has {len(v)} dimensions, above max_ndim={limits.max_ndim}",
                             file=path, tensor=name)
    for d in v:
        if not _is_int(d) or d < 0:
            raise ManifestError(f"shape must hold integers >= 0, got {_short(v)}", file=path, tensor=name)
    return tuple(v)


def _check_size(nbytes: int, what: str, path: str, name: str, limits: LoadLimits) -> None:
    if nbytes > limits.max_tensor_bytes:
        raise SizeLimitError(f"{what} is {nbytes} bytes, above max_tensor_bytes={limits.max_tensor_bytes}",
                             file=path, tensor=name)


def _entry_spec(name: str, e: Any, shards: dict, path: str, limits: LoadLimits) -> tuple[_Spec, int]:
    """Validate one tensor entry; returns its spec and its decoded size in bytes."""

    def bad(msg: str) -> ManifestError:
        return ManifestError(msg, file=path, tensor=name)

    if not isinstance(e, dict):
        raise bad("entry must be an object")
    raw = e.get("raw")
    if not isinstance(raw, bool):
        raise bad(f"'raw' must be true or false, got {_short(raw)}")
    keys = _RAW_KEYS if raw else _COMPRESSED_KEYS
    missing = keys - set(e)
    if missing:
        raise bad(f"entry lacks {sorted(missing)}")
    # an unknown key could change how the entry decodes: refuse rather than ignore it
    unknown = set(e) - keys
    if unknown:
        raise bad(f"entry has unknown keys {sorted(unknown)} (format version {FORMAT_VERSION})")
    shard = e["shard"]
    if not is_plain_name(shard):
        raise bad(f"shard {_short(shard)} is not a plain file name (no path separators, no '..')")
    if shard not in shards:
        raise bad(f"shard {_short(shard)} is not listed in 'shards'")
    sha = _check_sha(e["sha256"], path, "entry", name)
    dtype = e["dtype"]
    if dtype not in _STORED:
        raise bad(f"unknown dtype {_short(dtype)}; known: {sorted(_STORED)}")
    shape = _check_shape(e["shape"], path, name, limits)
    numel = _numel(shape)
    itemsize = _STORED[dtype][1]
    decoded = numel * itemsize
    _check_size(decoded, f"declared shape {list(shape)} of {dtype}", path, name, limits)

    if raw:
        if not isinstance(e["raw_reason"], str):
            raise bad("'raw_reason' must be a string")
        return _Spec(name, shard, sha, True, dtype, shape, decoded), decoded

    if dtype not in _FLOAT_NAMES:
        raise bad(f"a compressed tensor must have a float dtype, got {_short(dtype)}")
    layout = e["layout"]
    pad = e["pad"]
    if layout == qp.LAYOUT_ROWS:
        if len(shape) != 2:
            raise bad(f"layout 'rows' needs a 2-D shape, got {list(shape)}")
        want_points = shape[0] * ((shape[1] + 1) // 2)
        want_pad = shape[1] % 2 == 1
    elif layout == qp.LAYOUT_FLAT:
        want_points = (numel + 1) // 2
        want_pad = numel % 2 == 1
    else:
        raise bad(f"layout must be {qp.LAYOUT_ROWS!r} or {qp.LAYOUT_FLAT!r}, got {_short(layout)}")
    if pad is not want_pad:
        raise bad(f"pad={_short(pad)} does not match shape {list(shape)} in layout {_short(layout)}")
    n_points = e["n_points"]
    if not _is_int(n_points) or n_points != want_points:
        raise bad(f"n_points={_short(n_points)} does not match shape {list(shape)} in layout {_short(layout)} "
                  f"(expected {want_points})")
    U, K, bits = e["U"], e["K"], e["bits"]
    if not _is_int(U) or U < 1:
        raise bad(f"U must be an integer >= 1, got {_short(U)}")
    if U > limits.max_points_U:
        raise SizeLimitError(f"U={U} is above max_points_U={limits.max_points_U}", file=path, tensor=name)
    if not _is_int(K) or K < 0:
        raise bad(f"K must be an integer >= 0, got {_short(K)}")
    if K > limits.max_classes:
        raise SizeLimitError(f"K={K} is above max_classes={limits.max_classes}", file=path, tensor=name)
    n_codes = U * (K + 1)
    if n_codes > limits.max_decode_table:
        raise SizeLimitError(f"U*(K+1)={n_codes} decode-table entries, above max_decode_table="
                             f"{limits.max_decode_table}", file=path, tensor=name)
    max_bits = max(1, (n_codes - 1).bit_length())
    if not _is_int(bits) or not 1 <= bits <= min(32, max_bits):
        raise bad(f"bits={_short(bits)} is inconsistent with U={U}, K={K} (must be 1..{min(32, max_bits)})")
    c = e["centroid"]
    if not (isinstance(c, list) and len(c) == 2 and all(_is_finite_num(x) for x in c)):
        raise bad(f"centroid must be two finite numbers, got {_short(c)}")
    radius, box = e["radius"], e["box_size"]
    if not (_is_finite_num(radius) and radius >= 0):
        raise bad(f"radius must be a finite number >= 0, got {_short(radius)}")
    if not (_is_finite_num(box) and box > 0):
        raise bad(f"box_size must be a finite number > 0, got {_short(box)}")
    for key in ("mae", "abs_error_sum"):  # reported figures: never used to decode, but read as floats
        if not (_is_finite_num(e[key]) and e[key] >= 0):
            raise bad(f"{key!r} must be a finite number >= 0, got {_short(e[key])}")
    packed = qp.packed_nbytes(n_points, bits)
    _check_size(packed, "packed index stream", path, name, limits)
    spec = _Spec(name, shard, sha, False, dtype, (packed,), packed, n_points, bits, n_codes)
    return spec, decoded


def _validate(manifest: Any, path: str, limits: LoadLimits) -> dict[str, _Spec]:
    if not isinstance(manifest, dict):
        raise ManifestError(f"manifest must be a JSON object, got {type(manifest).__name__}", file=path)
    fmt = manifest.get("format")
    if fmt != FORMAT_NAME:
        raise UnknownFormatError(f"format {_short(fmt)} is not {FORMAT_NAME!r}", file=path)
    ver = manifest.get("format_version")
    if not _is_int(ver) or ver != FORMAT_VERSION:
        raise UnknownFormatError(f"format_version {_short(ver)} is unknown; this build reads version {FORMAT_VERSION}",
                                 file=path)
    missing = [k for k in _TOP_REQUIRED if k not in manifest]
    if missing:
        raise ManifestError(f"manifest lacks {missing}", file=path)
    # an unknown field could change what the checkpoint means: refuse, as for entries
    unknown = sorted(set(manifest) - set(_TOP_REQUIRED))
    if unknown:
        raise ManifestError(f"manifest has unknown fields {unknown[:8]} (format version {FORMAT_VERSION})",
                            file=path)
    cv = manifest["codec_version"]
    if not _is_int(cv) or cv != CODEC_VERSION:
        raise UnknownFormatError(f"codec_version {_short(cv)} is unknown; this build decodes version {CODEC_VERSION}",
                                 file=path)
    prod = manifest["producer"]
    if not (isinstance(prod, dict) and isinstance(prod.get("name"), str) and isinstance(prod.get("version"), str)):
        raise ManifestError(f"producer must be an object with string 'name' and 'version', got {_short(prod)}", file=path)
    if not isinstance(manifest["source"], dict):
        raise ManifestError("'source' must be an object", file=path)
    try:
        HyperCompressionConfig.from_dict(manifest["config"])
    except ConfigError as exc:
        raise ManifestError(f"config: {exc}", file=path) from None

    total = _check_files(manifest["extra_files"], path, "extra_files", limits)
    shards = manifest["shards"]
    total += _check_files(shards, path, "shards", limits)
    for name in shards:
        if not name.endswith(SHARD_SUFFIX):
            raise ManifestError(f"shard name {_short(name)} must end in {SHARD_SUFFIX}", file=path)
        if name in manifest["extra_files"]:
            raise ManifestError(f"{_short(name)} is listed both as a shard and as an extra file", file=path)

    tensors = manifest["tensors"]
    if not isinstance(tensors, dict):
        raise ManifestError("'tensors' must be an object", file=path)
    if len(tensors) > limits.max_tensors:
        raise SizeLimitError(f"{len(tensors)} tensors, above max_tensors={limits.max_tensors}", file=path)
    specs: dict[str, _Spec] = {}
    used: set[str] = set()
    for name, e in tensors.items():
        if not name or name == _SAFETENSORS_METADATA:
            raise ManifestError(f"invalid tensor name {_short(name)}", file=path, tensor=name)
        spec, decoded = _entry_spec(name, e, shards, path, limits)
        total += decoded
        if total > limits.max_total_bytes:
            raise SizeLimitError(f"declared sizes add up to more than max_total_bytes={limits.max_total_bytes}",
                                 file=path, tensor=name)
        specs[name] = spec
        used.add(spec.shard)
    if total > limits.max_total_bytes:
        raise SizeLimitError(f"declared sizes add up to {total} bytes, above max_total_bytes="
                             f"{limits.max_total_bytes}", file=path)
    unused = sorted(set(shards) - used)
    if unused:
        raise ManifestError(f"shards {unused} hold no tensor the manifest lists", file=path)
    return specs


def _manifest_from_bytes(raw: bytes, path: str, limits: LoadLimits) -> tuple[dict, dict[str, _Spec]]:
    obj, dups = _parse_json(raw, path, ManifestError, limits.max_manifest_nodes)
    if dups:
        tensors = obj.get("tensors") if isinstance(obj, dict) else None
        for key, holder in dups:
            if holder is tensors:
                raise DuplicateTensorError("tensor name appears twice in the manifest", file=path, tensor=key)
        key, _ = dups[0]
        raise ManifestError(f"duplicate JSON key {_short(key)}", file=path)
    return obj, _validate(obj, path, limits)


def parse_manifest(raw: bytes, where: str, limits: LoadLimits = LoadLimits()) -> dict:
    """The one manifest reader: parse and fully validate a manifest's bytes (from a
    folder, :func:`read_manifest`, or a store); ``where`` names it in errors."""
    if len(raw) > limits.max_manifest_bytes:
        raise SizeLimitError(f"manifest is {len(raw)} bytes, above max_manifest_bytes={limits.max_manifest_bytes}",
                             file=where)
    manifest, _ = _manifest_from_bytes(raw, where, limits)
    return manifest


def read_manifest(directory, limits: LoadLimits = LoadLimits()) -> dict:
    """Read and fully validate ``manifest.json`` without touching any shard."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isdir(directory):
        what = "does not exist" if not os.path.lexists(directory) else "is not a directory"
        raise ManifestError(f"checkpoint directory {what}", file=directory)
    try:
        f, size = _open_regular(path, ManifestError, "manifest")
    except ManifestError as exc:
        if not os.path.lexists(path):
            raise ManifestError(f"no {MANIFEST_NAME}: not a committed checkpoint", file=path) from None
        raise exc
    with f:
        if size > limits.max_manifest_bytes:
            raise SizeLimitError(f"manifest is {size} bytes, above max_manifest_bytes={limits.max_manifest_bytes}",
                                 file=path)
        # read what the stat promised plus one byte: a buffer of the cap's size would
        # itself be the large allocation the cap is there to avoid
        raw = f.read(size + 1)
    if len(raw) != size:
        raise ManifestError("manifest changed while being read", file=path)
    manifest, _ = _manifest_from_bytes(raw, path, limits)
    return manifest


# -- shards ---------------------------------------------------------------------------

class _HeaderEntry(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _header_budget(specs: list[_Spec], limits: LoadLimits) -> int:
    """The most header bytes a shard holding ``specs`` can need: its names (JSON
    escaping at most sixfold) plus a fixed amount per tensor and for metadata.
    Parsing is bounded by what the manifest declares, not by the file's claim."""
    need = _HEADER_BYTES_FIXED + sum(6 * len(s.name.encode("utf-8", "surrogatepass")) + _HEADER_BYTES_PER_TENSOR
                                     for s in specs)
    return min(limits.max_header_bytes, need)


def _parse_shard_header(f, path: str, file_size: int, limits: LoadLimits, fh,
                        budget: int | None = None) -> tuple[int, dict[str, _HeaderEntry]]:
    """Parse and sanity-check a safetensors header; returns (data start, entries).
    ``budget`` caps the header size below ``limits.max_header_bytes``."""
    if file_size < 8:
        raise TruncatedDataError(f"shard is {file_size} bytes, shorter than the 8-byte header length", file=path)
    head = _read_exact(f, 8, path, "header length")
    fh.update(head)
    (n,) = struct.unpack("<Q", head)
    if n > limits.max_header_bytes:
        raise SizeLimitError(f"safetensors header declares {n} bytes, above max_header_bytes="
                             f"{limits.max_header_bytes}", file=path)
    if budget is not None and n > budget:
        raise SizeLimitError(f"safetensors header declares {n} bytes; the tensors the manifest lists for this "
                             f"shard need at most {budget}", file=path)
    if 8 + n > file_size:
        raise TruncatedDataError(f"safetensors header length {n} points past the end of the "
                                 f"{file_size}-byte file", file=path)
    raw = _read_exact(f, n, path, "header")
    fh.update(raw)
    obj, dups = _parse_json(raw, path, ShardHeaderError)
    if dups:
        key, holder = dups[0]
        if holder is obj:
            raise DuplicateTensorError("tensor name appears twice in the shard header", file=path, tensor=key)
        raise ShardHeaderError(f"duplicate JSON key {_short(key)} in the shard header", file=path)
    if not isinstance(obj, dict):
        raise ShardHeaderError("safetensors header must be a JSON object", file=path)
    entries: dict[str, _HeaderEntry] = {}
    for name, rec in obj.items():
        if name == _SAFETENSORS_METADATA:
            if not (isinstance(rec, dict) and all(isinstance(v, str) for v in rec.values())):
                raise ShardHeaderError("__metadata__ must map strings to strings", file=path)
            continue
        if not isinstance(rec, dict) or set(rec) != {"dtype", "shape", "data_offsets"}:
            raise ShardHeaderError("header entry must hold exactly dtype, shape, data_offsets", file=path, tensor=name)
        dt, shape, offs = rec["dtype"], rec["shape"], rec["data_offsets"]
        if dt not in _ST_ITEMSIZE:
            raise ShardHeaderError(f"unknown safetensors dtype {_short(dt)}", file=path, tensor=name)
        if not (isinstance(shape, list) and len(shape) <= limits.max_ndim and all(_is_int(d) and d >= 0 for d in shape)):
            raise ShardHeaderError(f"invalid shape {_short(shape)}", file=path, tensor=name)
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) and o >= 0 for o in offs)
                and offs[0] <= offs[1]):
            raise ShardHeaderError(f"invalid data_offsets {_short(offs)}", file=path, tensor=name)
        if offs[1] - offs[0] != _numel(shape) * _ST_ITEMSIZE[dt]:
            raise ShardHeaderError(f"data_offsets {offs} span {offs[1] - offs[0]} bytes, but shape {shape} of "
                                   f"{dt} needs {_numel(shape) * _ST_ITEMSIZE[dt]}", file=path, tensor=name)
        entries[name] = _HeaderEntry(dt, tuple(shape), offs[0], offs[1])
    # the data must tile the buffer exactly: no overlap, no gap, nothing after it
    pos = 0
    for name, ent in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if ent.begin != pos:
            raise ShardHeaderError(f"tensor data starts at {ent.begin}, expected {pos} "
                                   "(overlapping or non-contiguous offsets)", file=path, tensor=name)
        pos = ent.end
    data_start = 8 + n
    available = file_size - data_start
    if pos > available:
        raise TruncatedDataError(f"tensor data needs {pos} bytes, the file holds {available} after the header",
                                 file=path)
    if pos < available:
        raise TruncatedDataError(f"{available - pos} trailing bytes after the tensor data", file=path)
    return data_start, entries


def _compare(spec: _Spec, ent: _HeaderEntry, path: str) -> None:
    if spec.raw:
        want = _STORED[spec.dtype][0]
        if ent.dtype != want:
            raise DTypeMismatchError(f"stored dtype {ent.dtype}, the manifest declares {spec.dtype} ({want})",
                                     file=path, tensor=spec.name)
        if ent.shape != spec.shape:
            raise DTypeMismatchError(f"stored shape {list(ent.shape)}, the manifest declares {list(spec.shape)}",
                                     file=path, tensor=spec.name)
        return
    if ent.dtype != "U8" or len(ent.shape) != 1:
        raise DTypeMismatchError(f"packed indices must be a 1-D U8 array, found {ent.dtype} {list(ent.shape)}",
                                 file=path, tensor=spec.name)
    if ent.shape[0] != spec.stored_bytes:
        raise PackedLengthError(f"packed index stream is {ent.shape[0]} bytes; {spec.n_points} indices of "
                                f"{spec.bits} bits need {spec.stored_bytes}", file=path, tensor=spec.name)


def _to_tensor(spec: _Spec, buf: np.ndarray, path: str) -> torch.Tensor:
    np_dtype = np.dtype(_STORED[spec.dtype][2])
    if spec.dtype == "bool" and buf.size and int(buf.max()) > 1:
        raise DTypeMismatchError("bool tensor holds bytes other than 0 and 1", file=path, tensor=spec.name)
    arr = buf.view(np_dtype).reshape(spec.shape)
    t = torch.from_numpy(arr)
    if spec.dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    elif spec.dtype == "bool":
        t = t.view(torch.bool)
    return t


def _unpack(spec: _Spec, buf: np.ndarray, path: str, kernels) -> np.ndarray:
    theta = np.asarray(kernels.unpack_bits(buf, spec.n_points, spec.bits))
    if theta.size:
        hi = int(theta.max())
        if hi >= spec.n_codes:
            pos = int(np.argmax(theta >= spec.n_codes))
            raise IndexRangeError(f"index {hi} (first bad one at point {pos}) is not below U*(K+1)={spec.n_codes}",
                                  file=path, tensor=spec.name)
    return theta.astype(np.uint16 if spec.bits <= 16 else np.uint32, copy=False)


def _load_shard(directory: str, shard: str, declared: dict, specs: list[_Spec], wanted: set[str],
                limits: LoadLimits, verify: bool, kernels, out: dict) -> None:
    path = os.path.join(directory, shard)
    f, size = _open_regular(path, MissingFileError, "shard file", tensor=specs[0].name if specs else None)
    with f:
        if size != declared["bytes"]:
            raise TruncatedDataError(f"shard is {size} bytes, the manifest declares {declared['bytes']}", file=path)
        fh = hashlib.sha256()
        data_start, entries = _parse_shard_header(f, path, size, limits, fh, _header_budget(specs, limits))
        by_name = {s.name: s for s in specs}
        for name in entries:
            if name not in by_name:
                raise UnexpectedTensorError("shard holds a tensor the manifest does not list for it",
                                            file=path, tensor=name)
        for s in specs:
            ent = entries.get(s.name)
            if ent is None:
                raise MissingTensorError("tensor listed in the manifest is absent from its shard",
                                         file=path, tensor=s.name)
            _compare(s, ent, path)
        # header and manifest agree; only now read data, in file order
        for name, ent in sorted(entries.items(), key=lambda kv: kv[1].begin):
            s = by_name[name]
            nbytes = ent.end - ent.begin
            if name in wanted:
                buf = np.empty(nbytes, dtype=np.uint8)
                _readinto_exact(f, buf, path, name)
                if verify:
                    fh.update(buf)
                    if tensor_sha256(buf) != s.sha256:
                        raise ChecksumError("sha256 of the stored bytes differs from the manifest",
                                            file=path, tensor=name)
                out[name] = _to_tensor(s, buf, path) if s.raw else _unpack(s, buf, path, kernels)
            elif verify:
                left = nbytes
                while left:
                    chunk = _read_exact(f, min(left, _IO_CHUNK), path, "tensor data")
                    fh.update(chunk)
                    left -= len(chunk)
            else:
                f.seek(data_start + ent.end)
        if verify and fh.hexdigest() != declared["sha256"]:
            raise ChecksumError("sha256 of the shard file differs from the manifest", file=path)


def verify_extra_files(directory, manifest: dict) -> None:
    """Check every copied architecture file's size and sha256 against the manifest."""
    directory = os.fspath(directory)
    for name, rec in manifest["extra_files"].items():
        path = os.path.join(directory, name)
        f, size = _open_regular(path, MissingFileError, "extra file")
        with f:
            if size != rec["bytes"]:
                raise TruncatedDataError(f"file is {size} bytes, the manifest declares {rec['bytes']}", file=path)
            _, digest = _hash_stream(f)
        if digest != rec["sha256"]:
            raise ChecksumError("sha256 of the file differs from the manifest", file=path)


def load_stored_tensors(directory, manifest: dict, names: Iterable[str] | None = None,
                        limits: LoadLimits = LoadLimits(), verify: bool = True) -> dict[str, torch.Tensor | np.ndarray]:
    """Read, check and return the tensors of a checkpoint.

    Returns ``name -> torch.Tensor`` (its stored dtype and shape) for raw entries
    and ``name -> np.ndarray`` for compressed entries: the unpacked indices
    ``theta`` (``[n_points]``, uint16 when ``bits <= 16`` else uint32), already
    checked to be below ``U*(K+1)``, so the caller never unpacks twice.

    ``manifest`` is validated again (cheap) so a dict edited after
    :func:`read_manifest` cannot bypass the caps. Each shard's header is parsed
    and compared with the manifest before any data is read. With ``verify`` the
    sha256 of every tensor read and of every shard file touched is checked
    (tensors of a touched shard that were not asked for are streamed through the
    file hash, not kept), and on a full load (``names=None``) the extra files
    too. The index range check runs whatever ``verify`` says: it guards the
    decoder's table lookups.
    """
    from .backends import resolve_backend

    directory = os.fspath(directory)
    specs = _validate(manifest, os.path.join(directory, MANIFEST_NAME), limits)
    if names is None:
        wanted = set(specs)
    else:
        wanted = set(names)
        for n in sorted(wanted - set(specs)):
            raise MissingTensorError("tensor is not in the manifest", file=os.path.join(directory, MANIFEST_NAME),
                                     tensor=n)
    if verify and names is None:
        verify_extra_files(directory, manifest)
    by_shard: dict[str, list[_Spec]] = {}
    for s in specs.values():
        by_shard.setdefault(s.shard, []).append(s)
    kernels = resolve_backend("auto").kernels if any(not specs[n].raw for n in wanted) else None
    out: dict[str, torch.Tensor | np.ndarray] = {}
    for shard in manifest["shards"]:  # manifest order: deterministic
        group = by_shard.get(shard, [])
        if not any(s.name in wanted for s in group):
            continue
        _load_shard(directory, shard, manifest["shards"][shard], group, wanted, limits, verify, kernels, out)
    return {n: out[n] for n in specs if n in wanted}
