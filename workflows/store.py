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
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import logging
import os
import random
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from .errors import ChecksumMismatchError, ConditionFailedError, StoreError, TransientStoreError
from .redaction import redact, redact_uri

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
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise StoreError(f"invalid store key {key!r}", key=key)
    return key


class Store(ABC):
    """What the workflow needs from an object store."""

    uri: str

    @abstractmethod
    def put_file(self, key: str, path, *, if_absent: bool = False, if_match: str | None = None) -> ObjectInfo:
        """Upload a file as ``key``, all or nothing. ``if_absent``: only where no object
        is; ``if_match``: only over the object whose :attr:`ObjectInfo.etag` is this.
        A condition that fails raises :class:`ConditionFailedError`."""

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

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for k in keys:
            self.delete(k)
        return len(keys)

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


_LOCK_NAME = ".birkhoff-store.lock"
# filesystems without hard links (some FUSE and SMB mounts) answer os.link with these
_NO_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def _fsync_dir(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable (a commit survives a power cut)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalStore(Store):
    """A folder as an object store: one file per key."""

    def __init__(self, root, retry: RetryPolicy | None = None):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.root} exists and is not a folder")

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _fail(self, what: str, key: str, exc: OSError) -> StoreError:
        return StoreError(f"{what} {self.url(key)}: {exc.strerror or type(exc).__name__}", key=key)

    @contextmanager
    def _locked(self):
        """One advisory lock per store folder around a compare-then-change (if_match):
        released by the kernel when its holder dies, so it can never go stale."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _sha_of(p: Path) -> str | None:
        try:
            return file_sha256(p)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def put_file(self, key: str, path, *, if_absent: bool = False, if_match: str | None = None) -> ObjectInfo:
        if if_absent and if_match is not None:
            raise ValueError("if_absent and if_match exclude each other")
        dst = self._path(key)
        tmp = dst.with_name(f".{dst.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            want = file_sha256(path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, _BLOCK)
                out.flush()
                os.fsync(out.fileno())
            got = file_sha256(tmp)
            if got != want:
                raise ChecksumMismatchError(f"{key}: sha256 after copy {got} != {want}", key=key)
            if if_absent:
                self._publish_new(tmp, dst, key, want)
            elif if_match is not None:
                with self._locked():
                    cur = self._sha_of(dst)
                    if cur != if_match and cur != want:
                        raise ConditionFailedError(f"{self.url(key)} is {'gone' if cur is None else 'another version'}"
                                                   f" (expected {if_match[:12]})", key=key)
                    os.replace(tmp, dst)
            else:
                os.replace(tmp, dst)
            _fsync_dir(dst.parent)
            st = dst.stat()
        except OSError as exc:
            raise self._fail("write", key, exc) from None
        finally:
            tmp.unlink(missing_ok=True)  # after a link the temporary is a second name of the object
        return ObjectInfo(key, st.st_size, want, want, st.st_mtime)

    def _publish_new(self, tmp: Path, dst: Path, key: str, want: str) -> None:
        """Give the finished temporary its name only if no object has it: link() fails
        with EEXIST atomically, where exists-then-rename would let two writers both win."""
        try:
            os.link(tmp, dst)
            return
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            with self._locked():  # no hard links here: check and rename under the store's lock
                if not os.path.lexists(dst):
                    os.replace(tmp, dst)
                    return
        if self._sha_of(dst) == want:  # the same bytes are there already: nothing to do
            return
        raise ConditionFailedError(f"{self.url(key)} exists already", key=key)

    def get_file(self, key: str, path) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise StoreError(f"no such object {key!r} in {self.uri}", key=key)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, path)
        except FileNotFoundError:
            raise StoreError(f"no such object {key!r} in {self.uri}", key=key) from None
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def read(self, key: str, max_bytes: int) -> tuple[bytes, ObjectInfo] | None:
        p = self._path(key)
        try:
            with open(p, "rb") as fh:
                st = os.fstat(fh.fileno())
                if st.st_size > max_bytes:
                    raise StoreError(f"{self.url(key)} is {st.st_size} bytes, more than the {max_bytes} expected",
                                     key=key)
                data = fh.read(max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._fail("read", key, exc) from None
        sha = hashlib.sha256(data).hexdigest()
        return data, ObjectInfo(key, len(data), sha, sha, st.st_mtime)

    def head(self, key: str) -> ObjectInfo | None:
        p = self._path(key)
        try:
            if not p.is_file():
                return None
            st = p.stat()
            sha = file_sha256(p)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._fail("stat", key, exc) from None
        return ObjectInfo(key, st.st_size, sha, sha, st.st_mtime)

    def _walk(self, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            base = base.parent  # a prefix may also be a partial file name
            if not base.is_dir():
                return
        for p in base.rglob("*"):
            if TMP_MARK in p.name or p.name == _LOCK_NAME:
                continue
            try:
                st = p.lstat()
            except FileNotFoundError:  # removed while we walked
                continue
            if not p.is_file():
                continue
            k = p.relative_to(self.root).as_posix()
            if k.startswith(prefix):
                yield k, st

    def list(self, prefix: str = "") -> list[str]:
        return sorted(k for k, _ in self._walk(prefix))

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        return sorted((ObjectInfo(k, st.st_size, mtime=st.st_mtime) for k, st in self._walk(prefix)),
                      key=lambda i: i.key)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        p = self._path(key)
        try:
            if if_match is None:
                p.unlink(missing_ok=True)
                return
            with self._locked():
                cur = self._sha_of(p)
                if cur != if_match:
                    raise ConditionFailedError(f"{self.url(key)} is {'gone' if cur is None else 'another version'}"
                                               f" (expected {if_match[:12]})", key=key)
                p.unlink()
        except OSError as exc:
            raise self._fail("delete", key, exc) from None

    def abort_incomplete(self, prefix: str, older_than: float = STALE_SECONDS) -> int:
        """Remove temporaries (``.NAME.tmp-*``) of writers that died: only those whose
        last write is ``older_than`` seconds old. A live writer's temporary is younger:
        it is written, fsynced, hashed and renamed within one upload."""
        base = self.root / prefix
        if not base.is_dir():
            return 0
        cutoff = time.time() - older_than
        n = 0
        for p in base.rglob(f"*{TMP_MARK}*"):
            try:
                if p.name.startswith(".") and p.is_file() and p.lstat().st_mtime < cutoff:
                    p.unlink()
                    n += 1
            except FileNotFoundError:  # its writer renamed it, or another run removed it
                continue
        if n:
            log.info("removed %d stale temporary file(s) under %s", n, self.url(prefix))
        return n

    def spec(self) -> dict:
        return {"uri": self.uri}


# -- S3 ---------------------------------------------------------------------------

_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "BadDigest", "IncompleteBody",
    "OperationAborted", "500", "502", "503", "504",
    # two conditional writes of one key in flight at once: S3 asks the caller to retry
    "ConditionalRequestConflict", "409",
}
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


def _quoted(etag: str) -> str:
    """ETags as S3 sends them in headers (quoted): what ``If-Match`` compares."""
    return etag if not etag or etag.startswith('"') else f'"{etag}"'


class S3Store(Store):
    def __init__(self, uri: str, *, endpoint_url: str | None = None, region: str | None = None,
                 retry: RetryPolicy | None = None, multipart_threshold: int = MULTIPART_THRESHOLD,
                 part_size: int = PART_SIZE):
        if not uri.startswith("s3://"):
            raise StoreError(f"not an s3:// URI: {redact_uri(uri)}")
        rest = uri[len("s3://"):]
        if "@" in rest.split("/", 1)[0]:
            raise StoreError("credentials in the store URI are not accepted; use the environment or a profile")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"no bucket in {uri!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.retry = retry or RetryPolicy.from_env()
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._client = None

    # -- plumbing -------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(
                retries={"mode": "standard", "total_max_attempts": 2},  # our RetryPolicy does the rest
                connect_timeout=5, read_timeout=60,
                s3={"addressing_style": "path"} if self.endpoint_url else {},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            session = boto3.session.Session()
            self._client = session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=cfg)
        return self._client

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def _translate(self, exc: Exception, what: str, key: str | None) -> StoreError:
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError,
                                         NoCredentialsError, PartialCredentialsError, ReadTimeoutError)

        if isinstance(exc, StoreError):
            return exc
        where = f"{what} {self.url(key) if key else self.uri}"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            msg = f"{where}: {code or status} {err.get('Message', '')}".strip()
            if code == "PreconditionFailed" or str(status) == "412":
                return ConditionFailedError(redact(msg), key=key)
            cls = TransientStoreError if (code in _TRANSIENT_CODES or (status and int(status) >= 500)) else StoreError
            return cls(redact(msg), key=key)
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(f"{where}: no usable S3 credentials found (environment, profile or role)", key=key)
        if isinstance(exc, (BotoConnectionError, ReadTimeoutError, ConnectionError, TimeoutError, OSError)):
            return TransientStoreError(redact(f"{where}: {type(exc).__name__}: {exc}"), key=key)
        if isinstance(exc, BotoCoreError):
            return StoreError(redact(f"{where}: {type(exc).__name__}: {exc}"), key=key)
        return StoreError(redact(f"{where}: {type(exc).__name__}: {exc}"), key=key)

    def _call(self, what: str, key: str | None, fn: Callable[[], T]) -> T:
        def once():
            try:
                return fn()
            except Exception as exc:
                raise self._translate(exc, what, key) from None
        return self.retry.run(once, f"{what} {self.url(key) if key else self.uri}")

    # -- API ------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        def go():
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                    self.client.create_bucket(Bucket=self.bucket)
                else:
                    raise
        self._call("create bucket", None, go)

    def put_file(self, key: str, path, *, if_absent: bool = False, if_match: str | None = None) -> ObjectInfo:
        if if_absent and if_match is not None:
            raise ValueError("if_absent and if_match exclude each other")
        path = Path(path)
        size = path.stat().st_size
        sha = file_sha256(path)
        cond = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_match} if if_match is not None else {}
        etag_box: list[str] = []

        def attempt():
            try:
                if size <= self.multipart_threshold:
                    etag = self._put_single(key, path, cond)
                else:
                    etag = self._put_multipart(key, path, size, cond)
                self._verify(key, size, sha, etag)
                etag_box.append(etag)
            except Exception as exc:
                err = self._translate(exc, "upload", key)
                if isinstance(err, ConditionFailedError):
                    cur = self.head(key)
                    # exactly these bytes are there: an earlier attempt of ours landed and
                    # only its response was lost, or another writer stored the same content
                    if cur is not None and cur.size == size and cur.sha256 == sha:
                        etag_box.append(cur.etag or "")
                        return
                raise err from None
        self.retry.run(attempt, f"upload {self.url(key)}")
        log.debug("uploaded %s (%d bytes, sha256 %s)", self.url(key), size, sha[:12])
        return ObjectInfo(key, size, sha, _quoted(etag_box[-1]) if etag_box else None, time.time())

    def _put_single(self, key: str, path: Path, cond: dict) -> str:
        data = path.read_bytes()
        md5 = hashlib.md5(data)
        self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data,
            ContentMD5=base64.b64encode(md5.digest()).decode(),
            Metadata={"sha256": hashlib.sha256(data).hexdigest()}, **cond,
        )
        return md5.hexdigest()

    def _put_multipart(self, key: str, path: Path, size: int, cond: dict) -> str:
        full = self._key(key)
        sha = file_sha256(path)
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=full, Metadata={"sha256": sha})
        upload_id = upload["UploadId"]
        parts, digests = [], []
        try:
            with open(path, "rb") as fh:
                number = 1
                while True:
                    chunk = fh.read(self.part_size)
                    if not chunk:
                        break
                    md5 = hashlib.md5(chunk)
                    resp = self.client.upload_part(
                        Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=chunk,
                        ContentMD5=base64.b64encode(md5.digest()).decode(),
                    )
                    if resp["ETag"].strip('"') != md5.hexdigest():
                        raise ChecksumMismatchError(f"upload {self.url(key)}: part {number} ETag differs from its MD5",
                                                    key=key)
                    parts.append({"ETag": resp["ETag"], "PartNumber": number})
                    digests.append(md5.digest())
                    number += 1
            # the condition is checked when the object appears, that is at completion
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}, **cond)
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
                log.info("aborted multipart upload of %s", self.url(key))
            except Exception as abort_exc:  # the store may be the thing that failed; the next run cleans up
                log.warning("could not abort multipart upload of %s (%s); abort_incomplete() on the next run "
                            "removes it", self.url(key), redact(type(abort_exc).__name__))
            raise
        return hashlib.md5(b"".join(digests)).hexdigest() + f"-{len(digests)}"

    def _verify(self, key: str, size: int, sha: str, etag: str) -> None:
        from botocore.exceptions import ClientError

        try:
            h = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
                # stored, then removed by someone else (a concurrent cleanup): the upload
                # itself succeeded; whoever relies on the object checks it before use
                log.warning("upload %s: the object was removed right after it was stored", self.url(key))
                return
            raise
        got_size = int(h["ContentLength"])
        got_etag = h.get("ETag", "").strip('"')
        got_sha = h.get("Metadata", {}).get("sha256")
        plain = got_etag and "-" not in got_etag and "-" not in etag  # both are the MD5 of the whole object
        if got_size == size and got_sha == sha and not (plain and got_etag != etag):
            return  # ours, or the same bytes uploaded by another writer (maybe in other parts)
        if got_etag and got_etag != etag and got_sha != sha:
            # another writer replaced the object right after us: last writer wins, and
            # deleting their object would destroy their write
            log.debug("upload %s: replaced by another writer right after", self.url(key))
            return
        # our own upload, stored wrong: it must not stay readable under the key
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key), IfMatch=h.get("ETag"))
        except ClientError:
            pass
        raise ChecksumMismatchError(
            f"upload {self.url(key)}: stored object differs (size {got_size} vs {size}, "
            f"etag {got_etag} vs {etag}, sha256 {got_sha} vs {sha})", key=key)

    def get_file(self, key: str, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")

        def go():
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            want = resp.get("Metadata", {}).get("sha256")
            h = hashlib.sha256()
            with open(tmp, "wb") as out:
                for chunk in resp["Body"].iter_chunks(_BLOCK):
                    h.update(chunk)
                    out.write(chunk)
            if want and h.hexdigest() != want:
                raise ChecksumMismatchError(f"download {self.url(key)}: sha256 differs from the stored one", key=key)
        try:
            self._call("download", key, go)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def read(self, key: str, max_bytes: int) -> tuple[bytes, ObjectInfo] | None:
        from botocore.exceptions import ClientError

        def go():
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
                    return None
                raise
            size = int(resp["ContentLength"])
            if size > max_bytes:
                resp["Body"].close()
                raise StoreError(f"{self.url(key)} is {size} bytes, more than the {max_bytes} expected", key=key)
            data = resp["Body"].read(max_bytes + 1)
            want = resp.get("Metadata", {}).get("sha256")
            sha = hashlib.sha256(data).hexdigest()
            if len(data) != size or (want and sha != want):
                raise ChecksumMismatchError(f"download {self.url(key)}: differs from the stored size or sha256",
                                            key=key)
            mtime = resp.get("LastModified")
            return data, ObjectInfo(key, size, want, resp.get("ETag"), mtime.timestamp() if mtime else None)
        return self._call("read", key, go)

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        def go():
            try:
                h = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
                    return None
                raise
            mtime = h.get("LastModified")
            return ObjectInfo(key, int(h["ContentLength"]), h.get("Metadata", {}).get("sha256"), h.get("ETag"),
                              mtime.timestamp() if mtime else None)
        return self._call("head", key, go)

    def _iter_full(self, prefix: str) -> Iterator[dict]:
        full = (f"{self.prefix}/" if self.prefix else "") + prefix
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            yield from page.get("Contents", [])

    def list(self, prefix: str = "") -> list[str]:
        return self._call("list", prefix or None,
                          lambda: sorted(self._rel(o["Key"]) for o in self._iter_full(prefix)))

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        def go():
            return sorted((ObjectInfo(self._rel(o["Key"]), int(o["Size"]), etag=o.get("ETag"),
                                      mtime=o["LastModified"].timestamp() if o.get("LastModified") else None)
                           for o in self._iter_full(prefix)), key=lambda i: i.key)
        return self._call("list", prefix or None, go)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        cond = {"IfMatch": if_match} if if_match is not None else {}
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key), **cond))

    def abort_incomplete(self, prefix: str, older_than: float = STALE_SECONDS) -> int:
        """Abort multipart uploads under ``prefix`` started ``older_than`` seconds ago or
        earlier: a younger one may be a concurrent run's upload in flight."""
        cutoff = time.time() - older_than

        def go():
            full = (f"{self.prefix}/" if self.prefix else "") + prefix
            n = 0
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full):
                for up in page.get("Uploads", []) or []:
                    started = up.get("Initiated")
                    if started is not None and started.timestamp() > cutoff:
                        continue
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    n += 1
            return n
        n = self._call("abort incomplete uploads", prefix, go)
        if n:
            log.info("aborted %d stale multipart upload(s) under %s", n, self.url(prefix))
        return n

    def ensure_conditional_writes(self) -> None:
        """Create a probe object twice with ``If-None-Match: *``: the second must be
        refused. A server that ignores the header would let two runs both commit."""
        if getattr(self, "_conditional_ok", False):
            return
        key = f".birkhoff-probe-{uuid.uuid4().hex}"
        try:
            self.put_bytes(key, b"first", if_absent=True)
            try:
                self.put_bytes(key, b"second", if_absent=True)
            except ConditionFailedError:
                self._conditional_ok = True
                return
            if os.environ.get("BIRKHOFF_ALLOW_UNCONDITIONAL_S3") == "1":
                log.warning("%s ignores conditional writes (If-None-Match); BIRKHOFF_ALLOW_UNCONDITIONAL_S3=1: "
                            "committing anyway, safe only with one run per store at a time", self.uri)
                self._conditional_ok = True
                return
            raise StoreError(f"the S3 endpoint of {self.uri} ignores conditional writes (If-None-Match), so two runs "
                             "could both commit one checkpoint; use a server that supports them (AWS S3 and the "
                             "SeaweedFS this project pins do) or set BIRKHOFF_ALLOW_UNCONDITIONAL_S3=1 if only one run ever writes "
                             "this store")
        finally:
            try:
                self.delete(key)
            except StoreError:
                pass

    def spec(self) -> dict:
        return {"uri": self.uri, "endpoint_url": self.endpoint_url, "region": self.region}


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
