"""A zoo run: each model through :class:`workflows.driver.ModelRun` (compress and
commit), then its evaluation on the same cluster, tracked as MLflow runs nested
under one parent run."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
import traceback
from pathlib import Path

from compressor.codecs import codec_of
from eval_jobs import mlflow_batches as mb

from .cluster import connect_ray, wait_for_warm_workers
from .driver import ModelOutcome, ModelRun, RunOptions
from . import zoo_tracking as zt
from .redaction import redact, redact_uri
from .zoo import ModelSpec, Zoo

log = logging.getLogger(__name__)


# -- the zoo ------------------------------------------------------------------------------

def run_zoo(zoo: Zoo, models: list[ModelSpec], opts: RunOptions, tracker=None, zoo_params: dict | None = None,
            ray_address: str | None = None) -> list[ModelOutcome]:
    outcomes: list[ModelOutcome] = []
    parent = None
    if tracker:
        tracker.mark_stale_runs()
        parent = tracker.start_parent(
            zt.parent_run_name(zoo.name),
            dict(zoo_params or {}, **zt.zoo_provenance(zoo.path), models=[m.name for m in models],
                 git_commit=opts.git_commit, codecs=sorted({codec_of(m.config) for m in models})),
            tags={"birkhoff.zoo": zoo.name, "git_commit": opts.git_commit})
    connect_ray(ray_address, opts.workers, opts.cpus_per_task)
    wait_for_warm_workers()
    from .redaction import protect_handlers

    protect_handlers()  # Ray adds logging handlers of its own at init
    status = "FAILED"
    try:
        for i, spec in enumerate(models, 1):
            log.info("[%d/%d] %s: source %s", i, len(models), spec.name, redact_uri(spec.source))
            outcomes.append(_run_model(zoo, spec, opts, tracker, parent))
            if tracker:
                tracker.heartbeat(parent, every=0)
        status = "FINISHED" if all(o.status != "failed" and not o.eval_error for o in outcomes) else "FAILED"
    finally:
        if tracker:
            try:
                tracker.log_metrics(parent, zt.parent_metrics(outcomes))
                mb.log_rows(tracker.client, parent, zt.summary_rows(outcomes), "models.json")
                tracker.finish(parent, status)
            except Exception as exc:
                log.warning("could not close the MLflow parent run: %s", redact(exc))
    return outcomes


def _run_model(zoo: Zoo, spec: ModelSpec, opts: RunOptions, tracker, parent: str | None) -> ModelOutcome:
    """Compress and commit one model, evaluate it when the zoo and ``--eval`` say so, and
    log it all on the model's one run."""
    child = tracker.start_child(parent, spec.name) if tracker else None
    t0 = time.perf_counter()
    try:
        mrun = ModelRun(spec, opts, tracker, child, parent)
        out = mrun.run()
    except Exception as exc:  # one model's failure must not stop the zoo
        err = f"{type(exc).__name__}: {redact(exc)}"
        log.error("%s: FAILED after %.1f s: %s", spec.name, time.perf_counter() - t0, err)
        log.debug("%s traceback:\n%s", spec.name, redact(traceback.format_exc()))
        out = ModelOutcome(spec.name, "failed", error=err)
        if tracker:
            _log_failure(tracker, child, err, traceback.format_exc())
    else:
        log.info("%s: %s in %.1f s%s", spec.name, out.status, time.perf_counter() - t0,
                 f" (ratio {out.metrics['ratio']:.3f}x, MAE {out.metrics['mae']:.3g})" if out.metrics else "")
        if spec.eval and (opts.eval_mode == "all"
                          or (opts.eval_mode == "new" and out.status in ("compressed", "repaired"))):
            _evaluate(zoo, spec, mrun, out, opts, tracker, child)
        if tracker:
            _log_success(tracker, child, out, opts.store)
    out.run_id = child
    return out


