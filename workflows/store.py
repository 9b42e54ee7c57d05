"""One object-store interface over a local folder and S3.

Keys are ``/``-separated paths relative to the store root (``s3://bucket/prefix``
or a folder). Every write is all-or-nothing for readers:

- :class:`LocalStore` writes to a hidden temporary sibling, fsyncs and
  ``os.replace``-s it into place; listings skip the temporaries, and
  :meth:`Store.abort_incomplete` removes those a killed writer left once they
  are older than a deadline (never a live writer's).
- :class:`S3Store` uses one ``PutObject`` (atomic in S3) below the multipart
  threshold and a multipart upload above it, aborted on any failure (an
  incomplete multipart upload is never an object). Each part carries its
  ``Content-MD5`` (the server rejects corrupted parts), the object carries its
  sha256 as metadata, and after the upload the object's size, ETag (MD5, or the
  multipart MD5-of-MD5s) and sha256 are checked against what was sent.

Conditional writes make concurrent commits safe: ``if_absent`` creates an
object only where none exists (S3 ``If-None-Match: *``; ``os.link`` of the
finished temporary locally) and ``if_match`` replaces or deletes only the
version the caller read (S3 ``If-Match``; a compare under an ``flock``
locally). A write whose condition fails raises :class:`ConditionFailedError`,
unless the object already holds exactly the bytes being written (a retried
request whose first response was lost).

Transient failures (connection refused/reset, timeouts, 5xx, throttling,
checksum mismatches) are retried with exponential backoff and jitter; the rest
raise :class:`StoreError` at once. Credentials come from boto3's standard chain
(environment, shared files, instance/pod roles); the endpoint from
``endpoint_url``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``. No message
this module logs or raises contains a credential.

The interface and :func:`open_store` live here; the implementations in
``store_local.py`` and ``store_s3.py``.
"""

from __future__ import annotations

import logging
import os
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from .errors import StoreError, TransientStoreError
from .redaction import redact_uri

log = logging.getLogger(__name__)
T = TypeVar("T")

MULTIPART_THRESHOLD = 16 * 1024**2
PART_SIZE = 16 * 1024**2
_BLOCK = 1 << 22
# a temporary or multipart upload untouched this long belongs to a writer that
# died: a live one writes its data within seconds to minutes
STALE_SECONDS = 3600.0
TMP_MARK = ".tmp-"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None = None  # the stored sha256 (S3 metadata; hashed locally), None when unknown
    etag: str | None = None  # what if_match compares: the S3 ETag, the sha256 locally
    mtime: float | None = None  # last modified, seconds since the epoch


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 20.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        return cls(
            attempts=int(os.environ.get("BIRKHOFF_STORE_ATTEMPTS", cls.attempts)),
            base_delay=float(os.environ.get("BIRKHOFF_STORE_BASE_DELAY", cls.base_delay)),
        )

    def run(self, fn: Callable[[], T], what: str) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except TransientStoreError as exc:
                if attempt == self.attempts:
                    raise
                delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                log.warning("%s: transient failure (attempt %d/%d), retrying in %.1f s: %s",
                            what, attempt, self.attempts, delay, exc)
                time.sleep(delay)
        raise AssertionError("unreachable")


def file_sha256(path) -> str:
    from compressor.format.fsio import hash_file

    return hash_file(path)[1]


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise StoreError(f"invalid store key {key!r}", key=key)
    return key

class Store(ABC):
    """What the workflow needs from an object store."""

    uri: str

    @abstractmethod
    def put_file(self, key: str, path, *, if_absent: bool = False, if_match: str | None = None,
                 sha256: str | None = None) -> ObjectInfo:
        """Upload a file as ``key``, all or nothing. ``if_absent``: only where no object
        is; ``if_match``: only over the object whose :attr:`ObjectInfo.etag` is this.
        A condition that fails raises :class:`ConditionFailedError`. ``sha256``: the
        file's, when the caller hashed it while writing it (a checkpoint shard): it
        is not hashed again, and the stored copy is checked against it."""

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> ObjectInfo:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="birkhoff-put-") as d:
            p = Path(d) / "blob"
            p.write_bytes(data)
            return self.put_file(key, p, if_absent=if_absent, if_match=if_match)

    @abstractmethod
    def get_file(self, key: str, path) -> Path: ...

    def get_bytes(self, key: str) -> bytes:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="birkhoff-get-") as d:
            return self.get_file(key, Path(d) / "blob").read_bytes()

    @abstractmethod
    def read(self, key: str, max_bytes: int) -> tuple[bytes, ObjectInfo] | None:
        """A small object's bytes with the info of exactly that version (its ETag for
        ``if_match``); None when absent. Refuses objects above ``max_bytes``."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size, stored sha256 and ETag (None when the object does not exist)."""

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (complete objects only), sorted."""

    @abstractmethod
    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        """Like :meth:`list`, with each object's size and modification time
        (no sha256: listing never reads object data)."""

    @abstractmethod
    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Remove ``key`` (absent is fine). ``if_match``: only that version; a missing
        or different object raises :class:`ConditionFailedError`."""

    def abort_incomplete(self, prefix: str, older_than: float = STALE_SECONDS) -> int:
        """Drop leftovers of interrupted uploads under ``prefix`` untouched for
        ``older_than`` seconds (younger ones may belong to a live writer); returns how many."""
        return 0

    def ensure_conditional_writes(self) -> None:
        """Raise :class:`StoreError` unless conditional writes really are atomic here."""

    def url(self, key: str = "") -> str:
        return self.uri.rstrip("/") + ("/" + key if key else "")

    @abstractmethod
    def spec(self) -> dict:
        """What a worker needs to open the same store (never credentials)."""


def open_store(uri: str | dict, *, endpoint_url: str | None = None) -> Store:
    """``s3://bucket/prefix`` -> :class:`S3Store`; a path or ``file://`` URI -> :class:`LocalStore`.
    A dict is a :meth:`Store.spec` (how workers reopen the driver's store)."""
    if isinstance(uri, dict):
        spec = uri
        uri = spec["uri"]
        endpoint_url = spec.get("endpoint_url") or endpoint_url
        if uri.startswith("s3://"):
            return S3Store(uri, endpoint_url=endpoint_url, region=spec.get("region"))
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint_url=endpoint_url)
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        return LocalStore(unquote(urlsplit(uri).path))
    if "://" in uri:
        raise StoreError(f"unsupported store URI scheme: {redact_uri(uri)} (use s3://bucket/prefix or a folder)")
    return LocalStore(uri)


# the implementations (they import the base above)
from .store_local import LocalStore  # noqa: E402
from .store_s3 import S3Store  # noqa: E402

__all__ = ["ObjectInfo", "RetryPolicy", "Store", "LocalStore", "S3Store", "open_store", "file_sha256",
           "STALE_SECONDS", "TMP_MARK"]
