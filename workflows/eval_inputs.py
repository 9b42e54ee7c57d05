"""What a zoo run's evaluation tasks load, resolved on the node that runs them.

The driver never hands a Ray evaluation task one of its own paths: on a cluster
the task runs on a node that cannot see them (another machine, a pod with its own
``/tmp``). Each task gets references instead, and resolves them where it runs:

* :class:`CheckpointFromStore`: the committed checkpoint's store location and the
  sha256 of its manifest. Fetched once per node into the node's cache (complete or
  not at all, verified on reuse: :mod:`workflows.checkpoint_cache`), checked by the
  compressor's loader, then loaded like any compressed directory. A commit other
  than the one the driver evaluates is refused
  (:class:`~workflows.errors.CheckpointChangedError`).
* :class:`SourceOnNode`: the zoo source URI and the sha256 the commit is keyed
  under. Resolved as the shard tasks resolve it; a source whose bytes differ is
  refused (:class:`~compressor.errors.SourceChangedError`), never compared against.
* :class:`ZooDatasetsOnNode`: the zoo's dataset entries. The synthetic set is
  generated into the node's cache; a dataset given by path must be visible on the
  node (shared storage). The task also checks the annotations' hash
  (``eval_jobs.dataset_locator``).

All three are frozen dataclasses: Ray pickles them into the task, and their repr
keys the worker's model cache.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from .zoo import dataset_value, resolve_source


@dataclass(frozen=True)
class CheckpointFromStore:
    """A committed checkpoint in the store, loaded on the worker (a ``ModelLoader``)."""

    store: dict  # Store.spec(): no credentials, workers take theirs from their environment
    prefix: str
    manifest_sha256: str
    cache_dir: str | None = None

    def fetch(self) -> Path:
        """This node's copy, downloaded and verified once, checked again on each reuse
        (:func:`workflows.checkpoint_cache.cached_checkpoint`: the one cache that
        ``birkhoff eval s3://...`` and ``load_model`` use too)."""
        from .checkpoint_cache import cached_checkpoint
        from .store import open_store

        return cached_checkpoint(open_store(self.store), self.prefix, self.manifest_sha256, self.cache_dir)

    def __call__(self, uri: str):
        from eval_jobs.models import default_loader

        return default_loader(str(self.fetch()))


@dataclass(frozen=True)
class SourceOnNode:
    """The original model, resolved on the worker from its zoo source URI and checked
    against the sha256 the commit is keyed under (a ``ModelLoader``)."""

    source: str
    source_sha256: str
    revision: str | None = None
    cache_dir: str | None = None
    s3_endpoint_url: str | None = None

    def local_path(self) -> str:
        from compressor.sources import open_source

        from .shard_task import check_source_sha256

        local = resolve_source(self.source, cache_dir=self.cache_dir, s3_endpoint_url=self.s3_endpoint_url)
        check_source_sha256(open_source(local, revision=self.revision), self.source_sha256, self.source)
        return local[len("hf://"):].partition("@")[0] if local.startswith("hf://") else local

    def __call__(self, uri: str):
        from eval_jobs.models import default_loader

        return default_loader(self.local_path())


@dataclass(frozen=True)
class ZooDatasetsOnNode:
    """The zoo's datasets on the worker (an ``eval_jobs`` ``DatasetLocator``)."""

    entries: tuple[tuple[str, str], ...]  # (dataset name, its zoo entry)
    base_dir: str  # the zoo file's folder: relative dataset paths are relative to it
    cache_dir: str | None = None

    def __call__(self, spec):
        from eval_jobs.datasets import DatasetSpec
        from eval_jobs.errors import DatasetError, DatasetSpecError

        entry = dict(self.entries).get(spec.name)
        if entry is None:
            raise DatasetSpecError(f"dataset {spec.name!r} is not one of the zoo's {[n for n, _ in self.entries]}")
        local = DatasetSpec.parse(dataset_value(spec.name, entry, Path(self.base_dir), cache_dir=self.cache_dir))
        for path in (local.annotations, local.images) + ((local.detections,) if local.detections else ()):
            if not Path(path).exists():
                raise DatasetError(f"dataset {spec.name} is not visible on node {socket.gethostname()}: a dataset "
                                   f"given by path must be on storage every node mounts", file=path)
        return local
