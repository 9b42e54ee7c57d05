"""The zoo driver's Ray plumbing: connecting (or starting a private local Ray), warming
one worker per task slot while the driver sets up, the cluster's task slots, and the
memory a shard task asks for."""

from __future__ import annotations

import logging
import time

from .errors import WorkflowError
from .redaction import redact
from .shard_task import warm_worker
from .sharding import Shard

log = logging.getLogger(__name__)

_BASE_TASK_MEMORY = 512 * 1024**2
# float64 working copy of the shard, its points, indices, the decoded check and
# the packed output, relative to the source bytes of float32 tensors
_MEMORY_PER_SOURCE_BYTE = 8

_MAX_WARM_TASKS = 64
_WARMING: list = []  # refs of the warm-up tasks connect_ray started, until wait_for_warm_workers


def connect_ray(address: str | None = None, workers: int | None = None, cpus_per_task: int = 1) -> None:
    """The cluster at ``address`` / ``RAY_ADDRESS`` (which must answer within 60 s, else
    :class:`eval_jobs.ray_cluster.RayUnavailableError`), or, with neither, a private local
    Ray on 127.0.0.1 whatever other Ray clusters on the machine did (see eval_jobs/ray_cluster.py).
    Once connected, later calls do nothing."""
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    from eval_jobs.ray_cluster import init_ray

    init_ray(address, num_cpus=workers * cpus_per_task if workers else None, log_to_driver=True)
    import ray  # after init_ray: it sets the loopback environment before ray is first imported

    res = ray.cluster_resources()
    log.info("Ray cluster: %s CPU, %s GPU, %.1f GiB memory", res.get("CPU", 0), res.get("GPU", 0),
             res.get("memory", 0) / 2**30)
    # one warm-up per task slot, awaited only before the first model (wait_for_warm_workers):
    # workers start, import and load the kernel cache meanwhile (shard_task.warm_worker)
    try:
        slots, _, _ = _cluster_slots(workers, cpus_per_task)
    except WorkflowError:  # no node fits a task: the model run says so
        return
    warm = ray.remote(warm_worker).options(name="warm_worker", num_cpus=cpus_per_task, max_retries=0)
    _WARMING.extend(warm.remote() for _ in range(min(slots, _MAX_WARM_TASKS)))


def wait_for_warm_workers(timeout: float = 180.0) -> None:
    """Wait for the warm-up tasks :func:`connect_ray` started (worker start, imports,
    kernel cache): a per-job cost, logged as such rather than added to the first
    model's time. A failed or slow warm-up is only logged: the shard tasks import and
    compile for themselves then."""
    import ray

    if not _WARMING:
        return
    refs = list(_WARMING)
    _WARMING.clear()
    t0 = time.perf_counter()
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    infos = []
    for ref in done:
        try:
            infos.append(ray.get(ref))
        except Exception as exc:  # the shard tasks will meet the same problem and report it
            log.warning("worker warm-up failed: %s: %s", type(_cause(exc)).__name__, redact(_cause(exc)))
    compiled = sum(i.get("compiled", 0) for i in infos)
    log.info("%d worker(s) ready in %.1f s (kernel signatures: %d compiled, %d loaded from the cache)%s",
             len(infos), time.perf_counter() - t0, compiled, sum(i.get("loaded_from_cache", 0) for i in infos),
             f"; {len(pending)} still warming up" if pending else "")


def _cluster_slots(workers: int | None, cpus_per_task: int = 1) -> tuple[int, bool, float]:
    """(parallel task slots, GPUs present, largest node memory in bytes)."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    slots = gpus if gpus else int(res.get("CPU", 1)) // max(1, cpus_per_task)
    if workers:
        slots = min(slots, workers) if slots else workers
    alive = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    node_mem = max((r.get("memory", 0) for r in alive), default=0)
    if not gpus and max((r.get("CPU", 0) for r in alive), default=0) < cpus_per_task:
        raise WorkflowError(f"no Ray node has {cpus_per_task} CPUs for one shard task (lower --cpus-per-task)")
    return max(1, slots), gpus > 0, float(node_mem)


def _task_memory(shard: Shard, node_mem: float) -> int:
    want = _BASE_TASK_MEMORY + _MEMORY_PER_SOURCE_BYTE * shard.nbytes
    if node_mem and want > 0.9 * node_mem:
        log.warning("shard %s wants %.1f GiB, more than any node offers; requesting %.1f GiB",
                    shard.stem, want / 2**30, 0.9 * node_mem / 2**30)
        want = int(0.9 * node_mem)
    return int(want)


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc
