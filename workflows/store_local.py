"""The local-folder store: one file per key under a root folder.

Writes go to a hidden temporary sibling (``.NAME.tmp-*``), are fsynced and
checked, then published with ``os.replace`` (plain writes), ``os.link``
(create-if-absent: EEXIST is atomic) or a compare-and-replace under one
``flock`` per store folder (``if_match``). Listings skip temporaries and the
lock file; :meth:`LocalStore.abort_incomplete` removes temporaries a killed
writer left once they are older than a deadline.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from compressor.format.fsio import atomic_file
from compressor.format.fsio import fsync_dir as _fsync_dir
from compressor.format.fsio import fsync_file as _fsync_file

from .errors import ChecksumMismatchError, ConditionFailedError, StoreError

from .store import _BLOCK, STALE_SECONDS, TMP_MARK, ObjectInfo, Store, _check_key, file_sha256

log = logging.getLogger(__name__)

_LOCK_NAME = ".birkhoff-store.lock"
# filesystems without hard links (some FUSE and SMB mounts) answer os.link with these
_NO_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


class LocalStore(Store):
    """A folder as an object store: one file per key."""

    def __init__(self, root):
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

    def put_file(self, key: str, path, *, if_absent: bool = False, if_match: str | None = None,
                 sha256: str | None = None) -> ObjectInfo:
        if if_absent and if_match is not None:
            raise ValueError("if_absent and if_match exclude each other")
        dst = self._path(key)
        tmp = dst.with_name(f".{dst.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            want = sha256 or file_sha256(path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()  # what is copied is hashed on its way
            with open(path, "rb") as src, open(tmp, "wb") as out:
                for block in iter(lambda: src.read(_BLOCK), b""):
                    h.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            got = h.hexdigest()
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
        try:
            with atomic_file(str(path.parent), path.name) as tmp:
                shutil.copyfile(src, tmp)
                _fsync_file(tmp)
        except FileNotFoundError:
            raise StoreError(f"no such object {key!r} in {self.uri}", key=key) from None
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
