"""The zoo run's driver: per model, plan shards from the tensor index, run one Ray
task per shard, then commit the checkpoint to the store with its manifest last.

Store layout, one prefix per (model, source, config, codec version)::

    <model>/<source sha256[:16]>/<config hash>-codec<V>/
        shard-00001-of-00004-<sha256[:24]>.safetensors ...  uploaded by the tasks
        config.json ...                        architecture files, by the driver
        manifest.json                          the commit marker, written last
        _work/<tensor-set hash>.json           resume records, removed at commit
        _commit.lease                          while a run commits (workflows/commit.py)

A prefix without ``manifest.json`` is not a checkpoint: :func:`fetch_checkpoint`
refuses it and the next run resumes it (shards whose resume record and object
match are kept, the rest are recomputed). A complete committed checkpoint (every
file present with its recorded size and sha256) makes the next run skip the
model without writing anything; an incomplete one is repaired: the shards that
are still intact are kept, the others recomputed, and the manifest replaced.
Concurrent runs on one store are safe: see :mod:`workflows.commit`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

from compressor import format as fmt
from compressor.codecs import codec_params, codec_tag, codec_version_of, config_to_dict
from compressor.stats import manifest_stats, size_ratio

from . import commit as commits
from .errors import StoreError, TransientStoreError, WorkflowError
from .lease import DEFAULT_LEASE_SECONDS
from .redaction import redact, redact_uri
from .payloads import CompressJob, ResumeRecordError, ShardRecord, ShardResult, WorkUnit
from .sharding import Shard, plan_work_units, shard_count, work_units_from_manifest
from .cluster import _cause, _cluster_slots, _task_memory
from .shard_task import WORK_DIR, run_shard, work_key
from .store import STALE_SECONDS, Store
from .zoo import ModelSpec, resolve_source

log = logging.getLogger(__name__)

MANIFEST = fmt.MANIFEST_NAME
# source bytes per Ray work unit (each unit becomes one file shard); not the file-shard cap of
# compressor.checkpoint.DEFAULT_MAX_SHARD_BYTES
DEFAULT_MAX_UNIT_SOURCE_BYTES = 512 * 1024**2


def _env_seconds(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


@dataclass
class RunOptions:
    store: Store
    force: bool = False
    workers: int | None = None
    max_shard_bytes: int = DEFAULT_MAX_UNIT_SOURCE_BYTES
    task_retries: int = 3
    cpus_per_task: int = 1
    backend: str = "auto"
    cache_dir: str | None = None
    log_level: str = "INFO"
    git_commit: str = "unknown"
    # evaluate: "all" (skipped models too: the nightly figures), "new" (those compressed now), "none"
    eval_mode: str = "all"
    # the commit lease's time (renewed while held), the age after which unreferenced
    # objects are a dead run's orphans, and after which a temporary or multipart
    # upload is a dead writer's (compress_all.py checks the environment values)
    lease_seconds: float = field(default_factory=lambda: _env_seconds("BIRKHOFF_COMMIT_LEASE_S",
                                                                      DEFAULT_LEASE_SECONDS))
    orphan_age: float = field(default_factory=lambda: _env_seconds("BIRKHOFF_ORPHAN_AGE_S",
                                                                   commits.ORPHAN_AGE_SECONDS))
    stale_seconds: float = field(default_factory=lambda: _env_seconds("BIRKHOFF_STALE_UPLOAD_S", STALE_SECONDS))
    # how many checkpoints --force replaced stay under <prefix>history/ (None: all of them)
    keep_replaced: int | None = None

    def __post_init__(self) -> None:
        bad = []
        if self.workers is not None and self.workers < 1:
            bad.append(f"workers must be >= 1, got {self.workers}")
        if self.max_shard_bytes < 1:
            bad.append(f"max_shard_bytes must be >= 1, got {self.max_shard_bytes}")
        if self.keep_replaced is not None and self.keep_replaced < 0:
            bad.append(f"keep_replaced must be >= 0, got {self.keep_replaced}")
        if self.task_retries < 0:
            bad.append(f"task_retries must be >= 0, got {self.task_retries}")
        if self.cpus_per_task < 1:
            bad.append(f"cpus_per_task must be >= 1, got {self.cpus_per_task}")
        if self.eval_mode not in ("new", "all", "none"):
            bad.append(f"eval_mode must be new, all or none, got {self.eval_mode!r}")
        for name in ("lease_seconds", "orphan_age", "stale_seconds"):
            v = getattr(self, name)
            if not (v > 0 and v != float("inf")):
                bad.append(f"{name} must be a positive number of seconds, got {v!r}")
        if bad:
            raise WorkflowError("invalid run options: " + "; ".join(bad))


@dataclass
class ModelOutcome:
    name: str
    status: str  # compressed | repaired | skipped | failed
    checkpoint_uri: str | None = None
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    run_id: str | None = None
    shards: list = field(default_factory=list)  # per-shard task statistics (compressed models)
    eval_metrics: dict = field(default_factory=dict)
    eval_error: str | None = None
    # the commit's manifest and source sha256, read once (ModelRun._point_latest): eval and registry pin it
    manifest_sha256: str | None = None
    source_sha256: str | None = None

    def as_dict(self) -> dict:
        return {"status": self.status, "checkpoint_uri": self.checkpoint_uri, "metrics": self.metrics,
                "error": self.error, "run_id": self.run_id, "shards": self.shards,
                "eval_metrics": self.eval_metrics, "eval_error": self.eval_error}


def checkpoint_prefix(model: str, source_hash: str, config) -> str:
    return f"{model}/{source_hash[:16]}/{config.config_hash()}-codec{codec_version_of(config)}/"


# -- one model --------------------------------------------------------------------------

class ModelRun:
    def __init__(self, spec: ModelSpec, opts: RunOptions, tracker=None, child_run: str | None = None,
                 parent_run: str | None = None):
        self.spec = spec
        self.opts = opts
        self.store = opts.store
        self.tracker = tracker
        self.child_run = child_run
        self.parent_run = parent_run

    def _beat(self):
        if self.tracker and self.parent_run:
            self.tracker.heartbeat(self.parent_run)

    def run(self) -> ModelOutcome:
        """Compress and commit the model (or skip or repair it), then point the store's
        ``latest`` pointer and zoo index at its checkpoint."""
        out = self._run()
        if out.status in ("compressed", "repaired", "skipped"):
            self._point_latest(out)
        return out

    def _point_latest(self, out: ModelOutcome) -> None:
        from . import pointers

        try:
            entry = pointers.publish_committed(self.store, self.spec.name, self.prefix,
                                               config_hash=self.spec.config.config_hash(), ratio=out.metrics.get("ratio"))
            out.manifest_sha256, out.source_sha256 = entry["manifest_sha256"], entry["source_sha256"]
        except Exception as exc:  # the checkpoint is committed: a stale pointer is reported, not fatal
            log.warning("%s: the latest pointer and zoo index were not updated: %s", self.spec.name, redact(exc))

    def _run(self) -> ModelOutcome:
        from compressor.sources import open_source

        spec, store = self.spec, self.store
        t0 = time.perf_counter()
        local = resolve_source(spec.source, cache_dir=self.opts.cache_dir,
                               s3_endpoint_url=getattr(store, "endpoint_url", None))
        self.local_source = local
        src = open_source(local, revision=spec.revision)
        index = src.tensor_index()
        if not index:
            raise WorkflowError(f"{spec.name}: the source holds no tensors ({redact_uri(spec.source)})")
        th = time.perf_counter()
        source_hash = src.source_hash()
        log.info("%s: %d tensors, %.1fM params, %.1f MiB in %d file(s); source sha256 %s (%.1f s)", spec.name,
                 len(index), sum(i.numel for i in index) / 1e6, src.weight_bytes / 2**20, len(src.weight_files),
                 source_hash[:16], time.perf_counter() - th)
        prefix = checkpoint_prefix(spec.name, source_hash, spec.config)
        self.prefix = prefix
        self.source_hash = source_hash  # the commit key; every task checks its source against it
        uri = store.url(prefix)
        params = self._track_start(src, local, source_hash, uri)
        seen = commits.inspect_checkpoint(store, prefix)
        if seen.complete and not self.opts.force:
            log.info("%s: skipped, already committed at %s (%d files verified)", spec.name, uri,
                     len(commits.files_of(seen.manifest)))
            self._collect_garbage(seen)
            return self._skipped(seen, src)
        if seen.committed and not seen.complete:
            log.warning("%s: the committed checkpoint at %s is incomplete (%s): repairing it", spec.name, uri,
                        "; ".join(seen.problems[:5]))
        elif seen.committed:
            log.info("%s: --force: recompressing; the live checkpoint stays readable until the new one replaces it",
                     spec.name)
        store.abort_incomplete(prefix, older_than=self.opts.stale_seconds)
        try:
            return self._compress_and_commit(src, source_hash, prefix, index, params, seen, t0)
        except (WorkflowError, StoreError) as exc:
            now = None if self.opts.force else self._committed_meanwhile()
            if now is None:
                raise
            log.info("%s: %s; a concurrent run committed a complete checkpoint meanwhile: skipped", spec.name,
                     redact(exc))
            return self._skipped(now, src)

    def _track_start(self, src, local: str, source_hash: str, uri: str) -> dict:
        """The model run's parameters and tags (returned: the manifest records them too)."""
        from eval_jobs.provenance import RANDOM_INIT_NOTE, provenance_tags, weights_kind

        spec = self.spec
        params = {
            "source": redact_uri(spec.source), "revision": spec.revision, "source_hash": source_hash,
            "source_kind": src.kind, "config": spec.config.to_dict(), "config_hash": spec.config.config_hash(),
            **codec_params(spec.config), "git_commit": self.opts.git_commit,
            "checkpoint_uri": uri, "eval_datasets": list(spec.eval),
        }
        weights = weights_kind(local)  # trained / random-init / unknown: tagged, so figures are read right
        if weights == "random-init":
            log.warning("%s: %s", spec.name, RANDOM_INIT_NOTE)
        if self.tracker and self.child_run:
            self.tracker.log_params(self.child_run, params)
            # stable tags, the same night after night: the UI's compare view and charts line up on them
            stable = {"model": spec.name, "source_sha": source_hash, "config_hash": spec.config.config_hash(),
                      "codec": codec_tag(spec.config), "git_commit": self.opts.git_commit}
            self.tracker.set_tags(self.child_run, {"birkhoff.checkpoint_uri": uri, **provenance_tags(weights),
                                                   **stable, **spec.tags})
        return params

    def _committed_meanwhile(self) -> "commits.CheckpointState | None":
        """After a failure: the complete checkpoint a concurrent run committed while this
        one worked (its cleanup may have removed this run's unreferenced shards)."""
        try:
            now = commits.inspect_checkpoint(self.store, self.prefix)
        except StoreError:  # the store itself is failing: the original error says more
            return None
        return now if now.complete else None

    def _skipped(self, state: "commits.CheckpointState", src) -> ModelOutcome:
        metrics = _manifest_metrics(state.manifest, src.weight_bytes, state.manifest_bytes)
        # this night's codec time: none (a night's row in MLflow still has every column)
        metrics["compress_seconds"] = 0.0
        return ModelOutcome(self.spec.name, "skipped", self.store.url(self.prefix), metrics)

    def _collect_garbage(self, state: "commits.CheckpointState") -> None:
        """Leftovers of dead runs under a complete checkpoint: stale temporaries and
        multipart uploads, old unreferenced objects. Writes nothing when there are none."""
        try:
            self.store.abort_incomplete(self.prefix, older_than=self.opts.stale_seconds)
            commits.collect_garbage(self.store, self.prefix, state, lease_seconds=self.opts.lease_seconds,
                                    orphan_age=self.opts.orphan_age)
        except (StoreError, WorkflowError) as exc:  # the checkpoint is fine; leftovers wait for the next run
            log.warning("%s: removing orphaned objects failed: %s", self.spec.name, redact(exc))

    def _plan(self, index, src, slots: int,
              seen: "commits.CheckpointState") -> tuple[list[Shard], dict[int, ShardResult]]:
        """The shards to produce, and those an incomplete committed checkpoint still
        holds intact (repair: its own plan, recomputing only what is damaged)."""
        if seen.manifest is not None and not seen.complete and not self.opts.force:
            shards = work_units_from_manifest(index, seen.manifest)
            if shards:
                kept: dict[int, ShardResult] = {}
                for s in shards:
                    file = seen.manifest["tensors"][s.names[0]]["shard"]
                    if file not in seen.damaged:
                        kept[s.index] = _record_from_manifest(seen.manifest, s, file)
                return shards, kept
        return plan_work_units(index, shard_count(src.weight_bytes, len(index), slots, self.opts.max_shard_bytes)), {}

    def _compress_and_commit(self, src, source_hash, prefix, index, params, seen, t0) -> ModelOutcome:
        spec = self.spec
        slots, gpus, node_mem = _cluster_slots(self.opts.workers, self.opts.cpus_per_task)
        shards, results = self._plan(index, src, slots, seen)
        kept = len(results)
        results.update(self._resumable(prefix, [s for s in shards if s.index not in results]))
        todo = [s for s in shards if s.index not in results]
        log.info("%s: %d shard(s) (%s), %d resumed from an earlier run, %d to compress on %d slot(s)%s",
                 spec.name, len(shards), ", ".join(f"{s.numel / 1e6:.1f}M" for s in shards), len(results),
                 len(todo), slots, " with GPUs" if gpus else "")
        if kept:
            log.info("%s: %d shard(s) of the committed checkpoint are intact and kept", spec.name, kept)
        self._run_tasks(shards, todo, results, index, gpus, node_mem, slots)
        return self._commit(src, source_hash, prefix, index, shards, results, params, seen, t0)

    def _run_tasks(self, shards, todo, results, index, gpus, node_mem, slots) -> None:
        import ray

        spec, store = self.spec, self.store
        expected_of = {i.name: (list(i.shape), i.dtype) for i in index}

        def job_for(s: Shard) -> CompressJob:
            return CompressJob(
                model=spec.name, source=spec.source, source_sha256=self.source_hash, revision=spec.revision,
                config=config_to_dict(spec.config), store=store.spec(), prefix=self.prefix,
                unit=WorkUnit(s.index, s.count, tuple(s.names), s.stem, s.names_hash),
                expected={n: expected_of[n] for n in s.names}, backend=self.opts.backend,
                cache_dir=self.opts.cache_dir, log_level=self.opts.log_level, cpus=self.opts.cpus_per_task)

        remote = ray.remote(run_shard)
        pending: dict = {}
        queue = list(todo)
        done = len(results)
        t_tasks = time.perf_counter()
        try:
            while queue or pending:
                while queue and len(pending) < slots:
                    s = queue.pop(0)
                    job = job_for(s)
                    ref = remote.options(
                        name=f"compress_shard[{spec.name}:{s.index + 1}/{s.count}]",
                        num_cpus=self.opts.cpus_per_task, num_gpus=1 if gpus else 0, memory=_task_memory(s, node_mem),
                        max_retries=self.opts.task_retries, retry_exceptions=[TransientStoreError],
                    ).remote(job)
                    pending[ref] = s
                    log.debug("%s: submitted shard %d/%d", spec.name, s.index + 1, s.count)
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=30)
                self._beat()
                if not ready:
                    log.info("%s: %d/%d shards done, %d running (%.0f s)", spec.name, done, len(shards),
                             len(pending), time.perf_counter() - t_tasks)
                    continue
                ref = ready[0]
                s = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as exc:
                    cause = _cause(exc)
                    raise WorkflowError(f"{spec.name}: shard {s.index + 1}/{s.count} failed: "
                                        f"{type(cause).__name__}: {redact(cause)}") from None
                results[s.index] = res
                done += 1
                st = res.stats
                log.info("%s: shard %d/%d done (%d/%d): %.1fM params in %.1f s on %s pid %s, peak RSS %.0f MiB",
                         spec.name, s.index + 1, s.count, done, len(shards), st["params"] / 1e6,
                         st["wall_seconds"], st["node"], st["pid"], st["peak_rss_bytes"] / 2**20)
        except BaseException:
            for ref in pending:
                ray.cancel(ref)
            raise

    def _resumable(self, prefix: str, shards: list[Shard]) -> dict[int, ShardResult]:
        """Shards an interrupted earlier run finished, whatever its plan: a resume
        record is keyed by the set of tensors its shard holds."""
        out: dict[int, ShardResult] = {}
        keys = set(self.store.list(prefix + WORK_DIR))
        if not keys:
            return out
        for s in shards:
            key = work_key(prefix, s.names_hash)
            if key not in keys:
                continue
            try:
                rec = ShardResult.from_json(self.store.get_bytes(key), self.store.url(key))
                info = self.store.head(prefix + rec.record.file)
                ok = (rec.names_hash == s.names_hash and rec.config_hash == self.spec.config.config_hash()
                      and rec.codec_version == codec_version_of(self.spec.config) and info is not None
                      and info.size == rec.record.bytes and info.sha256 == rec.record.sha256
                      and set(rec.tensor_meta) == set(s.names))
            except (StoreError, ResumeRecordError) as exc:
                log.info("%s: resume record %s unusable (%s): recomputing", self.spec.name, key, redact(exc))
                continue
            if ok:
                out[s.index] = rec
        return out

    def _commit(self, src, source_hash, prefix, index, shards, results, params, seen, t0) -> ModelOutcome:
        from compressor.checkpoint_writer import CheckpointWriter

        spec, store = self.spec, self.store
        meta: dict = {}
        for r in results.values():
            meta.update(r.tensor_meta)
        missing = [i.name for i in index if i.name not in meta]
        if missing:
            raise WorkflowError(f"{spec.name}: {len(missing)} tensors missing after all shards ({missing[:3]})")
        records = [results[s.index].record for s in shards]
        source_info = src.describe()
        source_info.update({"uri": redact_uri(spec.source), "sha256": source_hash, "revision": spec.revision,
                            "zoo_model": spec.name})
        # this run's objects: its shards (new or resumed) and the resume records of its plan
        owned = {prefix + r.file for r in records} | {work_key(prefix, s.names_hash) for s in shards}
        sink = commits.StoreSink(store, prefix, seen=seen, force=self.opts.force, owned=owned,
                                 lease_seconds=self.opts.lease_seconds, orphan_age=self.opts.orphan_age,
                                 keep_replaced=self.opts.keep_replaced)
        with tempfile.TemporaryDirectory(prefix="birkhoff-commit-") as d:
            # the shards are in the store already (the tasks wrote them through the same writer); the
            # Hugging Face config gets its quantization_config and the weights index (compressor.hf_files);
            # commit_checkpoint uploads them (where they differ) under the lease, then the manifest
            writer = CheckpointWriter(d, sink)
            for s in shards:
                writer.add_shard(results[s.index].record.to_dict(), results[s.index].tensor_meta)
            manifest, done = writer.finish(spec.config, source_info, {f.name: f for f in src.extra_files},
                                           [i.name for i in index], committed_at=_utc_now())
        uri = store.url(prefix)
        if done.status == "lost":
            log.info("%s: a concurrent run committed %s first; its checkpoint stands, this run's extra objects "
                     "were removed (%d)", spec.name, uri, len(done.removed))
            return ModelOutcome(spec.name, "skipped", uri,
                                _manifest_metrics(done.manifest, src.weight_bytes, done.manifest_bytes))
        repaired = seen.committed and not seen.complete
        log.info("%s: %s %s (%d stale object(s) removed)", spec.name, "repaired" if repaired else "committed", uri,
                 len(done.removed))
        stats = [r.stats for r in results.values()]
        metrics = _manifest_metrics(manifest, src.weight_bytes, done.manifest_bytes)
        metrics.update({
            "compress_seconds": sum(s["compress_seconds"] for s in stats),
            "wall_seconds": time.perf_counter() - t0,
            "shards": len(shards),
            "max_task_peak_rss_mb": max(s["peak_rss_bytes"] for s in stats) / 2**20,
        })
        shard_stats = [dict(results[s.index].stats, shard=results[s.index].record.file) for s in shards]
        if self.tracker and self.child_run:
            try:
                self.tracker.log_model_artifacts(self.child_run, manifest, uri, shard_stats)
            except Exception as exc:  # the checkpoint is committed: a bookkeeping error must not fail it
                log.warning("%s: MLflow artifacts not logged: %s", spec.name, redact(exc))
        return ModelOutcome(spec.name, "repaired" if repaired else "compressed", uri, metrics, shards=shard_stats)