def _evaluate(zoo: Zoo, spec: ModelSpec, mrun: "ModelRun", out: ModelOutcome, opts: RunOptions, tracker,
              child: str | None) -> None:
    """Evaluate the committed checkpoint against its source on the zoo's datasets,
    fanned out on the same Ray cluster, logged as a run nested under the model's.
    The tasks get store and source URIs, never a path of this node
    (``workflows.eval_inputs``). A failed evaluation is reported (and fails the zoo
    run) but never touches the committed checkpoint."""
    t0 = time.perf_counter()
    try:
        log.info("%s: evaluating on %s", spec.name, ", ".join(spec.eval))
        results, _ = _evaluate_on_cluster(zoo, spec, mrun, out, opts, tracker, child)
        out.eval_metrics = dict(results.metrics)
        log.info("%s: evaluated in %.1f s%s", spec.name, time.perf_counter() - t0,
                 "".join(f", {k} {v:.4f}" for k, v in sorted(results.metrics.items())
                         if k.startswith("fidelity_miou/") and v is not None)[:400])
    except Exception as exc:  # the checkpoint stands; the evaluation is reported as failed
        out.eval_error = f"{type(exc).__name__}: {redact(exc)}"
        log.error("%s: evaluation FAILED: %s", spec.name, out.eval_error)
        log.debug("%s eval traceback:\n%s", spec.name, redact(traceback.format_exc()))
        if tracker and child:
            try:
                tracker.client.set_tag(child, "birkhoff.eval_error", out.eval_error[:4000])
            except Exception as tag_exc:
                log.warning("could not tag the eval failure: %s", redact(tag_exc))


def _evaluate_on_cluster(zoo: Zoo, spec: ModelSpec, mrun: "ModelRun", out: ModelOutcome, opts: RunOptions, tracker,
                         child: str | None):
    from eval_jobs.datasets import DatasetSpec
    from eval_jobs.provenance import weights_kind
    from eval_jobs.runner import ModelUnderTest, evaluate_and_log

    from .commit import read_manifest_bytes
    from .eval_inputs import CheckpointFromStore, SourceOnNode, ZooDatasetsOnNode
    from .zoo import resolve_dataset

    cache = str(opts.cache_dir) if opts.cache_dir else None
    # this node's copies: the driver plans the images and scores mAP from the annotations
    specs = tuple(DatasetSpec.parse(resolve_dataset(zoo, name, cache_dir=opts.cache_dir)) for name in spec.eval)
    manifest_sha = out.manifest_sha256 or hashlib.sha256(read_manifest_bytes(opts.store, mrun.prefix)).hexdigest()
    model = ModelUnderTest(opts.store.url(mrun.prefix), redact_uri(spec.source), specs, spec.name,
                           weights=weights_kind(mrun.local_source))
    return evaluate_and_log(
        model, executor="ray", parent_run_id=child, tracking_uri=tracker.tracking_uri if tracker else None,
        load_compressed=CheckpointFromStore(opts.store.spec(), mrun.prefix, manifest_sha, cache),
        load_original=SourceOnNode(spec.source, mrun.source_hash, spec.revision, cache,
                                   getattr(opts.store, "endpoint_url", None)),
        locate_dataset=ZooDatasetsOnNode(tuple((n, zoo.datasets[n]) for n in spec.eval),
                                         str(Path(zoo.path).resolve().parent), cache))


def _log_success(tracker, child: str, out: ModelOutcome, store=None) -> None:
    try:
        tracker.log_metrics(child, zt.model_metrics(out))
        tracker.set_tags(child, {"birkhoff.status": out.status, "birkhoff.checkpoint_uri": out.checkpoint_uri})
        tracker.finish(child, "FINISHED")
    except Exception as exc:  # the checkpoint is committed; bookkeeping must not fail the model
        log.warning("%s: MLflow logging failed: %s", out.name, redact(exc))
    from .registry import register_outcome

    register_outcome(tracker, child, out, store)  # a registry version per checkpoint (@latest); only warns


def _log_failure(tracker, child: str, err: str, tb: str) -> None:
    try:
        tracker.set_tags(child, {"birkhoff.status": "failed", "birkhoff.error": err})
        with tempfile.TemporaryDirectory(prefix="birkhoff-err-") as d:
            (Path(d) / "error.txt").write_text(redact(err) + "\n\n" + redact(tb))
            tracker.log_artifacts(child, d)
        tracker.finish(child, "FAILED")
    except Exception as exc:
        log.warning("MLflow logging of a failure failed: %s", redact(exc))
