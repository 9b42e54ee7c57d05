"""File-system helpers of the format and of every layer above it: atomic
temp-then-rename writes of files and folders, directory syncs, regular-file opens
that never block, and hashing while reading or copying."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import uuid

import numpy as np

from ..errors import TruncatedDataError
from .schema import _IO_CHUNK


def fsync_dir(directory: str) -> None:
    # the rename itself must reach the disk for the write to be durable
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Flush a written file's bytes to the disk (before it is renamed into sight)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask, read without changing it where /proc tells it (setting it
    to read it would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(directory: str, name: str):
    """Yield a temporary path in ``directory``; when the body returns (having
    fsynced what it wrote) the file is renamed onto ``name`` and the directory
    synced, and when it raises the temporary file is removed: readers only ever
    see a whole file."""
    tmp = tmp_path(directory, name)
    try:
        yield tmp
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def tmp_path(directory: str, name: str) -> str:
    return os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def write_atomic(path, data: bytes | str) -> str:
    """Write ``data`` (str as UTF-8) to ``path`` whole: a fsynced temporary beside it,
    renamed onto it. Readers see the old file or the new one, never a part."""
    directory, name = os.path.split(os.fspath(path))
    with atomic_file(directory or ".", name) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    return os.fspath(path)


@contextlib.contextmanager
def atomic_directory(parent: str, name: str, *, replace: bool = False):
    """Yield a temporary folder path (not created) in ``parent``; when the body returns
    having filled it, it is renamed onto ``name``, so readers only ever see a whole
    folder. A folder already at ``name`` is kept and ours dropped (concurrent builders
    of the same content: the first one wins), unless ``replace``, which removes it
    first. The temporary is removed whatever happens."""
    tmp = tmp_path(parent, name)
    final = os.path.join(parent, name)
    try:
        yield tmp
        if replace and os.path.lexists(final):
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:  # another writer won the race: theirs stays
            if not os.path.isdir(final):
                raise
        fsync_dir(parent)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def hash_stream(src, dst=None) -> tuple[int, str]:
    """Bytes and sha256 of what is left in ``src``, copied to ``dst`` on the way
    when one is given."""
    h = hashlib.sha256()
    n = 0
    while True:
        chunk = src.read(_IO_CHUNK)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return n, h.hexdigest()


def hash_file(path: str) -> tuple[int, str]:
    with open(path, "rb") as f:
        return hash_stream(f)


def open_regular(path: str, missing_error: type, what: str, tensor: str | None = None):
    """Open ``path`` for reading, refusing anything that is not a regular file.
    O_NONBLOCK keeps a FIFO planted under a shard's name from hanging the open."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise missing_error(f"{what} is missing", file=path, tensor=tensor) from None
    except OSError as exc:
        raise missing_error(f"{what} cannot be opened: {exc}", file=path, tensor=tensor) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise missing_error(f"{what} is not a regular file", file=path, tensor=tensor)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_exact(f, n: int, path: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TruncatedDataError(f"file ends inside the {what} ({len(data)} of {n} bytes)", file=path)
    return data


def readinto_exact(f, buf: np.ndarray, path: str, tensor: str) -> None:
    mv = memoryview(buf).cast("B")
    got = 0
    while got < len(mv):
        k = f.readinto(mv[got:])
        if not k:
            raise TruncatedDataError(f"file ends inside tensor data ({got} of {len(mv)} bytes)",
                                     file=path, tensor=tensor)
        got += k
