"""Opening a source's files safely: regular files only (a FIFO is refused, never
waited on), descriptors that cannot be swapped under us, small bounded reads, and
the sniffing of a file's kind from its first bytes."""


from __future__ import annotations

import contextlib
import logging
import os
import stat
import struct
from dataclasses import dataclass
from typing import Iterator

from .errors import SourceError

log = logging.getLogger(__name__)

# what a file's first bytes say it is
ZIP, PICKLE, SAFETENSORS, UNKNOWN = "zip", "pickle", "safetensors", "unknown"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    nbytes: int
    file: str


# -- opening files safely ----------------------------------------------------------------

def describe_mode(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _stat(path, *, follow: bool = True) -> os.stat_result:
    """``os.stat`` with each failure as a SourceError that says what it is."""
    try:
        return os.stat(path) if follow else os.lstat(path)
    except OSError as exc:
        raise _os_error(exc, path, "access") from None


def _os_error(exc: OSError, path, verb: str) -> SourceError:
    """A failed stat or open of a source path, said in words."""
    if isinstance(exc, FileNotFoundError):
        return SourceError("no such file or directory", file=str(path))
    if isinstance(exc, PermissionError):
        return SourceError("permission denied", file=str(path))
    if isinstance(exc, NotADirectoryError) and verb == "access":
        return SourceError("a parent of the path is not a directory", file=str(path))
    return SourceError(f"cannot {verb}: {exc.strerror}", file=str(path))


def _open_fd(path) -> tuple[int, os.stat_result]:
    """Open a regular file for reading without ever blocking (O_NONBLOCK: a FIFO
    does not wait for a writer); refuse anything else."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _os_error(exc, path, "open") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"is {describe_mode(st.st_mode)}, not a regular file", file=str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def _fd_path(fd: int, path) -> str:
    """A path that opens exactly the file behind ``fd`` (Linux), else the path."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else os.fspath(path)


@contextlib.contextmanager
def opened(path) -> Iterator[tuple[str, int, os.stat_result]]:
    """``(path to open, fd, stat)`` for a checked regular file; closed on exit."""
    fd, st = _open_fd(path)
    try:
        yield _fd_path(fd, path), fd, st
    finally:
        os.close(fd)


def _read_small(path, limit: int) -> bytes:
    with opened(path) as (_, fd, st):
        if st.st_size > limit:
            raise SourceError(f"is {st.st_size} bytes, above the {limit}-byte cap for this kind of file",
                              file=str(path))
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)[:limit]


def sniff(fd: int, size: int) -> str:
    """What a file is, from its first bytes."""
    head = os.pread(fd, 16, 0) if hasattr(os, "pread") else b""
    if head.startswith(b"PK\x03\x04"):
        return ZIP
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return PICKLE
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 8 + n <= size:
            return SAFETENSORS
    return UNKNOWN
