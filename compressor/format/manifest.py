"""The manifest: entries, canonical writing, and the one validating reader
(:func:`parse_manifest` for bytes from anywhere, :func:`read_manifest` for a folder)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple

import torch

from .. import quant_primitives as qp
from ..codec import CompressedTensor, RawTensor
from ..config import HyperCompressionConfig, _short  # one cut-short repr for every error message
from ..dtypes import DTYPES, FLOAT_NAMES
from ..errors import ConfigError, DuplicateTensorError, ManifestError, SizeLimitError, UnknownFormatError
from .fsio import atomic_file, open_regular
from .schema import (
    _COMPRESSED_KEYS,
    _RAW_KEYS,
    _SAFETENSORS_METADATA,
    _V2_KEYS,
    _SHA256,
    _TOP_REQUIRED,
    _WRITE_LIMITS,
    CODEC_OF_FORMAT,
    FORMAT_NAME,
    FORMAT_VERSION_V2,
    MANIFEST_NAME,
    SHARD_SUFFIX,
    LoadLimits,
    _is_finite_num,
    _is_int,
    _numel,
    _parse_json,
    is_plain_name,
    stored_tensor,
    tensor_sha256,
)


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
    with atomic_file(directory, MANIFEST_NAME) as tmp, open(tmp, "wb") as f:
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
    codec: str = "v1"  # how a non-raw entry decodes: "v1" (the paper's) or "v2" (compressor.codec_v2)
    decoded_shape: tuple[int, ...] = ()  # v2: the shape its stored header must declare
    role: str = ""  # v2: the role its stored header must declare


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


def _entry_spec(name: str, e: Any, shards: dict, path: str, limits: LoadLimits,
                version: int) -> tuple[_Spec, int]:
    """Validate one tensor entry of a manifest of format ``version``; returns its spec
    and its decoded size in bytes."""

    def bad(msg: str) -> ManifestError:
        return ManifestError(msg, file=path, tensor=name)

    if not isinstance(e, dict):
        raise bad("entry must be an object")
    raw = e.get("raw")
    if not isinstance(raw, bool):
        raise bad(f"'raw' must be true or false, got {_short(raw)}")
    keys = _RAW_KEYS if raw else (_V2_KEYS if version == FORMAT_VERSION_V2 else _COMPRESSED_KEYS)
    missing = keys - set(e)
    if missing:
        raise bad(f"entry lacks {sorted(missing)}")
    # an unknown key could change how the entry decodes: refuse rather than ignore it
    unknown = set(e) - keys
    if unknown:
        raise bad(f"entry has unknown keys {sorted(unknown)} (format version {version})")
    shard = e["shard"]
    if not is_plain_name(shard):
        raise bad(f"shard {_short(shard)} is not a plain file name (no path separators, no '..')")
    if shard not in shards:
        raise bad(f"shard {_short(shard)} is not listed in 'shards'")
    sha = _check_sha(e["sha256"], path, "entry", name)
    dtype = e["dtype"]
    if dtype not in DTYPES:
        raise bad(f"unknown dtype {_short(dtype)}; known: {sorted(DTYPES)}")
    shape = _check_shape(e["shape"], path, name, limits)
    decoded = _numel(shape) * DTYPES[dtype].itemsize
    _check_size(decoded, f"declared shape {list(shape)} of {dtype}", path, name, limits)

    if raw:
        if not isinstance(e["raw_reason"], str):
            raise bad("'raw_reason' must be a string")
        return _Spec(name, shard, sha, True, dtype, shape, decoded), decoded

    if dtype not in FLOAT_NAMES:
        raise bad(f"a compressed tensor must have a float dtype, got {_short(dtype)}")
    if version == FORMAT_VERSION_V2:
        return _v2_spec(name, e, shard, sha, dtype, shape, path, limits, bad), decoded
    n_points = _check_layout(e, shape, bad)
    n_codes, bits = _check_codes(e, limits, bad, path, name)
    _check_geometry(e, bad)
    packed = qp.packed_nbytes(n_points, bits)
    _check_size(packed, "packed index stream", path, name, limits)
    spec = _Spec(name, shard, sha, False, dtype, (packed,), packed, n_points, bits, n_codes)
    return spec, decoded


def _v2_spec(name: str, e: dict, shard: str, sha: str, dtype: str, shape: tuple[int, ...], path: str,
             limits: LoadLimits, bad: Callable[[str], ManifestError]) -> _Spec:
    """A codec-v2 entry: its byte form's length, and the fields its stored header
    must repeat (checked again when the shard is read)."""
    from ..codec_v2.layout import ROLES

    if e["codec"] != "v2":
        raise bad(f"codec {_short(e['codec'])} is unknown in format version {FORMAT_VERSION_V2}; this build "
                  "decodes 'v2'")
    if len(shape) < 1 or _numel(shape) < 2:
        raise bad(f"a v2 tensor has at least 2 elements, got shape {list(shape)}")
    if e["role"] not in ROLES:
        raise bad(f"role {_short(e['role'])} is not one of {list(ROLES)}")
    n = e["stored_bytes"]
    if not _is_int(n) or n < 1:
        raise bad(f"stored_bytes must be an integer >= 1, got {_short(n)}")
    _check_size(n, "v2 byte form", path, name, limits)
    if not _is_int(e["n_escapes"]) or e["n_escapes"] < 0:
        raise bad(f"n_escapes must be an integer >= 0, got {_short(e['n_escapes'])}")
    for key in ("q", "bits_per_weight", "abs_error_sum", "mae"):  # reported figures, read as floats
        if not (_is_finite_num(e[key]) and e[key] >= 0):
            raise bad(f"{key!r} must be a finite number >= 0, got {_short(e[key])}")
    return _Spec(name, shard, sha, False, dtype, (n,), n, codec="v2", decoded_shape=shape, role=e["role"])


def _check_layout(e: dict, shape: tuple[int, ...], bad: Callable[[str], ManifestError]) -> int:
    """Layout, pad and the number of points must agree with the shape; returns the points."""
    numel = _numel(shape)
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
    return n_points


def _check_codes(e: dict, limits: LoadLimits, bad: Callable[[str], ManifestError], path: str,
                 name: str) -> tuple[int, int]:
    """U, K within the loader's caps and bits consistent with them; returns (U*(K+1), bits)."""
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
    return n_codes, bits


