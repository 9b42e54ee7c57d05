"""Where "the latest SAM-B" is: a ``latest`` pointer per model and a zoo index.

After each commit (and on a skip, where the pointer is missing or stale), the
driver writes under the store's root:

* ``<model>/latest.json``: the model's newest committed checkpoint (its URI and
  prefix, the sha256 of its manifest, the commit time, the source's sha256, the
  config hash, the ratio);
* ``index.json``: one such entry per model of every zoo that commits to this
  store.

Both are small JSON objects replaced by conditional writes (compare-and-swap on
their ETag, retried when another driver got there first), so two drivers never
lose each other's entries, and a pointer never moves back to an older commit
(entries are ordered by ``committed_at``). A checkpoint is committed before its
pointer moves: a reader that follows a pointer always finds a complete
checkpoint. A pointer or an entry that is already right is not rewritten, so a
night on which nothing changed writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Callable

from .errors import ConditionFailedError, StoreError
from .store import Store

log = logging.getLogger(__name__)

POINTER_FORMAT = "birkhoff-latest"
INDEX_FORMAT = "birkhoff-zoo-index"
VERSION = 1
LATEST = "latest.json"
INDEX = "index.json"
_MAX_BYTES = 4 * 2**20
_ATTEMPTS = 8


def latest_key(model: str) -> str:
    return f"{model}/{LATEST}"


def entry_for(store: Store, model: str, prefix: str, manifest: dict, manifest_raw: bytes, *,
              config_hash: str, ratio: float | None) -> dict[str, Any]:
    """What the pointer and the index hold for one committed checkpoint."""
    return {
        "model": model,
        "uri": store.url(prefix),
        "prefix": prefix,
        "manifest_sha256": hashlib.sha256(manifest_raw).hexdigest(),
        "committed_at": manifest.get("producer", {}).get("committed_at"),
        "source_sha256": manifest.get("source", {}).get("sha256"),
        "config_hash": config_hash,
        "ratio": ratio,
    }


def _newer_or_same(new: dict, old: dict | None) -> bool:
    """Whether ``new`` may replace ``old``: never an older commit over a newer one."""
    if old is None or old.get("committed_at") is None or new.get("committed_at") is None:
        return True
    return str(new["committed_at"]) >= str(old["committed_at"])


def _swap(store: Store, key: str, update: Callable[[dict | None], dict | None]) -> bool:
    """Read the JSON object at ``key``, apply ``update`` (None: leave it), write it back
    only if it is unchanged since the read; retried when another writer got in between.
    Returns whether it wrote."""
    for _ in range(_ATTEMPTS):
        got = store.read(key, _MAX_BYTES)
        current = None
        if got is not None:
            try:
                current = json.loads(got[0])
            except ValueError:
                log.warning("%s is not JSON: it is replaced", store.url(key))
        new = update(current if isinstance(current, dict) else None)
        if new is None or new == current:
            return False
        data = json.dumps(new, indent=1, sort_keys=True).encode()
        try:
            if got is None:
                store.put_bytes(key, data, if_absent=True)
            else:
                store.put_bytes(key, data, if_match=got[1].etag)
            return True
        except ConditionFailedError:
            continue
    raise StoreError(f"{store.url(key)}: changed by other writers {_ATTEMPTS} times in a row; not updated", key=key)


def publish(store: Store, entry: dict) -> bool:
    """Move the model's ``latest`` pointer to ``entry`` and update the zoo index.
    Returns whether anything was written."""
    def pointer(old: dict | None) -> dict | None:
        if not _newer_or_same(entry, old):
            return None
        return {"format": POINTER_FORMAT, "version": VERSION, **entry}

    def index(old: dict | None) -> dict | None:
        models = dict(old.get("models", {})) if old and old.get("format") == INDEX_FORMAT else {}
        if not _newer_or_same(entry, models.get(entry["model"])):
            return None
        models[entry["model"]] = entry
        return {"format": INDEX_FORMAT, "version": VERSION, "models": models}

    wrote = _swap(store, latest_key(entry["model"]), pointer)
    wrote = _swap(store, INDEX, index) or wrote
    if wrote:
        log.info("%s: latest -> %s", entry["model"], entry["uri"])
    return wrote


def publish_committed(store: Store, model: str, prefix: str, *, config_hash: str,
                      ratio: float | None) -> dict[str, Any]:
    """Point ``model`` at the checkpoint committed under ``prefix`` (its manifest read once,
    here); returns the entry."""
    from compressor import format as fmt

    from .commit import MANIFEST, read_manifest_bytes

    raw = read_manifest_bytes(store, prefix)
    manifest = fmt.parse_manifest(raw, store.url(prefix + MANIFEST))
    entry = entry_for(store, model, prefix, manifest, raw, config_hash=config_hash, ratio=ratio)
    publish(store, entry)
    return entry


def read_latest(store: Store, model: str) -> dict:
    """The model's pointer, validated; :class:`StoreError` when there is none."""
    got = store.read(latest_key(model), _MAX_BYTES)
    if got is None:
        raise StoreError(f"{store.url(latest_key(model))}: no latest pointer (nothing committed yet)",
                         key=latest_key(model))
    try:
        data = json.loads(got[0])
    except ValueError as exc:
        raise StoreError(f"{store.url(latest_key(model))}: not JSON ({exc})", key=latest_key(model)) from None
    if not isinstance(data, dict) or data.get("format") != POINTER_FORMAT or data.get("version") != VERSION \
            or not isinstance(data.get("prefix"), str):
        raise StoreError(f"{store.url(latest_key(model))}: not a {POINTER_FORMAT} v{VERSION} pointer",
                         key=latest_key(model))
    return data
