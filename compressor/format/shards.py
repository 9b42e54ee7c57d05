"""Shard files: writing them (hashed while written), planning them, the extra files
beside them, and reading them back with every header checked against the manifest."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np
import torch

from ..dtypes import DTYPES, NAME_BY_TORCH, SAFETENSORS_ITEMSIZE
from ..errors import (
    ChecksumError,
    ConfigError,
    DTypeMismatchError,
    DuplicateTensorError,
    IndexRangeError,
    MissingFileError,
    MissingTensorError,
    PackedLengthError,
    ShardHeaderError,
    SizeLimitError,
    SourceError,
    TruncatedDataError,
    UnexpectedTensorError,
)
from .fsio import atomic_file, hash_stream, open_regular, read_exact, readinto_exact, umask
from .manifest import _short, _Spec, _validate
from .schema import (
    _HEADER_BYTES_FIXED,
    _HEADER_BYTES_PER_TENSOR,
    _IO_CHUNK,
    _SAFETENSORS_METADATA,
    FORMAT_NAME,
    MANIFEST_NAME,
    SHARD_SUFFIX,
    LoadLimits,
    _as_torch,
    _is_int,
    _numel,
    _parse_json,
    _stored_array,
    is_plain_name,
    tensor_sha256,
)


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
    with atomic_file(directory, filename) as tmp:
        with open(tmp, "wb") as f:
            nbytes, digest = _write_safetensors(f, data, {"format": FORMAT_NAME})
            f.flush()
            os.fsync(f.fileno())
        # shards are shared data like the manifest
        os.chmod(tmp, 0o666 & ~umask())
    return {"file": filename, "bytes": nbytes, "sha256": digest}


def _write_safetensors(f, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> tuple[int, str]:
    """Stream ``tensors`` to ``f`` in the safetensors layout (the order and header the
    ``safetensors`` package writes: larger items first, then by name; the header padded
    with spaces to 8 bytes), hashing every byte on its way out. Returns (bytes, sha256)."""
    arrays = {n: _stored_array(t) for n, t in tensors.items()}
    codes = {n: DTYPES[NAME_BY_TORCH[t.dtype]].st_code for n, t in tensors.items()}
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
    src, _ = open_regular(src_path, SourceError, "source file")
    with atomic_file(directory, name) as tmp, src, open(tmp, "wb") as dst:
        n, digest = hash_stream(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
    return {"bytes": n, "sha256": digest}


def write_extra_bytes(content: bytes, directory, name: str) -> dict:
    """Write an architecture file given as bytes (a module's ``config.json``) into
    the checkpoint atomically; returns ``{"bytes", "sha256"}``."""
    directory = os.fspath(directory)
    if not is_plain_name(name) or name == MANIFEST_NAME or name.endswith(SHARD_SUFFIX):
        raise ConfigError(f"extra file name {name!r} must be a plain file name, not the manifest or a shard")
    with atomic_file(directory, name) as tmp, open(tmp, "wb") as dst:
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
    head = read_exact(f, 8, path, "header length")
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
    raw = read_exact(f, n, path, "header")
    fh.update(raw)
    obj, dups = _parse_json(raw, path, ShardHeaderError)
    if dups:
        key, holder = dups[0]
        if holder is obj:
            raise DuplicateTensorError("tensor name appears twice in the shard header", file=path, tensor=key)
        raise ShardHeaderError(f"duplicate JSON key {_short(key)} in the shard header", file=path)
    if not isinstance(obj, dict):
        raise ShardHeaderError("safetensors header must be a JSON object", file=path)
    entries = {name: _header_entry(name, rec, path, limits) for name, rec in obj.items()
               if not _is_metadata(name, rec, path)}
    _check_tiling(entries, 8 + n, file_size, path)
    return 8 + n, entries


def _is_metadata(name: str, rec: Any, path: str) -> bool:
    if name != _SAFETENSORS_METADATA:
        return False
    if not (isinstance(rec, dict) and all(isinstance(v, str) for v in rec.values())):
        raise ShardHeaderError("__metadata__ must map strings to strings", file=path)
    return True


def _header_entry(name: str, rec: Any, path: str, limits: LoadLimits) -> _HeaderEntry:
    """One tensor's header record: a known dtype, a shape and offsets that agree."""
    if not isinstance(rec, dict) or set(rec) != {"dtype", "shape", "data_offsets"}:
        raise ShardHeaderError("header entry must hold exactly dtype, shape, data_offsets", file=path, tensor=name)
    dt, shape, offs = rec["dtype"], rec["shape"], rec["data_offsets"]
    if dt not in SAFETENSORS_ITEMSIZE:
        raise ShardHeaderError(f"unknown safetensors dtype {_short(dt)}", file=path, tensor=name)
    if not (isinstance(shape, list) and len(shape) <= limits.max_ndim and all(_is_int(d) and d >= 0 for d in shape)):
        raise ShardHeaderError(f"invalid shape {_short(shape)}", file=path, tensor=name)
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) and o >= 0 for o in offs)
            and offs[0] <= offs[1]):
        raise ShardHeaderError(f"invalid data_offsets {_short(offs)}", file=path, tensor=name)
    need = _numel(shape) * SAFETENSORS_ITEMSIZE[dt]
    if offs[1] - offs[0] != need:
        raise ShardHeaderError(f"data_offsets {offs} span {offs[1] - offs[0]} bytes, but shape {shape} of "
                               f"{dt} needs {need}", file=path, tensor=name)
    return _HeaderEntry(dt, tuple(shape), offs[0], offs[1])


