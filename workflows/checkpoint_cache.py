"""This node's cache of committed checkpoints, keyed by the sha256 of their manifest.

One cache serves every reader that loads a checkpoint from the store: the zoo
run's evaluation tasks (:class:`workflows.eval_inputs.CheckpointFromStore`), and
``birkhoff eval | inspect | decompress`` / ``compressor.load_model`` given an
``s3://bucket/prefix/`` URI (the ``s3`` entry point of ``birkhoff.uri_resolvers``,
:func:`fetch_s3`) or a ``models:/`` URI (:mod:`workflows.registry`).

A checkpoint is cached under ``<cache>/checkpoints/<manifest sha256[:32]>``:

* complete or not at all: it is downloaded into a hidden temporary folder, checked
  by the compressor's loader (:func:`workflows.commit.fetch_checkpoint`), and
  renamed into place; concurrent fetches on one node each use their own temporary
  folder and the first rename wins;
* verified on every reuse: the manifest's sha256 against the key, every file it
  lists against its recorded size and sha256. A cached copy that differs (a file
  edited, truncated or deleted) is moved aside and fetched again, with a warning;
  never loaded.

A hit costs one GET of the manifest (the key is the hash of its bytes) and a hash
of the cached files; no shard is downloaded again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path

from compressor.format import MANIFEST_NAME
from compressor.format.fsio import atomic_directory

from .errors import CheckpointChangedError, StoreError
from .redaction import redact_uri

log = logging.getLogger(__name__)

SUBDIR = "checkpoints"
KEY_CHARS = 32  # of the manifest's sha256: the cache folder's name


def cache_root(cache_dir=None) -> Path:
    from .zoo import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir()


def cached_dir(manifest_sha256: str, cache_dir=None) -> Path:
    return cache_root(cache_dir) / SUBDIR / manifest_sha256[:KEY_CHARS]


def verify_cached(directory: Path, manifest_sha256: str) -> list[str]:
    """What differs between a cached copy and the commit it is keyed under (empty: none)."""
    from compressor import format as fmt
    from compressor.errors import BirkhoffError
    from compressor.format.fsio import hash_file

    from .commit import MANIFEST, files_of

    path = directory / MANIFEST
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return [f"{MANIFEST} unreadable: {exc.strerror or exc}"]
    if hashlib.sha256(raw).hexdigest() != manifest_sha256:
        return [f"{MANIFEST} has sha256 {hashlib.sha256(raw).hexdigest()[:16]}..., the cache key is "
                f"{manifest_sha256[:16]}..."]
    try:
        manifest = fmt.parse_manifest(raw, str(path))
    except BirkhoffError as exc:
        return [f"{MANIFEST} invalid: {exc}"]
    problems = []
    for name, rec in sorted(files_of(manifest).items()):
        p = directory / name
        try:
            size = p.stat().st_size
        except OSError:
            problems.append(f"{name} is missing")
            continue
        if size != rec["bytes"]:
            problems.append(f"{name} is {size} bytes, the manifest records {rec['bytes']}")
            continue
        got = hash_file(str(p))[1]
        if got != rec["sha256"]:
            problems.append(f"{name} has sha256 {got[:16]}..., the manifest records {rec['sha256'][:16]}...")
    return problems


def _discard(target: Path, problems: list[str]) -> None:
    """Move a damaged copy out of the way (a reader that holds it open keeps its files)."""
    log.warning("cached checkpoint %s differs from its commit (%s); fetching it again", target,
                "; ".join(problems[:3]))
    aside = target.with_name(f".{target.name}.bad-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(target, aside)
    except FileNotFoundError:  # another reader on this node moved it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def cached_checkpoint(store, prefix: str, manifest_sha256: str, cache_dir=None) -> Path:
    """This node's verified copy of the commit under ``prefix`` whose manifest has this
    sha256; downloaded when absent or damaged. A commit other than that one in the
    store raises :class:`~workflows.errors.CheckpointChangedError`."""
    from .commit import MANIFEST, fetch_checkpoint

    target = cached_dir(manifest_sha256, cache_dir)
    if (target / MANIFEST).is_file():
        problems = verify_cached(target, manifest_sha256)
        if not problems:
            log.debug("checkpoint %s: cache hit %s", store.url(prefix), target)
            return target
        _discard(target, problems)
    target.parent.mkdir(parents=True, exist_ok=True)
    # complete or not at all; another reader on this node that finishes first wins (the same commit)
    with atomic_directory(str(target.parent), target.name) as tmp:
        fetch_checkpoint(store, prefix, tmp, manifest_sha256=manifest_sha256)
    log.info("checkpoint %s fetched into %s on %s", store.url(prefix), target, socket.gethostname())
    return target


def split_store_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> (``s3://bucket``, ``a/b/``): the store and the checkpoint's
    prefix (a URI of its ``manifest.json`` names its folder)."""
    if not uri.startswith("s3://"):
        raise StoreError(f"not an s3:// checkpoint URI: {redact_uri(uri)}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    key = key.strip("/")
    if key == MANIFEST_NAME or key.endswith("/" + MANIFEST_NAME):
        key = key[:-len(MANIFEST_NAME)].rstrip("/")
    if not bucket or not key:
        raise StoreError(f"{redact_uri(uri)}: expected s3://BUCKET/PREFIX/ of a committed checkpoint "
                         f"(the folder that holds its {MANIFEST_NAME})")
    return f"s3://{bucket}", key + "/"


def fetch_store_uri(uri: str, cache_dir=None, *, endpoint_url: str | None = None,
                    manifest_sha256: str | None = None) -> Path:
    """The verified local copy of the committed checkpoint at a store URI.

    Reads the manifest's bytes (one GET), hashes them, and returns the cached copy
    of that commit, fetching it on a miss. ``manifest_sha256``: the commit the
    caller expects (a registry version records it); another commit under the URI
    raises :class:`~workflows.errors.CheckpointChangedError` instead of loading
    something else. The endpoint comes from ``endpoint_url``, else
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; credentials from the environment."""
    from .commit import read_manifest_bytes
    from .store import open_store

    root, prefix = split_store_uri(uri)
    store = open_store(root, endpoint_url=endpoint_url)
    if manifest_sha256 is not None:  # that commit: live, or replaced and kept under history/
        return cached_checkpoint(store, prefix, manifest_sha256, cache_dir)
    for attempt in (1, 2):
        got = hashlib.sha256(read_manifest_bytes(store, prefix)).hexdigest()
        try:
            return cached_checkpoint(store, prefix, got, cache_dir)
        except CheckpointChangedError:
            if attempt == 2:
                raise
            log.info("%s: a new commit landed while fetching; fetching that one", redact_uri(uri))
    raise AssertionError("unreachable")


def fetch_s3(uri: str) -> Path:
    """The ``s3`` resolver of ``compressor.uris`` (entry point ``birkhoff.uri_resolvers``):
    cache under ``BIRKHOFF_CACHE`` (default ``~/.cache/birkhoff``)."""
    return fetch_store_uri(uri)
