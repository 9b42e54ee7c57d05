"""Whole-checkpoint compression and the ``CompressedCheckpoint`` container.

``compress`` takes a model, a state dict or a source path and never modifies its
input. ``CompressedCheckpoint.save`` writes shards, copies the architecture
files and commits with the manifest last, all inside a temporary sibling
directory that is published by an atomic no-clobber rename
(:mod:`compressor.destination`), so no reader ever sees half a checkpoint, a
directory that appears at the destination meanwhile is never touched, and an
existing destination is only replaced when asked to and when it is a Birkhoff
checkpoint (never another folder, never the source).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from . import destination as dest
from . import format as fmt
from .backends import Kernels, resolve_backend
from .checkpoint_writer import (CheckpointWriter, FolderSink, build_manifest, stored_nbytes, stored_tensor,
                                write_extra_files)
from .codec import CompressedTensor, RawTensor, TensorEntry, compress_tensor
from .config import HyperCompressionConfig
from .errors import CheckpointExistsError, ConfigError, DestinationError, FormatError, SourceError, _Located
from .sources import CheckpointSource, open_source
from .stats import entry_stats

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


__all__ = ["CheckpointExistsError", "CompressedCheckpoint", "compress", "compress_tensors", "check_destination",
           "replaceable_checkpoint", "directory_bytes", "build_manifest", "stored_tensor", "write_extra_files"]


def replaceable_checkpoint(path) -> str | None:
    """Why the directory ``path`` may NOT be replaced by ``overwrite`` (``None``: it
    may): it must be a committed Birkhoff checkpoint (a manifest the loader
    accepts) holding nothing but the files its manifest lists, all regular files.
    Reads the manifest only (bounded by the loader's caps), no shard."""
    try:
        manifest = fmt.read_manifest(path)
    except FormatError as exc:
        return f"{type(exc).__name__}: {exc.detail}"
    listed = {fmt.MANIFEST_NAME} | set(manifest["shards"]) | set(manifest["extra_files"])
    foreign = []
    try:
        for entry in os.scandir(path):
            if entry.name not in listed or not entry.is_file(follow_symlinks=False):
                foreign.append(entry.name)
                if len(foreign) >= 5:
                    break
    except OSError as exc:
        return f"cannot list it: {exc.strerror}"
    if foreign:
        return f"it also holds {sorted(foreign)}, which are not part of the checkpoint"
    return None


def check_destination(directory, *, overwrite: bool = False, protected=()) -> list[str]:
    """Refuse a checkpoint destination before any work (see :meth:`CompressedCheckpoint.save`):
    a parent that is a file or not writable, a path that is, contains or lies in
    one of ``protected`` (the source's files and folder), or an existing non-empty
    destination unless ``overwrite`` and it is a Birkhoff checkpoint. Returns the
    parent directories the save will create."""
    return dest.check_directory_destination(directory, overwrite=overwrite, protected=protected,
                                            replaceable=replaceable_checkpoint)


def _kernels(backend) -> Kernels:
    return backend if isinstance(backend, Kernels) else resolve_backend(backend).kernels


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="param", unit_scale=True, desc=desc, disable=not enabled, leave=False)


def compress_tensors(
    source: CheckpointSource,
    names: Iterable[str] | None,
    config: HyperCompressionConfig,
    backend: str | Kernels = "auto",
    progress: bool = False,
    timings: dict | None = None,
) -> dict[str, TensorEntry]:
    """Compress the named tensors of a source (all when ``names`` is None), reading
    only those tensors. ``timings['seconds']`` accumulates the codec time."""
    from .codec_v2.config import CodecV2Config

    v2 = isinstance(config, CodecV2Config)
    if v2:
        from .checkpoint_v2 import encode_one
        from .codec_v2.kernels import resolve

        kernels = resolve(backend if isinstance(backend, str) else getattr(backend, "name", "auto"))
    else:
        kernels = _kernels(backend)
    index = {i.name: i for i in source.tensor_index()}
    wanted = list(index) if names is None else list(names)
    total = sum(index[n].numel for n in wanted if n in index)
    out: dict[str, TensorEntry] = {}
    spent = 0.0
    with _progress(total, progress, "compress") as bar:
        for name, tensor in source.read(wanted):
            bar.set_postfix_str(name[-48:], refresh=False)
            t0 = time.perf_counter()
            if v2:
                out[name] = encode_one(name, tensor, config, kernels, file=index[name].file)
            else:
                out[name] = compress_tensor(name, tensor, config, kernels, file=index[name].file)
            spent += time.perf_counter() - t0
            bar.update(index[name].numel)
    if timings is not None:
        timings["seconds"] = timings.get("seconds", 0.0) + spent
    return {n: out[n] for n in wanted}


