"""Where results land: destination checks, atomic no-clobber publishing, and the
clean-up of temporaries that killed runs left behind.

Every result (a checkpoint directory, a decompressed file, a report) is written
under a temporary sibling name and then *published* by one rename:

* a new result uses ``renameat2(RENAME_NOREPLACE)`` (Linux), which fails when
  anything appeared at the destination meanwhile: two runs racing for one
  destination get exactly one winner, and a folder created by someone else
  during the save is never touched;
* ``overwrite`` uses ``renameat2(RENAME_EXCHANGE)``: the new result takes the
  destination's place in one step, the old one lands on the temporary name and
  is removed only after it has been checked to be what the caller agreed to
  replace (otherwise it is swapped back).

Where ``renameat2`` is missing (other kernels, some file systems) the same
guarantees come from ``mkdir`` / ``link``, which also fail on an existing name.

Temporary names carry their owner (host, boot, pid and process start time), so
a later run can tell a dead owner's leftovers from a live run's work in progress
and removes only the former.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import platform
import re
import shutil
import socket
import stat
import time
import uuid
from typing import Callable, Iterable

from .errors import CheckpointExistsError, DestinationError
from .format.fsio import fsync_dir as _fsync_dir
from .format.fsio import umask as _umask

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
# syscall numbers, for a libc without the renameat2 wrapper (glibc < 2.28)
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "i686": 353, "ppc64le": 357, "s390x": 347, "riscv64": 276}

#: leftovers of another host (a shared file system) are only removed after this long
FOREIGN_STALE_SECONDS = 24 * 3600
#: leftovers of an older build, whose names carry no owner, after this long
LEGACY_STALE_SECONDS = 3600


# -- renameat2 -------------------------------------------------------------------------

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


# -- temporary names and their owners -----------------------------------------------------

def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "noboot"


def _start_ticks(pid: int) -> int:
    """A process's start time (clock ticks since boot), 0 where unknown: it tells a
    live owner from a new process that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


_HOST = _short_hash(socket.gethostname())
_BOOT = _short_hash(_boot_id())
_OWNER_RE = re.compile(r"^(?P<host>[0-9a-f]{6})(?P<boot>[0-9a-f]{6})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}$")
_LEGACY_RE = re.compile(r"^[0-9a-f]{8}$")


def temp_name(final_name: str) -> str:
    """A hidden sibling name for writing ``final_name``, tagged with its owner."""
    pid = os.getpid()
    return f".{final_name}.tmp-{_HOST}{_BOOT}-{pid}-{_start_ticks(pid)}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return True
    now = _start_ticks(pid)
    return not (start and now and now != start)


def _is_stale(tag: str, age: float) -> bool:
    m = _OWNER_RE.match(tag)
    if m is None:
        return bool(_LEGACY_RE.match(tag)) and age > LEGACY_STALE_SECONDS
    if m["host"] != _HOST:
        return age > FOREIGN_STALE_SECONDS
    if m["boot"] != _BOOT:
        return True  # this host rebooted since: its owner is gone
    return not _pid_alive(int(m["pid"]), int(m["start"]))


def clean_stale_temps(parent, final_name: str) -> list[str]:
    """Remove the temporaries of ``final_name`` in ``parent`` that dead runs left
    (killed mid-save). Live runs' temporaries, other names, symlinks and other
    users' files are left alone. Returns the removed paths."""
    parent = os.fspath(parent)
    prefix = f".{final_name}.tmp-"
    legacy_old = f".{final_name}.old-"  # an older build's overwrite, killed between its two renames
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(prefix):
            tag = entry.name[len(prefix):]
        elif entry.name.startswith(legacy_old) and _LEGACY_RE.match(entry.name[len(legacy_old):]):
            tag = entry.name[len(legacy_old):]
        else:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            continue
        if not _is_stale(tag, time.time() - st.st_mtime):
            continue
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(entry.path)
            elif stat.S_ISREG(st.st_mode):
                os.unlink(entry.path)
            else:
                continue
        except FileNotFoundError:
            continue  # another run cleaned it first
        except OSError as exc:
            log.warning("could not remove the stale temporary %s: %s", entry.path, exc)
            continue
        log.info("removed %s, left by a run that no longer exists", entry.path)
        removed.append(entry.path)
    return removed


# -- destination checks -------------------------------------------------------------------

def _real(p) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(p)))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def overlaps(dst, protected: Iterable) -> str | None:
    """The first protected path that ``dst`` equals, lies inside, or contains."""
    d = _real(dst)
    for p in protected:
        rp = _real(p)
        if _inside(d, rp) or _inside(rp, d):
            return os.fspath(p)
    return None


