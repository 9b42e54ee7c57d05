"""The S3 store (AWS S3, SeaweedFS, any S3 API) through boto3.

One ``PutObject`` below the multipart threshold, a multipart upload above it
(aborted on any failure); each part carries its ``Content-MD5``, the object its
sha256 as metadata, and the stored size, ETag and sha256 are checked after the
upload. Conditional writes use S3's ``If-None-Match: *`` and ``If-Match``
(PutObject, CompleteMultipartUpload, DeleteObject).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from compressor.format.fsio import atomic_file

from .errors import ChecksumMismatchError, ConditionFailedError, StoreError, TransientStoreError
from .redaction import redact, redact_uri
from .store import (_BLOCK, MULTIPART_THRESHOLD, PART_SIZE, STALE_SECONDS, ObjectInfo, RetryPolicy, Store,
                    _check_key, file_sha256)

log = logging.getLogger(__name__)
T = TypeVar("T")

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

    def put_file(self, key: str, path, *, if_absent: bool = False, if_match: str | None = None,
                 sha256: str | None = None) -> ObjectInfo:
        if if_absent and if_match is not None:
            raise ValueError("if_absent and if_match exclude each other")
        path = Path(path)
        size = path.stat().st_size
        sha = sha256 or file_sha256(path)
        cond = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_match} if if_match is not None else {}
        etag_box: list[str] = []

        def attempt():
            try:
                if size <= self.multipart_threshold:
                    etag = self._put_single(key, path, cond, sha)
                else:
                    etag = self._put_multipart(key, path, size, cond, sha)
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

    def _put_single(self, key: str, path: Path, cond: dict, sha: str) -> str:
        data = path.read_bytes()
        md5 = hashlib.md5(data)  # the transfer's check (Content-MD5); sha: the file's, hashed once
        self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data,
            ContentMD5=base64.b64encode(md5.digest()).decode(),
            Metadata={"sha256": sha}, **cond,
        )
        return md5.hexdigest()

    def _put_multipart(self, key: str, path: Path, size: int, cond: dict, sha: str) -> str:
        full = self._key(key)
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

    def _absent_is_none(self, call, key: str):
        """``call(Bucket=..., Key=...)`` for the object at ``key``; None when there is none."""
        from botocore.exceptions import ClientError

        try:
            return call(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
                return None
            raise

    def _verify(self, key: str, size: int, sha: str, etag: str) -> None:
        h = self._absent_is_none(self.client.head_object, key)
        if h is None:
            # stored, then removed by someone else (a concurrent cleanup): the upload
            # itself succeeded; whoever relies on the object checks it before use
            log.warning("upload %s: the object was removed right after it was stored", self.url(key))
            return
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
        from botocore.exceptions import ClientError

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

        def go(tmp: str):
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            want = resp.get("Metadata", {}).get("sha256")
            h = hashlib.sha256()
            with open(tmp, "wb") as out:
                for chunk in resp["Body"].iter_chunks(_BLOCK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if want and h.hexdigest() != want:
                raise ChecksumMismatchError(f"download {self.url(key)}: sha256 differs from the stored one", key=key)
        with atomic_file(str(path.parent), path.name) as tmp:  # readers see the whole, checked file or none
            self._call("download", key, lambda: go(tmp))
        return path

    def read(self, key: str, max_bytes: int) -> tuple[bytes, ObjectInfo] | None:
        def go():
            resp = self._absent_is_none(self.client.get_object, key)
            if resp is None:
                return None
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
        def go():
            h = self._absent_is_none(self.client.head_object, key)
            if h is None:
                return None
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
