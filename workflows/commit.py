"""Committing a checkpoint to the store so that concurrent runs never lose data.

A checkpoint lives under one prefix per (model, source, config, codec)::

    <prefix>shard-00001-of-00002-<sha256[:24]>.safetensors   content-addressed shards
    <prefix>config.json ...                                   architecture files
    <prefix>manifest.json                                     the commit: created last
    <prefix>_work/<tensor-set hash>.json                      resume records of unfinished runs
    <prefix>_commit.lease                                     held while a run commits or cleans up

Shard names carry the sha256 of their bytes, so two runs that plan differently
(or the same) never write different bytes under one name. Everything that
changes or removes objects under a committed prefix happens under the lease:

- the commit itself (:func:`commit_checkpoint`): look at the manifest now there;
  if it is a complete checkpoint (and this is not ``--force`` over exactly the
  version seen when the run started), this run lost the race and commits
  nothing. Otherwise check that every shard this run references is there as
  recorded, write the architecture files, and write the manifest: created only
  if absent, or replacing only the version inspected (S3 conditional writes;
  ``os.link`` / a compare under ``flock`` locally);
- the cleanup after it: objects this run wrote (or resumed) that the committed
  manifest does not reference, and orphans older than the orphan age (left by
  runs that died, or files of a manifest that was replaced, which a reader may
  still be fetching when the replacement lands);
- :func:`collect_garbage`, which a run that skips a complete checkpoint calls
  when old orphans are present (it writes nothing otherwise).

A complete checkpoint is one whose manifest validates and whose every shard and
architecture file has the recorded size and sha256 (:func:`inspect_checkpoint`);
a run that finds an incomplete one repairs it instead of skipping it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from compressor import format as fmt
from compressor.errors import BirkhoffError

from . import lease as leases
from .errors import (CheckpointChangedError, CommitLeaseError, ConditionFailedError, NotCommittedError, StoreError,
                     WorkflowError)
from .redaction import redact
from .store import Store

log = logging.getLogger(__name__)

MANIFEST = fmt.MANIFEST_NAME
LEASE_NAME = "_commit.lease"
# a manifest that --force replaced is kept here (``history/<its commit time>.json``), and the
# files it references stay: old checkpoints are never deleted unless a retention says so
HISTORY = "history/"
_MAX_MANIFEST_BYTES = fmt.LoadLimits().max_manifest_bytes
# unreferenced objects this old are leftovers of runs that died (a live run
# commits, or checks its objects under the lease first, long before)
ORPHAN_AGE_SECONDS = 12 * 3600.0


@dataclass(frozen=True)
class CheckpointState:
    """What a prefix holds: no manifest, or a manifest and what is wrong with it."""

    etag: str | None = None  # of manifest.json; None when there is none
    manifest: dict | None = None  # parsed and validated; None when absent or unreadable
    manifest_bytes: int = 0
    problems: tuple[str, ...] = ()
    damaged: frozenset[str] = frozenset()  # files the manifest lists that are missing or differ

    @property
    def committed(self) -> bool:
        return self.etag is not None

    @property
    def complete(self) -> bool:
        return self.committed and self.manifest is not None and not self.problems


def files_of(manifest: dict) -> dict[str, dict]:
    """Every stored file a manifest references (shards and architecture files) with
    its recorded ``bytes`` and ``sha256``."""
    return {**manifest.get("shards", {}), **manifest.get("extra_files", {})}


def referenced(manifest: dict) -> set[str]:
    return set(files_of(manifest)) | {MANIFEST}


def check_objects(store: Store, prefix: str, files: dict[str, dict]) -> dict[str, str]:
    """File name -> what differs between the store and its recorded size and sha256."""
    problems = {}
    for name, rec in sorted(files.items()):
        info = store.head(prefix + name)
        if info is None:
            problems[name] = f"{name} is missing"
        elif info.size != rec["bytes"]:
            problems[name] = f"{name} is {info.size} bytes, the manifest records {rec['bytes']}"
        elif info.sha256 != rec["sha256"]:
            problems[name] = (f"{name} has sha256 {info.sha256 or '(none stored)'}, the manifest records "
                              f"{rec['sha256']}")
    return problems


def inspect_checkpoint(store: Store, prefix: str) -> CheckpointState:
    """Read and validate the manifest under ``prefix`` and check every file it lists
    (size and sha256; S3 keeps the sha256 each upload verified, a folder is hashed)."""
    try:
        got = store.read(prefix + MANIFEST, _MAX_MANIFEST_BYTES)
    except StoreError as exc:
        info = store.head(prefix + MANIFEST)
        if info is None:
            return CheckpointState()
        return CheckpointState(info.etag, None, info.size, (f"{MANIFEST} unreadable: {redact(exc)}",))
    if got is None:
        return CheckpointState()
    raw, info = got
    try:
        manifest = fmt.parse_manifest(raw, store.url(prefix + MANIFEST))
    except BirkhoffError as exc:
        return CheckpointState(info.etag, None, info.size, (f"{MANIFEST} invalid: {redact(exc)}",))
    problems = check_objects(store, prefix, files_of(manifest))
    return CheckpointState(info.etag, manifest, info.size, tuple(problems.values()), frozenset(problems))


@dataclass
class CommitOutcome:
    status: str  # created | replaced | lost
    manifest: dict  # the committed one: this run's, or the winner's when it lost
    manifest_bytes: int
    removed: list[str] = field(default_factory=list)


class StoreSink:
    """A ``compressor.checkpoint_writer.CheckpointSink`` for a store prefix: a shard is
    uploaded as soon as it is written (by the Ray task that compressed it); the
    commit (extra files, then the manifest) is :func:`commit_checkpoint`, under the
    lease with conditional writes. ``seen``/``force``/``owned`` are that commit's;
    a task that only uploads its shard leaves them out."""

    def __init__(self, store: Store, prefix: str, *, seen: CheckpointState | None = None, force: bool = False,
                 owned: Iterable[str] = (), lease_seconds: float = leases.DEFAULT_LEASE_SECONDS,
                 orphan_age: float = ORPHAN_AGE_SECONDS, keep_replaced: int | None = None):
        self.store, self.prefix = store, prefix
        self.seen, self.force, self.owned = seen, force, tuple(owned)
        self.lease_seconds, self.orphan_age, self.keep_replaced = lease_seconds, orphan_age, keep_replaced

    def put_shard(self, path: Path, record: dict) -> None:
        self.store.put_file(self.prefix + record["file"], path, sha256=record["sha256"])

    def commit(self, staged: Path, manifest: dict) -> "CommitOutcome":
        if self.seen is None:
            raise WorkflowError(f"{self.store.url(self.prefix)}: this sink uploads shards only; it cannot commit")
        return commit_checkpoint(self.store, self.prefix, staged, manifest, seen=self.seen, force=self.force,
                                 owned=self.owned, lease_seconds=self.lease_seconds, orphan_age=self.orphan_age,
                                 keep_replaced=self.keep_replaced)


def commit_checkpoint(store: Store, prefix: str, staged: Path, manifest: dict, *, seen: CheckpointState,
                      force: bool, owned: Iterable[str], lease_seconds: float = leases.DEFAULT_LEASE_SECONDS,
                      orphan_age: float = ORPHAN_AGE_SECONDS, keep_replaced: int | None = None) -> CommitOutcome:
    """Commit ``manifest`` (written in ``staged`` with the architecture files it lists)
    under ``prefix``, whose shards this run uploaded already; then clean up.

    ``seen``: the state inspected when the run started (``--force`` replaces a
    complete checkpoint only if it is still that version). ``owned``: keys this run
    wrote or resumed (its shards and resume records): what its cleanup may remove
    once the committed manifest does not reference them. A complete checkpoint that
    ``--force`` replaces is kept under ``history/`` (the newest ``keep_replaced`` of
    them when given; all by default)."""
    store.ensure_conditional_writes()
    with leases.acquire(store, prefix + LEASE_NAME, lease_seconds) as held:
        now = inspect_checkpoint(store, prefix)
        if now.complete and not (force and now.etag == seen.etag):
            outcome = CommitOutcome("lost", now.manifest, now.manifest_bytes)
        else:
            if now.committed:
                log.info("%s: replacing the %s manifest", store.url(prefix),
                         "live" if now.complete else f"incomplete ({'; '.join(now.problems[:3])})")
            if now.complete:
                _retain(store, prefix, now, manifest, keep_replaced)
            outcome = _publish(store, prefix, staged, manifest, now, held)
        outcome.removed = _cleanup(store, prefix, outcome, owned, orphan_age, held)
    return outcome


def _publish(store: Store, prefix: str, staged: Path, manifest: dict, now: CheckpointState,
             held: leases.Lease) -> CommitOutcome:
    # nothing removes objects under this prefix while we hold the lease, so what this
    # check sees is what the manifest will reference
    problems = list(check_objects(store, prefix, manifest["shards"]).values())
    if problems:
        raise WorkflowError(f"{store.url(prefix)}: shards of this run changed before the commit "
                            f"({'; '.join(problems[:3])}); nothing committed, the next run recomputes them")
    for name, rec in sorted(manifest.get("extra_files", {}).items()):
        held.renew_if_due()
        info = store.head(prefix + name)
        if info is None or info.size != rec["bytes"] or info.sha256 != rec["sha256"]:
            store.put_file(prefix + name, staged / name)
    held.renew_if_due()
    path = staged / MANIFEST
    try:
        if now.committed:
            store.put_file(prefix + MANIFEST, path, if_match=now.etag)
        else:
            store.put_file(prefix + MANIFEST, path, if_absent=True)
    except ConditionFailedError:
        # only when our lease was taken over (we stalled past its deadline): the
        # taker's checkpoint stands if it is complete
        after = inspect_checkpoint(store, prefix)
        if after.complete:
            return CommitOutcome("lost", after.manifest, after.manifest_bytes)
        raise CommitLeaseError(f"{store.url(prefix)}: the manifest changed while this run held the commit lease; "
                               "nothing committed") from None
    return CommitOutcome("replaced" if now.committed else "created", manifest, path.stat().st_size)


def kept_manifests(store: Store, prefix: str) -> list[str]:
    """The keys of the replaced manifests kept under ``history/``, oldest first."""
    depth = (prefix + HISTORY).count("/")
    return sorted(k for k in store.list(prefix + HISTORY) if k.count("/") == depth and k.endswith(".json"))


def _retain(store: Store, prefix: str, live: CheckpointState, new: dict, keep_replaced: int | None) -> None:
    """Keep the live checkpoint that ``new`` is about to replace: its manifest as
    ``history/<stamp>.json`` (its commit time, or its ETag for a manifest written before
    manifests recorded one) and, under ``history/<stamp>/``, the extra files the new one
    overwrites (shards are content-addressed: they stay where they are). Then drop the
    oldest beyond ``keep_replaced``: their shards go with the orphans."""
    got = store.read(prefix + MANIFEST, _MAX_MANIFEST_BYTES)
    if got is None or got[1].etag != live.etag or live.manifest is None:
        return  # replaced meanwhile: the conditional write of the new manifest will say so
    when = live.manifest.get("producer", {}).get("committed_at")
    stamp = (when or f"etag-{live.etag}").replace(":", "").replace("/", "_").strip('"')
    new_extras = new.get("extra_files", {})
    for name, rec in sorted(live.manifest.get("extra_files", {}).items()):
        if new_extras.get(name, {}).get("sha256") != rec["sha256"]:
            store.put_bytes(f"{prefix}{HISTORY}{stamp}/{name}", store.get_bytes(prefix + name))
    try:
        store.put_bytes(f"{prefix}{HISTORY}{stamp}.json", got[0], if_absent=True)
    except ConditionFailedError:
        pass  # kept already (a forced run that retried)
    if keep_replaced is not None:
        dropped = kept_manifests(store, prefix)[:-keep_replaced or None]
        for key in dropped:
            for extra in store.list(key[:-len(".json")] + "/"):
                store.delete(extra)
            store.delete(key)
        if dropped:
            log.info("%s: %d replaced checkpoint(s) beyond the newest %d dropped", store.url(prefix), len(dropped),
                     keep_replaced)


def _retained(store: Store, prefix: str) -> set[str]:
    """Everything under ``history/`` and every shard the kept manifests reference."""
    keep: set[str] = set()
    keep |= set(store.list(prefix + HISTORY))
    for key in kept_manifests(store, prefix):
        try:
            old = fmt.parse_manifest(store.get_bytes(key), store.url(key))
        except (BirkhoffError, StoreError) as exc:
            log.warning("%s: unreadable (%s); the files it referenced are not protected", store.url(key), redact(exc))
            continue
        keep |= {prefix + n for n in files_of(old)}
    return keep


def _garbage(store: Store, prefix: str, keep: set[str], orphan_age: float) -> set[str]:
    cutoff = time.time() - orphan_age
    return {i.key for i in store.list_info(prefix)
            if i.key not in keep and i.mtime is not None and i.mtime < cutoff}


def _cleanup(store: Store, prefix: str, outcome: CommitOutcome, owned: Iterable[str], orphan_age: float,
             held: leases.Lease) -> list[str]:
    # files of a manifest this run replaced are not this run's: a reader may still be
    # fetching them, and they go with the orphans once they are old
    keep = {prefix + n for n in referenced(outcome.manifest)} | {prefix + LEASE_NAME} | _retained(store, prefix)
    doomed = {k for k in owned if k not in keep}
    try:
        doomed |= _garbage(store, prefix, keep, orphan_age)
    except StoreError as exc:
        log.warning("%s: listing for cleanup failed (%s)", store.url(prefix), redact(exc))
    return _delete_all(store, sorted(doomed), held)


def _delete_all(store: Store, keys: list[str], held: leases.Lease) -> list[str]:
    removed = []
    for key in keys:
        try:
            held.renew_if_due()
            store.delete(key)
            removed.append(key)
        except (StoreError, CommitLeaseError) as exc:  # committed already: leftovers are invisible to readers
            log.warning("cleanup of %s failed (%s); a later run retries", store.url(key), redact(exc))
            break
    return removed


def collect_garbage(store: Store, prefix: str, state: CheckpointState, *,
                    lease_seconds: float = leases.DEFAULT_LEASE_SECONDS,
                    orphan_age: float = ORPHAN_AGE_SECONDS) -> list[str]:
    """Under a complete checkpoint, remove objects no manifest references that are
    older than ``orphan_age`` (leftovers of runs that died, a stale lease). Writes
    nothing, not even the lease, when there are none."""
    if not state.complete:
        return []
    keep = {prefix + n for n in referenced(state.manifest)} | _retained(store, prefix)
    if not _garbage(store, prefix, keep, orphan_age):
        return []
    with leases.acquire(store, prefix + LEASE_NAME, lease_seconds) as held:
        now = inspect_checkpoint(store, prefix)
        if not now.complete:
            return []
        keep = {prefix + n for n in referenced(now.manifest)} | {prefix + LEASE_NAME} | _retained(store, prefix)
        removed = _delete_all(store, sorted(_garbage(store, prefix, keep, orphan_age)), held)
    if removed:
        log.info("%s: removed %d orphaned object(s) older than %.0f h", store.url(prefix), len(removed),
                 orphan_age / 3600)
    return removed


# -- reading committed checkpoints ----------------------------------------------------

def read_manifest_bytes(store: Store, prefix: str) -> bytes:
    """The committed manifest's bytes; :class:`NotCommittedError` where there is none."""
    try:
        return store.get_bytes(prefix + MANIFEST)
    except StoreError:
        if not store.exists(prefix + MANIFEST):
            raise NotCommittedError(f"{store.url(prefix)} holds no committed checkpoint (no {MANIFEST})",
                                    key=prefix) from None
        raise