def check_source_values(source: CheckpointSource, config: HyperCompressionConfig) -> None:
    """Check every tensor's values (NaN/Inf, magnitudes the codec cannot take) in
    one cheap pass before any is compressed, so such a source fails in seconds,
    naming the file and the tensor, not after the whole compression."""
    from .codec import value_problem

    index = {i.name: i for i in source.tensor_index()}
    for name, tensor in source.read(None):
        value_problem(name, tensor, config, file=index[name].file)


def directory_bytes(directory) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


@dataclass
class CompressedCheckpoint:
    entries: dict[str, TensorEntry]
    config: "HyperCompressionConfig | CodecV2Config"
    source_info: dict = field(default_factory=dict)
    extra_files: dict[str, Path | bytes] = field(default_factory=dict)
    compress_seconds: float = 0.0
    # the source's folder and files: a save never writes over, into or around them
    source_paths: tuple = ()

    # -- saving ------------------------------------------------------------------
    def save(self, directory, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
             backend: str | Kernels = "auto", protected=()) -> dict:
        """Write the checkpoint; returns the manifest. Atomic at directory level.

        Never replaces anything unless ``overwrite``, and then only a Birkhoff
        checkpoint (swapped out in one rename, removed after). The source this
        checkpoint came from (``source_paths``) and ``protected`` paths are never
        the destination, inside it or around it. Temporaries of killed earlier
        saves to the same destination are removed first."""
        if not (isinstance(max_shard_bytes, int) and not isinstance(max_shard_bytes, bool) and max_shard_bytes > 0):
            raise ConfigError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
        dst = Path(os.path.abspath(os.fspath(directory)))
        guard = list(self.source_paths) + list(protected)
        missing = check_destination(dst, overwrite=overwrite, protected=guard)
        made = dest.make_parents(missing)
        dest.clean_stale_temps(dst.parent, dst.name)
        tmp = dst.parent / dest.temp_name(dst.name)
        try:
            tmp.mkdir()
        except OSError as exc:
            dest.remove_created(made)
            raise DestinationError(f"cannot create a temporary directory next to the destination: "
                                   f"{exc.strerror}", file=str(dst)) from None
        try:
            kernels = _kernels(backend)
            writer = CheckpointWriter(tmp, FolderSink(dst, overwrite=overwrite, replaceable=replaceable_checkpoint),
                                      kernels)
            sizes = {n: stored_nbytes(e) for n, e in self.entries.items()}
            for shard_name, names in fmt.plan_shards(sizes, max_shard_bytes).items():
                writer.write_shard(shard_name, {n: self.entries[n] for n in names})
            # manifest in the source's tensor order
            manifest, _ = writer.finish(self.config, self.source_info, self.extra_files, list(self.entries))
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            dest.remove_created(made)
            if isinstance(exc, _Located) and exc.file and exc.file.startswith(str(tmp)):
                # name the destination, not a temporary that no longer exists
                raise type(exc)(exc.detail, file=str(dst) + exc.file[len(str(tmp)):], tensor=exc.tensor) from None
            raise
        return manifest

    # -- loading -----------------------------------------------------------------
    @classmethod
    def load(cls, directory, *, limits: "fmt.LoadLimits | None" = None, verify: bool = True,
             names: Iterable[str] | None = None) -> "CompressedCheckpoint":
        """Validate and load a compressed directory (see :mod:`compressor.format`), or
        the checkpoint a URI names (``s3://``, ``models:/``: :mod:`compressor.uris`)."""
        from .uris import resolve_checkpoint

        directory = resolve_checkpoint(directory)
        limits = limits or fmt.LoadLimits()
        manifest = fmt.read_manifest(directory, limits)
        stored = fmt.load_stored_tensors(directory, manifest, names=names, limits=limits, verify=verify)
        entries: dict[str, TensorEntry] = {}
        for name, m in manifest["tensors"].items():
            if name not in stored:
                continue
            data = stored[name]
            if m["raw"]:
                entries[name] = RawTensor(name, data, m.get("raw_reason", "raw"))
            elif m.get("codec") == "v2":
                from .codec_v2.entry import V2Entry

                entries[name] = V2Entry(name, data, float(m["abs_error_sum"]))
            else:
                theta = np.asarray(data)
                entries[name] = CompressedTensor(
                    name=name, shape=tuple(m["shape"]), dtype=m["dtype"], layout=m["layout"], pad=m["pad"],
                    cx=float(m["centroid"][0]), cy=float(m["centroid"][1]), radius=float(m["radius"]),
                    box_size=float(m["box_size"]), U=int(m["U"]), K=int(m["K"]), bits=int(m["bits"]),
                    mae=float(m["mae"]), abs_error_sum=float(m["abs_error_sum"]), theta=theta,
                )
        extra = {n: directory / n for n in manifest.get("extra_files", {})}
        config = fmt.config_class(manifest["format_version"]).from_dict(manifest["config"])
        return cls(entries, config, manifest.get("source", {}), extra)

    # -- views -------------------------------------------------------------------
    def state_dict(self, backend: str | Kernels = "auto") -> dict[str, torch.Tensor]:
        """Decoded tensors under their original names, shapes and dtypes."""
        kernels = _kernels(backend)
        return {n: e.decode(kernels) for n, e in self.entries.items()}

    def stats(self) -> dict:
        return dict(entry_stats(self.entries.values()), seconds=self.compress_seconds)



