"""One object-store interface over a local folder and S3.

Keys are ``/``-separated paths relative to the store root (``s3://bucket/prefix``
or a folder). Every write is all-or-nothing for readers:

- :class:`LocalStore` writes to a hidden temporary sibling, fsyncs and
  ``os.replace``-s it into place; listings skip the temporaries.
- :class:`S3Store` uses one ``PutObject`` (atomic in S3) below the multipart
  threshold and a multipart upload above it, aborted on any failure (an
  incomplete multipart upload is never an object). Each part carries its
  ``Content-MD5`` (the server rejects corrupted parts), the object carries its
  sha256 as metadata, and after the upload the object's size, ETag (MD5, or the
  multipart MD5-of-MD5s) and sha256 are checked against what was sent.

Transient failures (connection refused/reset, timeouts, 5xx, throttling,
checksum mismatches) are retried with exponential backoff and jitter; the rest
raise :class:`StoreError` at once. Credentials come from boto3's standard chain
(environment, shared files, instance/pod roles); the endpoint from
``endpoint_url``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``. No message
this module logs or raises contains a credential.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from .errors import ChecksumMismatchError, StoreError, TransientStoreError
from .redaction import redact, redact_uri

log = logging.getLogger(__name__)
T = TypeVar("T")

MULTIPART_THRESHOLD = 16 * 1024**2
PART_SIZE = 16 * 1024**2
_BLOCK = 1 << 22


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None = None


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
    def put_file(self, key: str, path) -> ObjectInfo: ...

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="birkhoff-put-") as d:
            p = Path(d) / "blob"
            p.write_bytes(data)
            return self.put_file(key, p)

    @abstractmethod
    def get_file(self, key: str, path) -> Path: ...

    def get_bytes(self, key: str) -> bytes:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="birkhoff-get-") as d:
            return self.get_file(key, Path(d) / "blob").read_bytes()

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size and stored sha256 (None when the object does not exist)."""

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (complete objects only), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for k in keys:
            self.delete(k)
        return len(keys)

    def abort_incomplete(self, prefix: str) -> int:
        """Drop leftovers of interrupted uploads under ``prefix``; returns how many."""
        return 0

    def url(self, key: str = "") -> str:
        return self.uri.rstrip("/") + ("/" + key if key else "")

    @abstractmethod
    def spec(self) -> dict:
        """What a worker needs to open the same store (never credentials)."""


class LocalStore(Store):
    def __init__(self, root, retry: RetryPolicy | None = None):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()
        self.retry = retry or RetryPolicy.from_env()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_file(self, key: str, path) -> ObjectInfo:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
        want = file_sha256(path)
        try:
            with open(path, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, _BLOCK)
                out.flush()
                os.fsync(out.fileno())
            got = file_sha256(tmp)
            if got != want:
                raise ChecksumMismatchError(f"{key}: sha256 after copy {got} != {want}", key=key)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return ObjectInfo(key, dst.stat().st_size, want)

    def get_file(self, key: str, path) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise StoreError(f"no such object {key!r} in {self.uri}", key=key)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)
        return path

    def head(self, key: str) -> ObjectInfo | None:
        p = self._path(key)
        if not p.is_file():
            return None
        return ObjectInfo(key, p.stat().st_size, file_sha256(p))

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            # a prefix may also be a partial file name
            base = base.parent
            if not base.exists():
                return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and ".tmp-" not in p.name:
                k = p.relative_to(self.root).as_posix()
                if k.startswith(prefix):
                    out.append(k)
        return sorted(out)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def abort_incomplete(self, prefix: str) -> int:
        base = self.root / prefix
        if not base.exists():
            return 0
        n = 0
        for p in base.rglob("*.tmp-*"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    def spec(self) -> dict:
        return {"uri": self.uri}


# -- S3 ---------------------------------------------------------------------------

_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "BadDigest", "IncompleteBody",
    "OperationAborted", "500", "502", "503", "504",
}


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

    def put_file(self, key: str, path) -> ObjectInfo:
        path = Path(path)
        size = path.stat().st_size
        sha = file_sha256(path)

        def attempt():
            try:
                if size <= self.multipart_threshold:
                    etag = self._put_single(key, path)
                else:
                    etag = self._put_multipart(key, path, size)
                self._verify(key, size, sha, etag)
            except Exception as exc:
                raise self._translate(exc, "upload", key) from None
        self.retry.run(attempt, f"upload {self.url(key)}")
        log.debug("uploaded %s (%d bytes, sha256 %s)", self.url(key), size, sha[:12])
        return ObjectInfo(key, size, sha)

    def _put_single(self, key: str, path: Path) -> str:
        data = path.read_bytes()
        md5 = hashlib.md5(data)
        self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data,
            ContentMD5=base64.b64encode(md5.digest()).decode(),
            Metadata={"sha256": hashlib.sha256(data).hexdigest()},
        )
        return md5.hexdigest()

    def _put_multipart(self, key: str, path: Path, size: int) -> str:
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
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts})
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
        h = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        got_size = int(h["ContentLength"])
        got_etag = h.get("ETag", "").strip('"')
        got_sha = h.get("Metadata", {}).get("sha256")
        if got_size != size or got_sha != sha or (got_etag and got_etag != etag):
            # delete what is there: a wrong object must not stay readable under the key
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
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

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        def go():
            try:
                h = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return ObjectInfo(key, int(h["ContentLength"]), h.get("Metadata", {}).get("sha256"))
        return self._call("head", key, go)

    def _iter_full(self, prefix: str) -> Iterator[str]:
        full = (f"{self.prefix}/" if self.prefix else "") + prefix
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield obj["Key"]

    def list(self, prefix: str = "") -> list[str]:
        return self._call("list", prefix or None, lambda: sorted(self._rel(k) for k in self._iter_full(prefix)))

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def abort_incomplete(self, prefix: str) -> int:
        def go():
            full = (f"{self.prefix}/" if self.prefix else "") + prefix
            n = 0
            resp = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=full)
            for up in resp.get("Uploads", []) or []:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                n += 1
            return n
        n = self._call("abort incomplete uploads", prefix, go)
        if n:
            log.info("aborted %d incomplete multipart upload(s) under %s", n, self.url(prefix))
        return n

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
