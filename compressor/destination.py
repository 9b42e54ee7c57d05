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
and removes only the former (:mod:`compressor.temp_names`); the renames themselves
are :mod:`compressor.renames`. This module holds the checks and the publishing.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import uuid
from typing import Callable, Iterable

from .errors import CheckpointExistsError, DestinationError
from .format.fsio import fsync_dir as _fsync_dir
from .format.fsio import umask as _umask
from .renames import rename_exchange, rename_noreplace
from .temp_names import clean_stale_temps, temp_name

log = logging.getLogger(__name__)


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


def _lstat_or_none(path: str, what: str) -> os.stat_result | None:
    """What is at ``path`` (a final symlink not followed); None when nothing is."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DestinationError(f"cannot inspect {what}: {exc.strerror}", file=path) from None


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
    st = _lstat_or_none(out, "the output path")
    if st is None:
        return out
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
    st = _lstat_or_none(path, "the destination")
    if st is None:
        return missing
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
            _check_swapped_out(tmp, dst, replaceable)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _replace_without_exchange(tmp, dst)
        return
    raise CheckpointExistsError("destination keeps changing while saving: giving up", file=dst)


def _check_swapped_out(tmp: str, dst: str, replaceable: Callable[[str], str | None]) -> None:
    """After the exchange ``tmp`` holds what was at ``dst``: it must still be the
    checkpoint the caller agreed to replace, or it is swapped back (or, where that
    fails, kept under a name no clean-up touches) and the save refused."""
    why = replaceable(tmp)
    if why is None:
        return
    if not rename_exchange(tmp, dst):
        kept = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.kept-{uuid.uuid4().hex[:8]}")
        os.rename(tmp, kept)
        log.error("could not swap %s back; the replaced directory is kept at %s", dst, kept)
        raise CheckpointExistsError(f"destination changed while saving; the previous content is "
                                    f"kept at {kept}", file=dst)
    raise CheckpointExistsError(f"destination changed while saving ({why}): left as it is", file=dst)


def _replace_without_exchange(tmp: str, dst: str) -> None:
    """No exchange on this system: move the old directory aside under our temporary
    name family (a later run removes it if we die), then publish without replacing."""
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
