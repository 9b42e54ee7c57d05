"""No-clobber and exchanging renames: ``renameat2(RENAME_NOREPLACE / RENAME_EXCHANGE)``
through ctypes (Linux), with ``mkdir`` / ``link`` fallbacks that also fail on an
existing name where the kernel or file system has no ``renameat2``."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform

from .format.fsio import fsync_dir as _fsync_dir


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
# syscall numbers, for a libc without the renameat2 wrapper (glibc < 2.28)
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "i686": 353, "ppc64le": 357, "s390x": 347, "riscv64": 276}


class _Renameat2:
    """``renameat2`` through ctypes; ``None`` from :meth:`__call__` means "not
    available here" (the caller falls back), an error is raised as ``OSError``."""

    def __init__(self) -> None:
        self._fn = None
        self._syscall = None
        if platform.system() != "Linux":
            return
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        except OSError:
            return
        fn = getattr(libc, "renameat2", None)
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            self._fn = fn
            return
        nr = _SYS_RENAMEAT2.get(platform.machine())
        if nr is not None:
            self._syscall = (libc.syscall, nr)

    def __call__(self, src: str, dst: str, flags: int) -> bool | None:
        a, b = os.fsencode(src), os.fsencode(dst)
        if self._fn is not None:
            rc = self._fn(_AT_FDCWD, a, _AT_FDCWD, b, flags)
        elif self._syscall is not None:
            call, nr = self._syscall
            rc = call(ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(a), ctypes.c_int(_AT_FDCWD),
                      ctypes.c_char_p(b), ctypes.c_uint(flags))
        else:
            return None
        if rc == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None  # this kernel or file system has no such rename
        raise OSError(err, os.strerror(err), src, None, dst)


_renameat2 = _Renameat2()


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` (a file or a directory) to ``dst``; ``FileExistsError`` if
    anything exists at ``dst`` at that instant. Never replaces anything."""
    src, dst = os.fspath(src), os.fspath(dst)
    done = _renameat2(src, dst, _RENAME_NOREPLACE)
    if done is None:
        if os.path.isdir(src) and not os.path.islink(src):
            # claim the name with mkdir (fails if taken), then rename over our own empty
            # directory: rename refuses a non-empty target, so whatever someone put
            # there meanwhile stays
            os.mkdir(dst)
            try:
                os.rename(src, dst)
            except OSError as exc:
                try:
                    os.rmdir(dst)
                except OSError:
                    pass
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise FileExistsError(errno.EEXIST, "destination appeared during the save", dst) from None
                raise
        else:
            os.link(src, dst)  # fails with EEXIST: the no-clobber step
            os.unlink(src)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def rename_exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths; False where this is not supported."""
    done = _renameat2(os.fspath(a), os.fspath(b), _RENAME_EXCHANGE)
    if done:
        _fsync_dir(os.path.dirname(os.path.abspath(os.fspath(b))))
    return bool(done)
