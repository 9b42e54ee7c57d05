"""Splitting a checkpoint's tensors into Ray work units balanced by element count;
each unit becomes one file shard of the checkpoint (``Shard`` below is the planned
unit; ``compressor.format.plan_shards`` plans files of a local save instead).

Pure functions over the tensor index (names, shapes, sizes), so the driver plans
without reading any tensor data. Longest-processing-time-first: tensors in
descending element count each go to the shard with the fewest elements so far;
inside a shard the tensors keep the source order. Deterministic for a given
index and shard count.

A shard's file name is ``shard-00001-of-00004-<sha256[:24]>.safetensors``: its
place in the plan for people, and the hash of its bytes so that no two plans
(two runs with different worker counts) ever store different bytes under one
name in a shared store.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass
from typing import Sequence

SHARD_SUFFIX = ".safetensors"
_NAME_HASH_CHARS = 24  # 96 bits: names of different bytes never meet


def shard_filename(stem: str, sha256: str) -> str:
    """The stored name of a shard: its stem and the sha256 of its bytes."""
    return f"{stem}-{sha256[:_NAME_HASH_CHARS]}{SHARD_SUFFIX}"


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    names: tuple[str, ...]
    numel: int
    nbytes: int

    @property
    def stem(self) -> str:
        """Place in the plan (the file name adds the hash of the bytes, see :func:`shard_filename`)."""
        return f"shard-{self.index + 1:05d}-of-{self.count:05d}"

    @property
    def names_hash(self) -> str:
        return hashlib.sha256("\0".join(self.names).encode()).hexdigest()[:16]


def shard_count(total_bytes: int, n_tensors: int, workers: int, max_shard_bytes: int) -> int:
    """At least one shard per worker (so all of them work) and enough shards that
    the average holds at most ``max_shard_bytes`` of source data (so a task's
    memory is bounded by its shard; balancing may put one tensor more on a
    shard); never more shards than tensors."""
    if n_tensors <= 0:
        return 0
    by_size = math.ceil(total_bytes / max_shard_bytes) if max_shard_bytes > 0 else 1
    return max(1, min(n_tensors, max(workers, by_size)))


def plan_work_units(index: Sequence, n_shards: int) -> list[Shard]:
    """``index``: objects with ``name``, ``numel`` and ``nbytes`` (``TensorInfo``)."""
    if not index:
        return []
    n_shards = max(1, min(n_shards, len(index)))
    order = {t.name: i for i, t in enumerate(index)}
    heap = [(0, b) for b in range(n_shards)]
    members: list[list] = [[] for _ in range(n_shards)]
    for t in sorted(index, key=lambda t: (-t.numel, order[t.name])):
        load, b = heapq.heappop(heap)
        members[b].append(t)
        heapq.heappush(heap, (load + max(int(t.numel), 1), b))
    groups = [sorted(m, key=lambda t: order[t.name]) for m in members if m]
    # number shards by their first tensor's position: stable, readable file names
    groups.sort(key=lambda g: order[g[0].name])
    count = len(groups)
    return [
        Shard(i, count, tuple(t.name for t in g), sum(int(t.numel) for t in g), sum(int(t.nbytes) for t in g))
        for i, g in enumerate(groups)
    ]


def work_units_from_manifest(index: Sequence, manifest: dict) -> list[Shard] | None:
    """The plan a committed manifest was written with (tensors grouped by the shard
    each is stored in, shards in manifest order), so a repair recomputes only the
    shards that are missing or damaged. None when the manifest does not list
    exactly the source's tensors."""
    by_name = {t.name: t for t in index}
    tensors = manifest.get("tensors", {})
    if set(tensors) != set(by_name):
        return None
    order = {t.name: i for i, t in enumerate(index)}
    groups: dict[str, list] = {name: [] for name in manifest.get("shards", {})}
    for name, entry in tensors.items():
        if entry.get("shard") not in groups:
            return None
        groups[entry["shard"]].append(by_name[name])
    members = [sorted(g, key=lambda t: order[t.name]) for g in groups.values() if g]
    count = len(members)
    return [Shard(i, count, tuple(t.name for t in g), sum(int(t.numel) for t in g), sum(int(t.nbytes) for t in g))
            for i, g in enumerate(members)]
