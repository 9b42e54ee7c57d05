"""The TCP/UDP sockets of process trees (psutil): what listens where, what connects where.

Not a test module: the loopback tests sample the trees of the servers they
started while those servers work, and collect anything off 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field

import psutil


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _name(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
        return " ".join(cmd[:3])[:120] if cmd else p.name()
    except psutil.Error:
        return "?"


@dataclass
class SocketLog:
    """Everything seen over the samples: listening sockets and outside connections."""

    listening: set = field(default_factory=set)  # (process, ip, port)
    violations: set = field(default_factory=set)  # human-readable lines

    def sample(self, roots: list[int], *, extra: list[psutil.Process] = ()) -> None:
        procs = {p.pid: p for r in roots for p in tree(r)}
        procs.update({p.pid: p for p in extra})
        for p in procs.values():
            try:
                conns = p.net_connections(kind="inet")
            except psutil.Error:  # exited between listing and reading
                continue
            name = _name(p)
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    self.listening.add((name, c.laddr.ip, c.laddr.port))
                    if not is_loopback(c.laddr.ip):
                        self.violations.add(f"{name} (pid {p.pid}) listens on {c.laddr.ip}:{c.laddr.port}")
                elif c.raddr and not is_loopback(c.raddr.ip):
                    self.violations.add(f"{name} (pid {p.pid}) connects to {c.raddr.ip}:{c.raddr.port} "
                                        f"({c.status})")

    def watch(self, roots: list[int], until, *, interval: float = 0.5, timeout: float = 600) -> None:
        """Sample every ``interval`` s until ``until()`` is true (always at least once)."""
        deadline = time.monotonic() + timeout
        while True:
            self.sample(roots)
            if until() or time.monotonic() > deadline:
                return
            time.sleep(interval)

    def listeners_matching(self, text: str) -> set:
        return {entry for entry in self.listening if text in entry[0]}
