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

Format version 2 is the same layout for codec v2 (``codec_version`` 2, ``config``
a ``CodecV2Config``): a compressed entry is ``V2Entry.meta()`` (codec, shape,
dtype, role, q, stored_bytes, figures) and its shard array is the tensor's
self-validating byte form (``compressor.codec_v2``), 1-D uint8.

In a shard a compressed tensor is a 1-D uint8 array of its bit-packed indices
(``ceil(n_points * bits / 8)`` bytes); a raw tensor is stored as itself. A
tensor's sha256 is over its stored bytes (C order, little endian).

Loading trusts nothing: :func:`read_manifest` checks every field and every size
against :class:`LoadLimits` before anything is allocated, and
:func:`load_stored_tensors` parses each safetensors header itself and compares it
with the manifest before reading a byte of data. Every error is a
:class:`~compressor.errors.FormatError` subclass naming the file and the tensor.

The package's modules, one job each: :mod:`.schema` (names, versions, limits, dtype
tables), :mod:`.fsio` (atomic writes, syncs, safe opens, hashing), :mod:`.manifest`
(entries, writing, the validating reader) and :mod:`.shards` (writing, planning and
reading shard files). Callers use the names below (``from compressor import format
as fmt``).
"""

from __future__ import annotations

from .manifest import config_class, manifest_entry, parse_manifest, read_manifest, write_manifest
from .schema import (
    CODEC_OF_FORMAT,
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMAT_VERSION_V2,
    MANIFEST_NAME,
    SHARD_SUFFIX,
    LoadLimits,
    is_plain_name,
    json_nodes,
    stored_tensor,
    tensor_sha256,
)
from .shards import (
    copy_extra_file,
    load_stored_tensors,
    plan_shards,
    verify_extra_files,
    write_extra_bytes,
    write_shard,
)

__all__ = [
    "CODEC_OF_FORMAT", "FORMAT_NAME", "FORMAT_VERSION", "FORMAT_VERSION_V2", "MANIFEST_NAME", "config_class", "SHARD_SUFFIX", "LoadLimits", "copy_extra_file",
    "is_plain_name", "json_nodes", "load_stored_tensors", "manifest_entry", "parse_manifest", "plan_shards",
    "read_manifest", "stored_tensor", "tensor_sha256", "verify_extra_files", "write_extra_bytes", "write_manifest",
    "write_shard",
]
