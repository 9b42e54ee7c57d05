"""A lease object with a deadline: one holder at a time for a key of any store.

Taking the lease is a create-if-absent of a small JSON object (``if_absent``:
S3 ``If-None-Match: *``, ``os.link`` locally), so of two runs that try at once
exactly one gets it. The holder renews it (compare-and-swap on its ETag) while
it works and deletes it (again only its own version) when done.

A holder that died leaves its lease behind. Another run takes it over once the
deadline has passed, or at once when the holder's process is gone on this very
machine (same boot id and pid namespace, and the pid is dead or belongs to a
newer process).
Taking over deletes exactly the version that was judged stale (``if_match``),
so two runs breaking one stale lease cannot both win.

Deadlines are wall-clock seconds: hosts that share a store need clocks within
a small fraction of the lease time of each other (NTP gives milliseconds).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from .errors import CommitLeaseError, ConditionFailedError, StoreError
from .store import Store

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 300.0
_MAX_LEASE_BYTES = 4096


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _pid_namespace() -> int | None:
    """Containers on one host share its boot id but not their pids: compare pids
    only within one pid namespace."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (None when no such process):
    tells a live holder from a newer process that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields and fields[0] == "Z":  # a zombie holds nothing
        return None
    try:
        return int(fields[19])  # field 22 of stat; fields[] starts at field 3
    except (IndexError, ValueError):
        return None


def _holder_gone(body: dict) -> bool:
    """True only when the holder certainly died: it ran on this machine since its last
    boot and its process no longer exists (or the pid now names another process)."""
    boot, ns = _boot_id(), _pid_namespace()
    if not boot or body.get("boot_id") != boot or body.get("host") != socket.gethostname():
        return False
    if ns is None or body.get("pid_ns") != ns:
        return False
    pid, start = body.get("pid"), body.get("pid_start")
    if not isinstance(pid, int) or pid <= 0:
        return False
    now = _process_start(pid)
    return now is None or (isinstance(start, int) and now != start)


@dataclass
class Lease:
    store: Store
    key: str
    token: str
    etag: str
    deadline: float
    seconds: float

    def _body(self) -> bytes:
        return _lease_body(self.token, self.seconds)

    @property
    def remaining(self) -> float:
        return self.deadline - time.time()

    def renew_if_due(self) -> None:
        """Renew when less than half the lease time is left: call between the steps of
        the guarded work. Raises :class:`CommitLeaseError` when the lease was lost."""
        if self.remaining < self.seconds / 2:
            self.renew()

    def renew(self) -> None:
        if self.remaining <= 0:
            raise CommitLeaseError(f"lease {self.store.url(self.key)} expired while held (the work took longer "
                                   f"than {self.seconds:.0f} s between renewals); nothing more is written")
        body = self._body()
        try:
            info = self.store.put_bytes(self.key, body, if_match=self.etag)
        except ConditionFailedError:
            raise CommitLeaseError(f"lease {self.store.url(self.key)} was taken over by another run") from None
        self.etag = info.etag or self.etag
        self.deadline = json.loads(body)["deadline"]

    def release(self) -> None:
        try:
            self.store.delete(self.key, if_match=self.etag)
        except ConditionFailedError:
            log.warning("lease %s was taken over before its release", self.store.url(self.key))
        except StoreError as exc:  # it expires on its own
            log.warning("could not release lease %s (%s); it expires in %.0f s", self.store.url(self.key), exc,
                        max(0.0, self.remaining))

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lease_body(token: str, seconds: float) -> bytes:
    now = time.time()
    pid = os.getpid()
    return json.dumps({
        "owner": token, "host": socket.gethostname(), "boot_id": _boot_id(), "pid_ns": _pid_namespace(), "pid": pid,
        "pid_start": _process_start(pid), "acquired": now, "deadline": now + seconds,
    }, sort_keys=True).encode()


def acquire(store: Store, key: str, seconds: float = DEFAULT_LEASE_SECONDS, *, wait: float | None = None,
            poll: float = 0.5) -> Lease:
    """Take the lease ``key`` for ``seconds``, waiting while a live holder has it
    (at most ``wait`` seconds: by default a little over one lease time, after which
    a holder that stopped renewing has expired). Raises :class:`CommitLeaseError`."""
    if seconds <= 0:
        raise ValueError("lease seconds must be > 0")
    token = uuid.uuid4().hex
    give_up = time.monotonic() + (seconds * 1.5 + 10 if wait is None else wait)
    announced = None
    while True:
        body = _lease_body(token, seconds)
        try:
            info = store.put_bytes(key, body, if_absent=True)
            return Lease(store, key, token, info.etag or "", json.loads(body)["deadline"], seconds)
        except ConditionFailedError:
            pass
        got = store.read(key, _MAX_LEASE_BYTES)
        if got is None:
            continue  # released between our create and our read
        raw, info = got
        try:
            held = json.loads(raw)
            deadline = float(held["deadline"])
        except (ValueError, KeyError, TypeError):
            held, deadline = {}, 0.0  # unreadable: a half-broken store or an old writer; treat as stale
        stale = time.time() > deadline
        if stale or _holder_gone(held):
            why = "expired" if stale else f"its holder (pid {held.get('pid')}) is gone"
            log.warning("taking over lease %s held by %s:%s (%s)", store.url(key), held.get("host"), held.get("pid"),
                        why)
            try:
                store.delete(key, if_match=info.etag)
            except ConditionFailedError:
                pass  # another run took it over first, or its holder renewed it
            continue
        if time.monotonic() > give_up:
            raise CommitLeaseError(
                f"lease {store.url(key)} is held by {held.get('host')} pid {held.get('pid')} until "
                f"{time.strftime('%H:%M:%S', time.localtime(deadline))}; gave up waiting")
        if announced != held.get("owner"):
            log.info("waiting for lease %s held by %s pid %s (at most until %s)", store.url(key), held.get("host"),
                     held.get("pid"), time.strftime("%H:%M:%S", time.localtime(deadline)))
            announced = held.get("owner")
        time.sleep(poll)