def read_manifest(store: Store, prefix: str) -> dict:
    return fmt.parse_manifest(read_manifest_bytes(store, prefix), store.url(prefix + MANIFEST))


def pinned_manifest(store: Store, prefix: str, manifest_sha256: str | None) -> tuple[bytes, str]:
    """The manifest whose bytes hash to ``manifest_sha256`` (any: the live one), and the
    key prefix its overwritten extra files are kept under (``""``: none). The live
    manifest, else a replaced one kept under ``history/``; :class:`CheckpointChangedError`
    when neither is that commit."""
    import hashlib

    raw = read_manifest_bytes(store, prefix)
    if manifest_sha256 is None or hashlib.sha256(raw).hexdigest() == manifest_sha256:
        return raw, ""
    for key in reversed(kept_manifests(store, prefix)):
        old = store.get_bytes(key)
        if hashlib.sha256(old).hexdigest() == manifest_sha256:
            return old, key[:-len(".json")] + "/"
    raise CheckpointChangedError(f"{store.url(prefix)}: the committed manifest's sha256 is "
                                 f"{hashlib.sha256(raw).hexdigest()[:16]}..., expected {manifest_sha256[:16]}...: "
                                 f"another commit replaced it, and no replaced checkpoint kept under "
                                 f"{HISTORY} is that one")


def fetch_checkpoint(store: Store, prefix: str, directory, *, manifest_sha256: str | None = None) -> Path:
    """Download a committed checkpoint (manifest, shards, extra files) and verify it
    with the compressor's loader checks. Refuses prefixes without a manifest. With
    ``manifest_sha256``, that commit: the live one, or one ``--force`` replaced and
    ``history/`` keeps (see :func:`pinned_manifest`). The manifest is read once,
    its shards are content-addressed, so the files fetched are exactly those it lists."""
    from compressor.checkpoint import CompressedCheckpoint
    from compressor.format.fsio import atomic_file

    raw, kept = pinned_manifest(store, prefix, manifest_sha256)
    manifest = fmt.parse_manifest(raw, store.url(prefix + MANIFEST))
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    kept_extras = {k[len(kept):] for k in store.list(kept)} if kept else set()
    for name in manifest["shards"]:
        store.get_file(prefix + name, d / name)
    for name in manifest.get("extra_files", {}):
        store.get_file((kept if name in kept_extras else prefix) + name, d / name)
    with atomic_file(str(d), MANIFEST) as tmp:
        Path(tmp).write_bytes(raw)
    CompressedCheckpoint.load(d)  # validates every shard checksum and tensor
    return d