def _check_geometry(e: dict, bad: Callable[[str], ManifestError]) -> None:
    """Centroid, radius and box size decode the indices; MAE figures are read as floats."""
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


def _check_top(manifest: Any, path: str) -> None:
    """The manifest's own fields: format and codec versions, required and unknown
    fields, producer, source and config."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"manifest must be a JSON object, got {type(manifest).__name__}", file=path)
    fmt = manifest.get("format")
    if fmt != FORMAT_NAME:
        raise UnknownFormatError(f"format {_short(fmt)} is not {FORMAT_NAME!r}", file=path)
    ver = manifest.get("format_version")
    if not _is_int(ver) or ver not in CODEC_OF_FORMAT:
        raise UnknownFormatError(f"format_version {_short(ver)} is unknown; this build reads versions "
                                 f"{sorted(CODEC_OF_FORMAT)}", file=path)
    missing = [k for k in _TOP_REQUIRED if k not in manifest]
    if missing:
        raise ManifestError(f"manifest lacks {missing}", file=path)
    # an unknown field could change what the checkpoint means: refuse, as for entries
    unknown = sorted(set(manifest) - set(_TOP_REQUIRED))
    if unknown:
        raise ManifestError(f"manifest has unknown fields {unknown[:8]} (format version {ver})", file=path)
    cv = manifest["codec_version"]
    if not _is_int(cv) or cv != CODEC_OF_FORMAT[ver]:
        raise UnknownFormatError(f"codec_version {_short(cv)} is unknown in format version {ver}; this build "
                                 f"decodes version {CODEC_OF_FORMAT[ver]} there", file=path)
    prod = manifest["producer"]
    if not (isinstance(prod, dict) and isinstance(prod.get("name"), str) and isinstance(prod.get("version"), str)):
        raise ManifestError(f"producer must be an object with string 'name' and 'version', got {_short(prod)}", file=path)
    if not isinstance(manifest["source"], dict):
        raise ManifestError("'source' must be an object", file=path)
    try:
        config_class(ver).from_dict(manifest["config"])
    except ConfigError as exc:
        raise ManifestError(f"config: {exc}", file=path) from None


def config_class(format_version: int):
    """The config class of a (known) format version's codec."""
    if format_version == FORMAT_VERSION_V2:
        from ..codec_v2.config import CodecV2Config

        return CodecV2Config
    return HyperCompressionConfig


def _validate(manifest: Any, path: str, limits: LoadLimits) -> dict[str, _Spec]:
    _check_top(manifest, path)
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
        spec, decoded = _entry_spec(name, e, shards, path, limits, manifest["format_version"])
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
        f, size = open_regular(path, ManifestError, "manifest")
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
