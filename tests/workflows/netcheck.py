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


# Ray's dashboard asks the link-local cloud metadata service which cloud it runs on, once
# at start, whatever RAY_USAGE_STATS_ENABLED and include_dashboard say: the dashboard always
# loads UsageStatsHead, whose run() calls usage_lib.get_cluster_config_to_report(), which
# probes 169.254.169.254 (ray/_common/usage/usage_lib.py, Ray 2.60). No setting turns it off.
# On a cloud VM the probe connects; elsewhere it fails. It binds nothing and joins no
# cluster, so it is recorded apart (SocketLog.exempt) rather than as a violation; any
# other process, or any other outside address, still is one.
CLOUD_METADATA = "169.254.169.254"
RAY_DASHBOARD = "ray/dashboard/dashboard.py"


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _cmdline(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
        return " ".join(cmd) if cmd else p.name()
    except psutil.Error:
        return "?"


def _name(cmdline: str) -> str:
    return " ".join(cmdline.split(" ")[:3])[:120]


@dataclass
class SocketLog:
    """Everything seen over the samples: listening sockets and outside connections."""

    listening: set = field(default_factory=set)  # (process, ip, port)
    violations: set = field(default_factory=set)  # human-readable lines
    exempt: set = field(default_factory=set)  # Ray dashboard's cloud-metadata probe (see above)

    def sample(self, roots: list[int], *, extra: list[psutil.Process] = ()) -> None:
        procs = {p.pid: p for r in roots for p in tree(r)}
        procs.update({p.pid: p for p in extra})
        for p in procs.values():
            try:
                conns = p.net_connections(kind="inet")
            except psutil.Error:  # exited between listing and reading
                continue
            cmdline = _cmdline(p)
            name = _name(cmdline)
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    self.listening.add((name, c.laddr.ip, c.laddr.port))
                    if not is_loopback(c.laddr.ip):
                        self.violations.add(f"{name} (pid {p.pid}) listens on {c.laddr.ip}:{c.laddr.port}")
                elif c.raddr and not is_loopback(c.raddr.ip):
                    line = f"{name} (pid {p.pid}) connects to {c.raddr.ip}:{c.raddr.port} ({c.status})"
                    metadata_probe = (c.raddr.ip == CLOUD_METADATA and c.raddr.port == 80
                                      and RAY_DASHBOARD in cmdline)
                    (self.exempt if metadata_probe else self.violations).add(line)

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