def _describe_mode(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def describe(path) -> str:
    """What is at ``path`` (without following a final symlink), in words."""
    try:
        return _describe_mode(os.lstat(path).st_mode)
    except OSError:
        return "nothing"


def missing_parents(path) -> list[str]:
    """Check that ``path``'s parent can be created or written: every existing
    ancestor must be a directory and the nearest one writable. Returns the missing
    ancestors, outermost first (the caller creates them when it writes)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    missing: list[str] = []
    cur = parent
    while True:
        try:
            st = os.stat(cur)
        except FileNotFoundError:
            missing.append(cur)
            nxt = os.path.dirname(cur)
            if nxt == cur:
                raise DestinationError("no existing parent directory", file=path) from None
            cur = nxt
            continue
        except NotADirectoryError:
            # some component above is a file: name it
            probe = cur
            while probe != os.path.dirname(probe):
                probe = os.path.dirname(probe)
                if os.path.exists(probe) and not os.path.isdir(probe):
                    raise DestinationError(f"{probe} is {describe(probe)}, not a directory", file=path) from None
            raise DestinationError("a parent of the destination is not a directory", file=path) from None
        except PermissionError:
            raise DestinationError(f"permission denied on {cur}", file=path) from None
        _require_writable_dir(cur, st, path)
        return list(reversed(missing))


def _require_writable_dir(d: str, st: os.stat_result, path: str) -> None:
    """The parent ``d`` (already stat'ed) of ``path`` must be a directory we may write in."""
    if not stat.S_ISDIR(st.st_mode):
        raise DestinationError(f"parent {d} is {_describe_mode(st.st_mode)}, not a directory", file=path)
    if not os.access(d, os.W_OK | os.X_OK):
        raise DestinationError(f"parent directory {d} is not writable", file=path)


def make_parents(missing: list[str]) -> list[str]:
    """Create the directories :func:`missing_parents` listed; returns those this
    call created (for :func:`remove_created`)."""
    made = []
    for d in missing:
        try:
            os.mkdir(d)
            made.append(d)
        except FileExistsError:
            if not os.path.isdir(d):
                raise DestinationError(f"{d} is {describe(d)}, not a directory", file=d) from None
        except OSError as exc:
            raise DestinationError(f"cannot create {d}: {exc.strerror}", file=d) from None
    return made


def remove_created(made: list[str]) -> None:
    """Undo :func:`make_parents` where the directories are still empty."""
    for d in reversed(made):
        try:
            os.rmdir(d)
        except OSError:
            break


# -- single output files (decompress, reports) ------------------------------------------------

def check_output_file(out, *, overwrite: bool, protected_dirs: Iterable = (),
                      protected_files: Iterable = ()) -> str:
    """Refuse an output file path before any work: its parent must be an existing
    writable directory; it must not lie inside a protected directory (the
    checkpoint being read); an existing ``out`` must be a regular file, not one of
    ``protected_files`` (the source), and is replaced only with ``overwrite``.
    Returns the absolute path."""
    out = os.path.abspath(os.fspath(out))
    name = os.path.basename(out)
    if not name or name in (".", ".."):
        raise DestinationError("output must name a file", file=out)
    parent = os.path.dirname(out)
    try:
        pst = os.stat(parent)
    except FileNotFoundError:
        raise DestinationError(f"parent directory {parent} does not exist", file=out) from None
    except NotADirectoryError:
        raise DestinationError("a parent of the output is not a directory", file=out) from None
    except PermissionError:
        raise DestinationError(f"permission denied on {parent}", file=out) from None
    _require_writable_dir(parent, pst, out)
    for d in protected_dirs:
        if _inside(_real(out), _real(d)) or _inside(out, os.path.abspath(os.fspath(d))):
            raise DestinationError(f"output lies inside {d}, which this command reads: "
                                   "write it somewhere else", file=out)
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return out
    except OSError as exc:
        raise DestinationError(f"cannot inspect the output path: {exc.strerror}", file=out) from None
    if not stat.S_ISREG(st.st_mode):
        raise DestinationError(f"output exists and is {_describe_mode(st.st_mode)}: refusing to replace it", file=out)
    for f in protected_files:
        try:
            if os.path.samefile(out, f):
                raise DestinationError(f"output is the same file as {f}, which this command reads", file=out)
        except OSError:
            continue
    if not overwrite:
        raise CheckpointExistsError("output file exists (pass --overwrite to replace it)", file=out)
    return out


def publish_file(write: Callable[[str], None], out, *, overwrite: bool, protected_dirs: Iterable = (),
                 protected_files: Iterable = ()) -> str:
    """Write a file through ``write(tmp_path)`` and publish it at ``out`` atomically,
    refusing what :func:`check_output_file` refuses (checked again at the rename, so
    a file or folder appearing meanwhile is never replaced unless ``overwrite``
    allows it and it is a regular file). The temporary never outlives a failure."""
    protected_dirs, protected_files = list(protected_dirs), list(protected_files)
    out = check_output_file(out, overwrite=overwrite, protected_dirs=protected_dirs,
                            protected_files=protected_files)
    parent, name = os.path.split(out)
    clean_stale_temps(parent, name)
    tmp = os.path.join(parent, temp_name(name))
    try:
        write(tmp)
        if not os.path.isfile(tmp) or os.path.islink(tmp):
            raise DestinationError("the writer produced no file", file=out)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            rename_noreplace(tmp, out)
            return out
        except FileExistsError:
            if not overwrite:
                raise CheckpointExistsError("output file appeared while writing (pass --overwrite to replace "
                                            "it)", file=out) from None
        # overwrite: only a regular file that is not protected may be replaced
        check_output_file(out, overwrite=True, protected_dirs=protected_dirs, protected_files=protected_files)
        if rename_exchange(tmp, out):
            old_ok = os.path.isfile(tmp) and not os.path.islink(tmp) and not any(
                _same(tmp, f) for f in protected_files)
            if not old_ok:
                rename_exchange(tmp, out)  # put it back
                raise DestinationError("output changed while writing: left as it was", file=out)
            os.unlink(tmp)
        else:
            os.replace(tmp, out)  # no exchange here: the check above is the guard
            _fsync_dir(parent)
        return out
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", tmp, exc)
        raise


def _same(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# -- checkpoint directories ------------------------------------------------------------------

def check_directory_destination(dst, *, overwrite: bool, protected: Iterable = (),
                                replaceable: Callable[[str], str | None]) -> list[str]:
    """Refuse a destination directory before any work. ``replaceable(path)`` says
    why an existing non-empty directory may NOT be replaced (``None``: it may).
    Returns the parent directories that will have to be created."""
    path = os.path.abspath(os.fspath(dst))
    name = os.path.basename(path)
    if not name or name in (".", ".."):
        raise DestinationError("destination must name a directory", file=path)
    hit = overlaps(path, protected)
    if hit is not None:
        raise DestinationError(f"destination overlaps the source {hit} (same path, inside it, or containing "
                               "it): choose another destination", file=path)
    missing = missing_parents(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return missing
    except OSError as exc:
        raise DestinationError(f"cannot inspect the destination: {exc.strerror}", file=path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointExistsError(f"destination exists and is {_describe_mode(st.st_mode)}: never replaced",
                                    file=path)
    try:
        empty = not any(True for _ in os.scandir(path))
    except OSError as exc:
        raise DestinationError(f"cannot list the destination: {exc.strerror}", file=path) from None
    if empty:
        return missing
    if not overwrite:
        raise CheckpointExistsError("destination exists and is not empty (pass --overwrite to replace a "
                                    "Birkhoff checkpoint there)", file=path)
    why = replaceable(path)
    if why is not None:
        raise CheckpointExistsError(f"--overwrite replaces only a Birkhoff checkpoint, and this is not one: {why}",
                                    file=path)
    return missing


def publish_directory(tmp, dst, *, overwrite: bool, replaceable: Callable[[str], str | None]) -> None:
    """Move the finished directory ``tmp`` to ``dst`` atomically. Without
    ``overwrite`` nothing at ``dst`` is ever replaced (an empty directory is
    removed first, and only if it is still empty). With ``overwrite`` the old
    directory must pass ``replaceable`` after it has been swapped out; otherwise
    it is swapped back and nothing is lost."""
    tmp, dst = os.fspath(tmp), os.path.abspath(os.fspath(dst))
    for _ in range(3):
        if os.path.isdir(dst) and not os.path.islink(dst):
            try:
                os.rmdir(dst)  # an empty directory is no result: it may go
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise DestinationError(f"cannot replace the empty destination: {exc.strerror}",
                                           file=dst) from None
        try:
            rename_noreplace(tmp, dst)
            return
        except FileExistsError:
            pass
        if not overwrite:
            raise CheckpointExistsError("destination appeared while saving (another run, or another "
                                        "program): left as it is; nothing was written", file=dst)
        try:
            st = os.lstat(dst)
        except FileNotFoundError:
            continue  # gone again: retry the plain publish
        if not stat.S_ISDIR(st.st_mode):
            raise CheckpointExistsError(f"destination became {_describe_mode(st.st_mode)} while saving: "
                                        "never replaced", file=dst)
        why = replaceable(dst)
        if why is not None:
            raise CheckpointExistsError(f"destination changed while saving and is no longer a Birkhoff "
                                        f"checkpoint ({why}): left as it is", file=dst)
        if rename_exchange(tmp, dst):
            why = replaceable(tmp)  # what we swapped out: still the checkpoint we agreed to replace?
            if why is not None:
                if not rename_exchange(tmp, dst):
                    # keep what was there under a name no clean-up ever touches
                    kept = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.kept-{uuid.uuid4().hex[:8]}")
                    os.rename(tmp, kept)
                    log.error("could not swap %s back; the replaced directory is kept at %s", dst, kept)
                    raise CheckpointExistsError(f"destination changed while saving; the previous content is "
                                                f"kept at {kept}", file=dst)
                raise CheckpointExistsError(f"destination changed while saving ({why}): left as it is",
                                            file=dst)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        # no exchange on this system: move the old one aside under our temporary name
        # family (a later run removes it if we die), then publish without replacing
        old = os.path.join(os.path.dirname(dst), temp_name(os.path.basename(dst)))
        os.rename(dst, old)
        try:
            rename_noreplace(tmp, dst)
        except BaseException:
            try:
                rename_noreplace(old, dst)
            except OSError:
                log.error("could not move %s back; the previous checkpoint is kept at %s", dst, old)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    raise CheckpointExistsError("destination keeps changing while saving: giving up", file=dst)
