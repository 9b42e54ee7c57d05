"""The one way a checkpoint is written: shards, then the extra files, then the manifest
last, through a sink.

``CheckpointWriter`` stages every file in a local folder and hands it to its sink:

* :class:`FolderSink`: the staging folder is the checkpoint; ``commit`` publishes
  it with one no-clobber rename (:func:`compressor.destination.publish_directory`).
  ``CompressedCheckpoint.save`` writes through it.
* a store sink (``workflows.commit.StoreSink``): each shard is uploaded as it is
  written (by the Ray task that compressed it), and ``commit`` uploads the extra
  files and the manifest under the commit lease with conditional writes.

A shard is hashed once, while it is written (:func:`compressor.format.write_shard`);
its record (``file``, ``bytes``, ``sha256``) travels with it to the sink and into
the manifest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch

from . import format as fmt
from . import quant_primitives as qp
from .backends import Kernels, resolve_backend
from .codec import TensorEntry
from .codecs import format_version_of
from .config import HyperCompressionConfig  # noqa: F401  (annotations)


class CheckpointSink(Protocol):
    def put_shard(self, path: Path, record: dict) -> None:
        """Take a finished shard file (``record``: its file name, bytes and sha256)."""

    def commit(self, staged: Path, manifest: dict) -> Any:
        """Publish the manifest (written in ``staged`` beside the extra files it
        lists) after every shard; what it returns, ``finish`` returns."""


class FolderSink:
    """A local folder: the staging folder becomes the checkpoint in one rename."""

    def __init__(self, destination: Path, *, overwrite: bool, replaceable: Callable[[Any], str | None]):
        self.destination = Path(destination)
        self.overwrite = overwrite
        self.replaceable = replaceable

    def put_shard(self, path: Path, record: dict) -> None:
        pass  # written in place: the staging folder is what gets published

    def commit(self, staged: Path, manifest: dict) -> Path:
        from . import destination as dest

        dest.publish_directory(staged, self.destination, overwrite=self.overwrite, replaceable=self.replaceable)
        return self.destination


def stored_tensor(entry: TensorEntry, kernels: Kernels | None = None) -> torch.Tensor:
    """What a shard holds for an entry: the packed index stream, or the raw tensor."""
    return fmt.stored_tensor(entry, (kernels or resolve_backend("auto").kernels).pack_bits)


def stored_nbytes(entry: TensorEntry) -> int:
    """Bytes an entry takes in a shard (known without packing it)."""
    if entry.raw:
        return entry.tensor.numel() * entry.tensor.element_size()
    if hasattr(entry, "stored_bytes"):  # codec v2
        return entry.stored_bytes
    return qp.packed_nbytes(entry.n_points, entry.bits)


def build_manifest(config: "HyperCompressionConfig | CodecV2Config", source_info: dict, tensor_meta: Mapping[str, dict],
                   shard_records: Iterable[dict], extra_files: Mapping[str, dict],
                   committed_at: str | None = None) -> dict:
    """``committed_at``: the commit's UTC time (ISO 8601), recorded by a store commit
    in the producer block (readers of this format version accept the extra key)."""
    from . import __version__

    producer = {"name": "birkhoff", "version": __version__}
    if committed_at is not None:
        producer["committed_at"] = committed_at
    version = format_version_of(config)
    return {
        "format": fmt.FORMAT_NAME,
        "format_version": version,
        "producer": producer,
        "codec_version": fmt.CODEC_OF_FORMAT[version],
        "config": config.to_dict(),
        "source": dict(source_info),
        "extra_files": dict(extra_files),
        "shards": {r["file"]: {"bytes": r["bytes"], "sha256": r["sha256"]} for r in shard_records},
        "tensors": dict(tensor_meta),
    }


def write_extra_files(directory, extra: Mapping[str, "Path | bytes"], tensor_shards: Mapping[str, str],
                      format_version: int | None = None) -> dict:
    """Write a checkpoint's extra files into ``directory``; returns the manifest's
    ``extra_files`` records (bytes and sha256 of what was written).

    ``extra``: the source's architecture, tokenizer and processor files (``name ->
    path or bytes``); ``tensor_shards``: ``tensor -> shard file``. A Hugging Face
    config gets its ``quantization_config``, its original copy and the weights
    index (:func:`compressor.hf_files.checkpoint_files`).
    """
    from .hf_files import checkpoint_files

    directory = Path(directory)
    records = {}
    for name, content in checkpoint_files(extra, tensor_shards, format_version).items():
        if isinstance(content, (bytes, bytearray)):
            records[name] = fmt.write_extra_bytes(bytes(content), directory, name)
        else:
            records[name] = fmt.copy_extra_file(Path(content), directory, name)
    return records


class CheckpointWriter:
    """Writes one checkpoint into ``staging`` and hands its files to ``sink``.

    ``write_shard`` for shards this process compressed, ``add_shard`` for shards
    already in the sink (written by a worker, kept from an earlier commit or
    resumed), then ``finish`` once: extra files, manifest, ``sink.commit``."""

    def __init__(self, staging, sink: CheckpointSink, kernels: Kernels | None = None):
        self.staging = Path(staging)
        self.sink = sink
        self.kernels = kernels
        self.records: dict[str, dict] = {}  # shard file -> {"file", "bytes", "sha256"}
        self.tensor_meta: dict[str, dict] = {}  # tensor -> manifest entry
        self._finished = False

    def write_shard(self, filename: str, entries: Mapping[str, TensorEntry], *,
                    name_from_sha256: Callable[[str], str] | None = None) -> tuple[dict, dict[str, dict]]:
        """Write the entries as one shard (hashed while written) and give it to the
        sink. ``name_from_sha256``: a content-addressed name, known once the bytes
        are (the staged file is renamed to it). Returns the record and the manifest
        entries of its tensors."""
        stored = {n: stored_tensor(e, self.kernels) for n, e in entries.items()}
        record = fmt.write_shard(self.staging, filename, stored)
        if name_from_sha256 is not None:
            final = name_from_sha256(record["sha256"])
            os.replace(self.staging / filename, self.staging / final)
            record["file"] = final
        meta = {n: fmt.manifest_entry(e, record["file"], stored[n]) for n, e in entries.items()}
        del stored
        self.sink.put_shard(self.staging / record["file"], record)
        self.add_shard(record, meta)
        return record, meta

    def add_shard(self, record: dict, tensor_meta: Mapping[str, dict]) -> None:
        """A shard already in the sink, with the manifest entries of its tensors."""
        self.records[record["file"]] = {"file": record["file"], "bytes": record["bytes"], "sha256": record["sha256"]}
        self.tensor_meta.update(tensor_meta)

    def finish(self, config: "HyperCompressionConfig | CodecV2Config", source_info: dict, extra_files: Mapping[str, "Path | bytes"],
               tensor_order: Iterable[str], committed_at: str | None = None) -> tuple[dict, Any]:
        """Write the extra files and the manifest (tensors in ``tensor_order``, every
        one of which must be in a shard by now) and commit through the sink.
        Returns the manifest and what the sink's commit returned."""
        if self._finished:
            raise RuntimeError("CheckpointWriter.finish called twice")
        self._finished = True
        meta = {n: self.tensor_meta[n] for n in tensor_order}
        extras = write_extra_files(self.staging, extra_files, {n: m["shard"] for n, m in meta.items()},
                                   format_version_of(config))
        manifest = build_manifest(config, source_info, meta, self.records.values(), extras, committed_at)
        fmt.write_manifest(self.staging, manifest)
        return manifest, self.sink.commit(self.staging, manifest)
