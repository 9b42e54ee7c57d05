"""Splitting a checkpoint's tensors into shards balanced by element count.

Pure functions over the tensor index (names, shapes, sizes), so the driver plans
without reading any tensor data. Longest-processing-time-first: tensors in
descending element count each go to the shard with the fewest elements so far;
inside a shard the tensors keep the source order. Deterministic for a given
index and shard count.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass
from typing import Sequence

SHARD_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    names: tuple[str, ...]
    numel: int
    nbytes: int

    @property
    def filename(self) -> str:
        return f"shard-{self.index + 1:05d}-of-{self.count:05d}{SHARD_SUFFIX}"

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


def plan_shards(index: Sequence, n_shards: int) -> list[Shard]:
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