def _utc_now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _record_from_manifest(manifest: dict, shard: Shard, file: str) -> ShardResult:
    """A kept shard of a committed checkpoint, as a task's result."""
    rec = manifest["shards"][file]
    return ShardResult(
        model="", unit_index=shard.index, names_hash=shard.names_hash, config_hash="",
        codec_version=manifest["codec_version"], record=ShardRecord(file, rec["bytes"], rec["sha256"]),
        tensor_meta={n: manifest["tensors"][n] for n in shard.names},
        stats={"params": shard.numel, "compress_seconds": 0.0, "wall_seconds": 0.0, "peak_rss_bytes": 0,
               "pid": None, "node": None, "backend": "kept", "abs_error_sum": 0.0},
    )


def _manifest_metrics(manifest: dict, source_bytes: int, manifest_bytes: int) -> dict:
    counts = manifest_stats(manifest)
    stored = sum(int(v["bytes"]) for v in manifest["shards"].values()) + \
        sum(int(v["bytes"]) for v in manifest.get("extra_files", {}).values()) + manifest_bytes
    return {
        "ratio": size_ratio(source_bytes, stored),
        "original_bytes": source_bytes,
        "compressed_bytes": stored,
        # every stored byte (raw tensors, extras, manifest) per parameter
        "bits_per_weight": 8.0 * stored / counts["params"] if counts["params"] else None,
        **{k: counts[k] for k in ("mae", "params", "compressed_tensors", "raw_tensors")},
    }