def _check_tiling(entries: Mapping[str, _HeaderEntry], data_start: int, file_size: int, path: str) -> None:
    """The data must tile the buffer exactly: no overlap, no gap, nothing after it."""
    pos = 0
    for name, ent in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if ent.begin != pos:
            raise ShardHeaderError(f"tensor data starts at {ent.begin}, expected {pos} "
                                   "(overlapping or non-contiguous offsets)", file=path, tensor=name)
        pos = ent.end
    available = file_size - data_start
    if pos > available:
        raise TruncatedDataError(f"tensor data needs {pos} bytes, the file holds {available} after the header",
                                 file=path)
    if pos < available:
        raise TruncatedDataError(f"{available - pos} trailing bytes after the tensor data", file=path)


def _compare(spec: _Spec, ent: _HeaderEntry, path: str) -> None:
    if spec.raw:
        want = DTYPES[spec.dtype].st_code
        if ent.dtype != want:
            raise DTypeMismatchError(f"stored dtype {ent.dtype}, the manifest declares {spec.dtype} ({want})",
                                     file=path, tensor=spec.name)
        if ent.shape != spec.shape:
            raise DTypeMismatchError(f"stored shape {list(ent.shape)}, the manifest declares {list(spec.shape)}",
                                     file=path, tensor=spec.name)
        return
    what = "a v2 tensor's byte form" if spec.codec == "v2" else "packed indices"
    if ent.dtype != "U8" or len(ent.shape) != 1:
        raise DTypeMismatchError(f"{what} must be a 1-D U8 array, found {ent.dtype} {list(ent.shape)}",
                                 file=path, tensor=spec.name)
    if spec.codec == "v2" and ent.shape[0] != spec.stored_bytes:
        raise PackedLengthError(f"v2 byte form is {ent.shape[0]} bytes, the manifest declares {spec.stored_bytes}",
                                file=path, tensor=spec.name)
    if ent.shape[0] != spec.stored_bytes:
        raise PackedLengthError(f"packed index stream is {ent.shape[0]} bytes; {spec.n_points} indices of "
                                f"{spec.bits} bits need {spec.stored_bytes}", file=path, tensor=spec.name)


def _to_tensor(spec: _Spec, buf: np.ndarray, path: str) -> torch.Tensor:
    np_dtype = np.dtype(DTYPES[spec.dtype].stored_np)
    if spec.dtype == "bool" and buf.size and int(buf.max()) > 1:
        raise DTypeMismatchError("bool tensor holds bytes other than 0 and 1", file=path, tensor=spec.name)
    arr = buf.view(np_dtype).reshape(spec.shape)
    t = torch.from_numpy(arr)
    if spec.dtype in ("bfloat16", "bool"):  # stored as the bytes of another numpy dtype
        t = t.view(DTYPES[spec.dtype].torch)
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