def compress(source, config: "HyperCompressionConfig | CodecV2Config | None" = None, *,
             backend: str | Kernels = "auto", progress: bool = False) -> CompressedCheckpoint:
    """Compress a model (``nn.Module``), a state dict, or a checkpoint path / Hub id,
    with the paper's codec (a ``HyperCompressionConfig``, the default) or codec v2
    (a :class:`~compressor.codec_v2.CodecV2Config`).

    Buffers of a module and non-float tensors stay raw; the input is never modified.
    """
    from .codec_v2.config import CodecV2Config

    if isinstance(config, CodecV2Config):
        from .checkpoint_v2 import compress_v2

        return compress_v2(source, config, progress=progress,
                           backend=backend if isinstance(backend, str) or hasattr(backend, "value") else "auto")
    config = config or HyperCompressionConfig()
    kernels = _kernels(backend)
    timings: dict = {}
    if isinstance(source, torch.nn.Module):
        sd, extra, info, buffers = module_parts(source)
        entries = _compress_mapping(sd, config, kernels, progress, timings, buffers)
        return CompressedCheckpoint(entries, config, info, extra, timings.get("seconds", 0.0))
    if isinstance(source, Mapping):
        info = state_dict_info(source)
        entries = _compress_mapping(source, config, kernels, progress, timings, set())
        return CompressedCheckpoint(entries, config, info, {}, timings.get("seconds", 0.0))
    src = open_source(source)
    entries = compress_tensors(src, None, config, kernels, progress, timings)
    info = src.describe()
    info["sha256"] = src.source_hash()
    extra = {name: f for name, f in src.extra_file_map().items()}
    return CompressedCheckpoint(entries, config, info, extra, timings.get("seconds", 0.0),
                                tuple(src.protected_paths()))


def module_parts(module: torch.nn.Module) -> tuple[dict, dict, dict, set]:
    """What a module source gives a codec: its state dict, extra files (a Hugging Face
    config as ``config.json``), the source info and its buffers' names (kept raw)."""
    sd = module.state_dict()
    extra = {}
    cfg = getattr(module, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        extra["config.json"] = cfg.to_json_string().encode()
    info = {"kind": "module", "class": type(module).__name__,
            "weight_bytes": sum(t.numel() * t.element_size() for t in sd.values())}
    return sd, extra, info, {n for n, _ in module.named_buffers()}


def state_dict_info(sd: Mapping) -> dict:
    """The source info of a state dict, whose every value must be a tensor."""
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise SourceError(f"state dict value is {type(v).__name__}, not a tensor", tensor=str(k))
    return {"kind": "state_dict", "weight_bytes": sum(t.numel() * t.element_size() for t in sd.values())}


def _compress_mapping(sd, config, kernels, progress, timings, buffers) -> dict[str, TensorEntry]:
    out = {}
    spent = 0.0
    with _progress(sum(t.numel() for t in sd.values()), progress, "compress") as bar:
        for name, t in sd.items():
            t0 = time.perf_counter()
            out[name] = compress_tensor(name, t, config, kernels, is_buffer=name in buffers)
            spent += time.perf_counter() - t0
            bar.update(t.numel())
    timings["seconds"] = spent
    return out
