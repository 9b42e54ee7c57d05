"""Temporary sibling names that carry their owner (host, boot, pid and process start
time), and the clean-up of the temporaries that dead runs left: a later run tells a
dead owner's leftovers from a live run's work in progress and removes only the former."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import stat
import time
import uuid

log = logging.getLogger(__name__)


#: leftovers of another host (a shared file system) are only removed after this long
FOREIGN_STALE_SECONDS = 24 * 3600
#: leftovers of an older build, whose names carry no owner, after this long
LEGACY_STALE_SECONDS = 3600


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
