"""The one place that counts a checkpoint: tensors compressed and kept raw, parameters,
the summed absolute error and the MAE over every element (raw tensors count 0), and
the size ratio. From codec entries (a checkpoint in memory, a shard being written)
or from a manifest (a committed checkpoint), with the same keys and numbers."""

from __future__ import annotations

from typing import Iterable, Mapping


def shape_numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def tally(tensors: Iterable[tuple[int, bool, float]]) -> dict:
    """Counts over ``(numel, raw, abs_error_sum)`` per tensor: ``tensors``,
    ``compressed_tensors``, ``raw_tensors``, ``params``, ``compressed_params``,
    ``abs_error_sum`` (compressed tensors only) and ``mae`` (over all params)."""
    count = comp = params = comp_params = 0
    err = 0.0
    for numel, raw, abs_error_sum in tensors:
        count += 1
        params += numel
        if not raw:
            comp += 1
            comp_params += numel
            err += float(abs_error_sum)
    return {
        "tensors": count,
        "compressed_tensors": comp,
        "raw_tensors": count - comp,
        "params": params,
        "compressed_params": comp_params,
        "abs_error_sum": err,
        "mae": err / params if params else 0.0,
    }


def entry_stats(entries: Iterable) -> dict:
    """:func:`tally` of codec entries (``CompressedTensor`` / ``RawTensor``)."""
    return tally((e.numel, e.raw, e.abs_error_sum) for e in entries)


def manifest_stats(manifest: Mapping) -> dict:
    """:func:`tally` of a manifest's ``tensors`` table (validated: shape, raw, abs_error_sum)."""
    return tally((shape_numel(m["shape"]), bool(m["raw"]), 0.0 if m["raw"] else m["abs_error_sum"])
                 for m in manifest["tensors"].values())


def size_ratio(original_bytes: int, stored_bytes: int) -> float:
    """Source bytes over stored bytes; 0.0 when nothing is stored."""
    return original_bytes / stored_bytes if stored_bytes else 0.0
