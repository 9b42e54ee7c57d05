"""Connecting to Ray: a private local Ray on loopback by default, or a cluster that must answer.

Used by the zoo driver (``workflows.driver.connect_ray``) and the evaluation
fan-out (``eval_jobs.runner``), the lowest layer that has Ray.

* **No address** (no argument, no ``RAY_ADDRESS``): start a new single-node Ray
  for this process, ``ray.init(address="local")``. A plain ``ray.init()`` would
  first read ``<ray temp dir>/ray_current_cluster``, the record of the last
  ``ray start``, and connect there: a cluster that died without ``ray stop``
  left the driver retrying for 13 minutes (issue 10).
* **Loopback only**: Ray replaces ``127.0.0.1``/``localhost`` with the host's
  outward address wherever it is given (``--node-ip-address``, ``ray.init``
  addresses: ``services.resolve_ip_for_localhost``), and then binds and
  advertises that address, unless multi-node clusters are disabled with
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``. Then the node IP is 127.0.0.1 and GCS,
  raylet, object manager, workers, dashboard and agents listen on it alone.
  :data:`LOOPBACK_ENV` is set for the private Ray (its processes inherit it) and
  for a driver whose address is a loopback one; ``ray start`` on this machine
  takes the same variable (see the README).
* **An explicit address** must answer within :data:`CONNECT_TIMEOUT_S`: its port
  is probed first, and Ray's own connection retries (20 attempts of about 40 s
  each) are cut to one bounded attempt. Otherwise :class:`RayUnavailableError`,
  whose message is one line naming the address and what to do.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import time

from compressor.errors import BirkhoffError

log = logging.getLogger(__name__)

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
CONNECT_TIMEOUT_S = 60.0
_PROBE_S = 10.0  # of the budget: the TCP probe of the GCS port; Ray's one attempt takes the rest
# Ray's connection to an existing GCS: one attempt (not 20 of ~40 s each) of about 5 + 5 + 15 s
# (gRPC connect, pubsub connect, cluster-id fetch); read by Ray at import and at ray.init
_BOUNDED_CONNECT_ENV = {"RAY_gcs_server_port_wait_time_s": "1", "RAY_py_gcs_connect_timeout_s": "15"}


class RayUnavailableError(BirkhoffError, RuntimeError):
    """The Ray cluster named by an address or RAY_ADDRESS does not answer."""


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` or ``ray://host:port`` address; None for
    ``auto`` (Ray resolves it) and anything else Ray may understand."""
    a = address.strip()
    if a.startswith("ray://"):
        a = a[len("ray://"):]
    if "://" in a or ":" not in a:
        return None
    host, _, port = a.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


def _probe(host: str, port: int, seconds: float) -> str | None:
    """None once ``host:port`` accepts a TCP connection within ``seconds``, else the last error."""
    deadline = time.monotonic() + seconds
    err = "no attempt"
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.2, min(3.0, left))):
                return None
        except OSError as exc:
            err = exc.strerror or type(exc).__name__
        if time.monotonic() + 0.5 > deadline:
            return err
        time.sleep(0.5)


@contextlib.contextmanager
def _env(values: dict[str, str]):
    """Set the variables not already set by the user; restore them afterwards."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _fail(address: str, why: str) -> RayUnavailableError:
    return RayUnavailableError(
        f"Ray cluster at {address} does not answer ({why}); start it, fix --ray-address/RAY_ADDRESS, "
        f"or unset both to run a private local Ray")


def init_ray(address: str | None = None, *, num_cpus: int | None = None, timeout: float = CONNECT_TIMEOUT_S,
             **init_kwargs) -> str:
    """Connect this process to Ray (a no-op when it already is) and return the address
    used: ``"local"`` for a private local Ray (``num_cpus`` applies to it only), else
    the cluster's. ``init_kwargs`` go to ``ray.init``.

    The environment is set before ``ray`` is first imported: Ray reads it at import
    (``ENABLE_RAY_CLUSTER``, its C++ config). In a process that imported ``ray``
    earlier, the loopback setting may come too late (a warning says so) and Ray's
    own connection attempt may take up to ~40 s more; the port probe still applies."""
    target = address or os.environ.get("RAY_ADDRESS") or None
    hp = _host_port(target) if target else None
    if target is None or (hp is not None and _is_loopback(hp[0])):
        os.environ.update(LOOPBACK_ENV)  # inherited by the local Ray's processes too
    bounded = _env(_BOUNDED_CONNECT_ENV) if target else contextlib.nullcontext()
    with bounded:
        import ray

        if ray.is_initialized():
            return target or "local"
        if target is None:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **init_kwargs)
            node_ip = ray.util.get_node_ip_address()
            if not _is_loopback(node_ip):
                log.warning("the local Ray advertises %s, not 127.0.0.1: ray was imported before "
                            "eval_jobs.ray_cluster could set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0", node_ip)
            return "local"
        t0 = time.monotonic()
        if hp is not None:
            why = _probe(hp[0], hp[1], min(_PROBE_S, timeout / 3))
            if why is not None:
                raise _fail(target, f"{why} on port {hp[1]}")
        try:
            ray.init(address=address, **init_kwargs)
        except Exception as exc:  # ConnectionError, RuntimeError, ValueError from Ray: one line, no traceback
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise _fail(target, f"{type(exc).__name__}: {line}") from None
    log.info("connected to Ray at %s in %.1f s", target, time.monotonic() - t0)
    return target
