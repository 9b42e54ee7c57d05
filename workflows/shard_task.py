"""What one Ray task does for one shard (plain Python: testable without Ray).

Open the source on this node, read only the shard's tensors, compress them
(CUDA index search on GPU workers, Numba CPU elsewhere), write the shard into a
local temporary folder, name it after the sha256 of its bytes, upload it under
the checkpoint's prefix, then upload a small resume record
(``_work/<tensor-set hash>.json``) and return the same record to the driver: a
:class:`workflows.payloads.ShardResult` (the shard's file record, its tensors'
manifest entries and statistics).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import tempfile
import time

from .payloads import CompressJob, ShardRecord, ShardResult

log = logging.getLogger(__name__)

WORK_DIR = "_work/"


def work_key(prefix: str, names_hash: str) -> str:
    """Resume record of the shard holding exactly the tensors ``names_hash`` names:
    any later run whose plan has that shard resumes it, whatever its worker count."""
    return f"{prefix}{WORK_DIR}{names_hash}.json"


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _limit_threads(cpus: int) -> None:
    """Use the CPUs the task reserved, no more: Numba and torch default to every
    core of the node, which oversubscribes it as soon as two tasks share a node."""
    import torch

    n = max(1, cpus)
    torch.set_num_threads(n)
    try:
        import numba

        from numba_kernels import threads

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        threads.set_threads(n)  # the codec kernels' own pool (numba_kernels/threads.py)
    except ImportError:  # the reference backend needs no numba
        pass


def warm_worker() -> dict:
    """Import what a shard task imports and load (or compile) the Numba kernels. The
    driver starts one per task slot as soon as it connects, so that worker processes
    start, import torch and the codec and load the kernel cache while it sets up
    MLflow and the zoo, and waits for them before the first model (a per-job cost,
    logged as such); the shard tasks then reuse those processes."""
    t0 = time.perf_counter()
    from compressor import checkpoint, sources  # noqa: F401

    from . import store, zoo  # noqa: F401
    import torch

    res: dict = {}
    try:
        from compressor.backends import warm_up
    except ImportError:  # the reference backend needs no numba
        pass
    else:
        res = warm_up(cuda=None if torch.cuda.is_available() else False)
    return dict(res, pid=os.getpid(), node=socket.gethostname(), seconds=time.perf_counter() - t0)


def _kernels_compiled() -> int:
    try:
        from numba_kernels.warmup import compile_counts
    except ImportError:  # the reference backend needs no numba
        return 0
    return compile_counts()["compiled"]


_hash_memo: dict[tuple, str] = {}


def check_source_sha256(src, want: str | None, uri: str) -> None:
    """The source this worker resolved must be the bytes the driver keyed the commit
    under (a worker resolves its own copy: another node's cache, a re-download, a
    file replaced since planning). Hashed once per worker process while the weight
    files' size, mtime and inode stay the same."""
    from compressor.errors import SourceChangedError

    from .redaction import redact_uri

    if not want:
        return
    key = tuple((str(f), st.st_size, st.st_mtime_ns, st.st_ino)
                for f in sorted(src.weight_files) for st in [os.stat(f)])
    got = _hash_memo.get(key)
    if got is None:
        got = _hash_memo[key] = src.source_hash()
    if got != want:
        raise SourceChangedError(f"the source's sha256 is {got[:16]}..., the run planned and keys its commit under "
                                 f"{want[:16]}...; it changed since planning: nothing of it is committed",
                                 file=redact_uri(uri))


def _open_checked_source(job: CompressJob):
    """Resolve the job's source on this node and check it is what the driver planned:
    the bytes it keyed the commit under, the tensors' shapes and dtypes."""
    from compressor.errors import SourceError
    from compressor.sources import open_source

    from .zoo import resolve_source

    local = resolve_source(job.source, cache_dir=job.cache_dir, s3_endpoint_url=job.store.get("endpoint_url"))
    src = open_source(local, revision=job.revision)
    check_source_sha256(src, job.source_sha256, job.source)
    index = {i.name: i for i in src.tensor_index()}
    for name, (shape, dtype) in job.expected.items():
        info = index.get(name)
        if info is None or list(info.shape) != list(shape) or info.dtype != dtype:
            raise SourceError("the source changed since the driver planned the shards", file=src.uri, tensor=name)
    return src, index


# what a shard's result records of compressor.stats' counts
_SHARD_COUNTS = ("params", "abs_error_sum", "compressed_tensors", "raw_tensors")


def run_shard(job: CompressJob) -> ShardResult:
    """Compress one work unit into one file shard in the store; returns (and stores as
    the unit's resume record) its :class:`ShardResult`."""
    from compressor.backends import resolve_backend
    from compressor.checkpoint import compress_tensors
    from compressor.checkpoint_writer import CheckpointWriter
    from compressor.codecs import codec_version_of, config_from_dict
    from compressor.stats import entry_stats

    from . import redaction
    from .commit import StoreSink
    from .sharding import SHARD_SUFFIX, shard_filename
    from .store import open_store

    redaction.install(job.log_level)
    _limit_threads(job.cpus)
    t0 = time.perf_counter()
    unit = job.unit
    tag = f"{job.model} shard {unit.index + 1}/{unit.count}"
    store = open_store(job.store)
    src, index = _open_checked_source(job)
    backend = resolve_backend(job.backend)
    config = config_from_dict(job.config)
    log.info("%s: compressing %d tensors (%.1fM params) with %s", tag, len(unit.names),
             sum(index[n].numel for n in unit.names) / 1e6, backend.backend.value)
    timings: dict = {}
    entries = compress_tensors(src, list(unit.names), config, backend.kernels, progress=False, timings=timings)
    counts = entry_stats(entries.values())
    stats = {k: counts[k] for k in _SHARD_COUNTS}
    stats["compress_seconds"] = float(timings.get("seconds", 0.0))
    with tempfile.TemporaryDirectory(prefix="birkhoff-shard-") as d:
        # the name carries the sha256 of the bytes, known once they are written
        writer = CheckpointWriter(d, StoreSink(store, job.prefix), backend.kernels)
        record, meta = writer.write_shard(unit.stem + SHARD_SUFFIX, entries,
                                          name_from_sha256=lambda sha: shard_filename(unit.stem, sha))
        del entries, writer
    stats.update({
        "wall_seconds": time.perf_counter() - t0,
        "peak_rss_bytes": peak_rss_bytes(),
        "pid": os.getpid(),
        "node": socket.gethostname(),
        "backend": backend.backend.value,
        # kernels this worker process compiled so far (its warm-up included): 0 once the
        # machine's kernel cache is warm (numba_kernels/cache.py)
        "kernels_compiled": _kernels_compiled(),
    })
    result = ShardResult(job.model, unit.index, unit.names_hash, config.config_hash(), codec_version_of(config),
                         ShardRecord(record["file"], record["bytes"], record["sha256"]), meta, stats)
    store.put_bytes(work_key(job.prefix, unit.names_hash), result.to_json())
    log.info("%s: done in %.1f s (codec %.1f s, %d bytes, peak RSS %.0f MiB)", tag, stats["wall_seconds"],
             stats["compress_seconds"], record["bytes"], stats["peak_rss_bytes"] / 2**20)
    return result