def _v2_tensor(spec: _Spec, buf: np.ndarray, path: str):
    """Parse and validate a v2 byte form (every field, before any decoding) and check
    that its header says what the manifest says."""
    from ..codec_v2.container import V2Tensor

    t = V2Tensor.from_bytes(buf.tobytes(), file=path, name=spec.name)
    for key, have, want in (("name", t.name, spec.name), ("shape", tuple(t.shape), spec.decoded_shape),
                            ("dtype", t.dtype, spec.dtype), ("role", t.role, spec.role)):
        if have != want:
            raise DTypeMismatchError(f"stored v2 header has {key} {have!r}, the manifest declares {want!r}",
                                     file=path, tensor=spec.name)
    return t


def _load_shard(directory: str, shard: str, declared: dict, specs: list[_Spec], wanted: set[str],
                limits: LoadLimits, verify: bool, kernels, out: dict) -> None:
    path = os.path.join(directory, shard)
    f, size = open_regular(path, MissingFileError, "shard file", tensor=specs[0].name if specs else None)
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
                readinto_exact(f, buf, path, name)
                if verify:
                    fh.update(buf)
                    if tensor_sha256(buf) != s.sha256:
                        raise ChecksumError("sha256 of the stored bytes differs from the manifest",
                                            file=path, tensor=name)
                if s.raw:
                    out[name] = _to_tensor(s, buf, path)
                elif s.codec == "v2":
                    out[name] = _v2_tensor(s, buf, path)
                else:
                    out[name] = _unpack(s, buf, path, kernels)
            elif verify:
                left = nbytes
                while left:
                    chunk = read_exact(f, min(left, _IO_CHUNK), path, "tensor data")
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
        f, size = open_regular(path, MissingFileError, "extra file")
        with f:
            if size != rec["bytes"]:
                raise TruncatedDataError(f"file is {size} bytes, the manifest declares {rec['bytes']}", file=path)
            _, digest = hash_stream(f)
        if digest != rec["sha256"]:
            raise ChecksumError("sha256 of the file differs from the manifest", file=path)


def load_stored_tensors(directory, manifest: dict, names: Iterable[str] | None = None,
                        limits: LoadLimits = LoadLimits(), verify: bool = True) -> dict[str, torch.Tensor | np.ndarray]:
    """Read, check and return the tensors of a checkpoint.

    Returns ``name -> torch.Tensor`` (its stored dtype and shape) for raw entries
    and ``name -> np.ndarray`` for compressed entries: the unpacked indices
    ``theta`` (``[n_points]``, uint16 when ``bits <= 16`` else uint32), already
    checked to be below ``U*(K+1)``, so the caller never unpacks twice. A codec-v2
    entry gives its :class:`~compressor.codec_v2.container.V2Tensor`, every field
    validated (its blocks' CRCs are checked as they decode).

    ``manifest`` is validated again (cheap) so a dict edited after
    :func:`read_manifest` cannot bypass the caps. Each shard's header is parsed
    and compared with the manifest before any data is read. With ``verify`` the
    sha256 of every tensor read and of every shard file touched is checked
    (tensors of a touched shard that were not asked for are streamed through the
    file hash, not kept), and on a full load (``names=None``) the extra files
    too. The index range check runs whatever ``verify`` says: it guards the
    decoder's table lookups.
    """
    from ..backends import resolve_backend

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
    kernels = resolve_backend("auto").kernels if any(specs[n].codec == "v1" and not specs[n].raw
                                                     for n in wanted) else None
    out: dict[str, torch.Tensor | np.ndarray] = {}
    for shard in manifest["shards"]:  # manifest order: deterministic
        group = by_shard.get(shard, [])
        if not any(s.name in wanted for s in group):
            continue
        _load_shard(directory, shard, manifest["shards"][shard], group, wanted, limits, verify, kernels, out)
    return {n: out[n] for n in specs if n in wanted}
