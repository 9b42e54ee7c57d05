"""Compress every model of a zoo file on a Ray cluster; checkpoints to a store,
runs to MLflow.

On a cluster::

    ray job submit --runtime-env infra/runtime_env.yaml --working-dir . -- \\
        python workflows/compress_all.py --zoo infra/zoo/sam.yaml \\
        --store s3://bucket/birkhoff --tracking-uri http://mlflow:5000

Here, with the embedded defaults (a local Ray, ``runs/store`` as the store and
MLflow in ``runs/mlflow.db``)::

    python workflows/compress_all.py

The last stdout line is ``BIRKHOFF_SUMMARY {json}`` (status, checkpoint URI and
metrics per model). Exit status 0 when no model failed, 1 otherwise, 2 on a
usage or configuration error (one line on stderr, before any work starts).

Several runs may share one store at once: each commit is guarded (see
workflows/commit.py). Environment knobs, in seconds: BIRKHOFF_COMMIT_LEASE_S
(commit lease, default 300), BIRKHOFF_ORPHAN_AGE_S (after which unreferenced
objects of dead runs are removed, default 43200), BIRKHOFF_STALE_UPLOAD_S (after
which a temporary file or multipart upload is a dead writer's, default 3600).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python workflows/compress_all.py` puts workflows/ first on sys.path; the
# packages live one level up (the repo root, or Ray's copy of the working dir).
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

log = logging.getLogger("workflows.compress_all")

DEFAULT_ZOO = _ROOT / "infra" / "zoo" / "demo.yaml"
_SECONDS_ENV = ("BIRKHOFF_COMMIT_LEASE_S", "BIRKHOFF_ORPHAN_AGE_S", "BIRKHOFF_STALE_UPLOAD_S")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block: the message says what is wrong
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_in(lo: int, hi: int):
    """argparse type: an integer in [lo, hi] (argparse names the option in its message)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}" if v < lo else
                                             f"must be at most {hi}, got {v}")
        return v
    return parse


def _usage_problems(args) -> list[str]:
    """What is wrong with the arguments and environment, found before any work starts."""
    bad = []
    if args.store is not None and not args.store.strip():
        bad.append("--store is empty")
    elif args.store and "://" not in args.store:
        p = Path(args.store).expanduser()
        if p.exists() and not p.is_dir():
            bad.append(f"--store {args.store}: exists and is not a folder")
        else:
            parent = next((q for q in p.absolute().parents if q.exists()), None)
            if parent is not None and not parent.is_dir():
                bad.append(f"--store {args.store}: {parent} is not a folder")
    if args.s3_endpoint_url is not None and not args.s3_endpoint_url.startswith(("http://", "https://")):
        bad.append(f"--s3-endpoint-url must be an http:// or https:// URL, got {args.s3_endpoint_url!r}")
    if args.cache_dir is not None and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        bad.append(f"--cache-dir {args.cache_dir}: exists and is not a folder")
    if args.summary_json is not None:
        out = Path(args.summary_json)
        if out.is_dir():
            bad.append(f"--summary-json {args.summary_json}: is a folder")
        elif not out.absolute().parent.is_dir():
            bad.append(f"--summary-json {args.summary_json}: no folder {out.absolute().parent}")
    for name in _SECONDS_ENV:
        raw = os.environ.get(name)
        if raw:
            try:
                v = float(raw)
            except ValueError:
                v = math.nan
            if not (math.isfinite(v) and v > 0):
                bad.append(f"{name} must be a positive number of seconds, got {raw!r}")
    return bad


def _runs_dir() -> Path:
    return Path(os.environ.get("BIRKHOFF_RUNS_DIR", Path.cwd() / "runs")).resolve()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="compress_all.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default=str(DEFAULT_ZOO), help="zoo YAML file (default: infra/zoo/demo.yaml)")
    p.add_argument("--store", default=None,
                   help="s3://bucket/prefix or a folder (default: runs/store under the current directory)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///runs/mlflow.db under the current directory)")
    p.add_argument("--experiment", default="birkhoff-zoo", help="MLflow experiment name")
    p.add_argument("--only", nargs="+", metavar="NAME", help="compress only these models of the zoo")
    p.add_argument("--force", action="store_true", help="recompress models whose checkpoint is already committed")
    p.add_argument("--keep-replaced", type=_int_in(0, 100_000), default=None, metavar="N",
                   help="checkpoints replaced by --force to keep under <checkpoint>/history/ (default: all; "
                        "the files of those dropped go with the orphans)")
    p.add_argument("--workers", type=_int_in(1, 100_000), default=None,
                   help="parallel shard tasks (default: every CPU, or GPU, of the cluster)")
    p.add_argument("--max-shard-bytes", type=_int_in(1, 2**62), default=None,
                   help="source bytes per shard at most (bounds a task's memory; default 512 MiB)")
    p.add_argument("--task-retries", type=_int_in(0, 100), default=3,
                   help="retries of a shard task after a worker crash or a transient store error")
    p.add_argument("--cpus-per-task", type=_int_in(1, 4096), default=1,
                   help="CPUs each shard task reserves and its codec threads use (default 1)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "numba-cpu", "numba-cuda"])
    p.add_argument("--s3-endpoint-url", default=None,
                   help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--create-bucket", action="store_true", help="create the S3 bucket when it does not exist")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster; must answer within 60 s (default: RAY_ADDRESS, else a private local Ray on "
                        "127.0.0.1, whatever other Ray clusters on the machine recorded)")
    p.add_argument("--cache-dir", default=None, help="node-local cache for downloaded and demo sources")
    p.add_argument("--eval", dest="eval_mode", choices=["new", "all", "none"], default="all",
                   help="evaluate models whose zoo entry lists datasets: all of them, skipped ones too, so that "
                        "every night's model run holds its figures (default), only the newly compressed ones, "
                        "or none")
    p.add_argument("--git-commit", default=None, help="recorded in MLflow (default: git rev-parse HEAD)")
    p.add_argument("--summary-json", default=None, help="also write the summary to this file")
    p.add_argument("--log-level", default=os.environ.get("BIRKHOFF_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _tracking_answers(uri: str | None) -> bool:
    """An MLflow server that does not answer fails the run here, in one line, before the
    store or Ray is touched (MLflow's client would retry for minutes)."""
    from compressor.errors import BirkhoffError
    from workflows import redaction
    from workflows.tracking import probe_tracking_server

    try:
        probe_tracking_server(uri or "")
    except BirkhoffError as exc:
        log.error("%s: %s", type(exc).__name__, redaction.redact(exc))
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = _usage_problems(args)
    if problems:
        parser.error("; ".join(problems))
    from workflows import redaction

    redaction.install(args.log_level)
    from workflows.driver import DEFAULT_MAX_UNIT_SOURCE_BYTES, RunOptions
    from workflows.git_commit import git_commit
    from workflows.zoo_run import run_zoo

    runs = _runs_dir()
    in_ray_job = bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID"))
    if in_ray_job and (args.store is None or args.tracking_uri is None):
        log.warning("running as a Ray job with a default store or tracking URI: they live in the job's "
                    "temporary working dir (%s); pass --store and --tracking-uri to keep results", runs)
    if not _tracking_answers(args.tracking_uri):
        return 2
    opened = _zoo_and_store(args, runs)
    if opened is None:
        return 2
    zoo, models, store = opened

    # Ray first: an explicit cluster that does not answer fails here, in one line, before any
    # MLflow run is opened; no address at all means a private local Ray on 127.0.0.1
    from eval_jobs.ray_cluster import RayUnavailableError
    from workflows.cluster import connect_ray

    try:
        connect_ray(args.ray_address, args.workers, args.cpus_per_task)
    except RayUnavailableError as exc:
        log.error("%s: %s", type(exc).__name__, redaction.redact(exc))
        return 2

    tracking_uri = args.tracking_uri if args.tracking_uri is not None else f"sqlite:///{runs / 'mlflow.db'}"
    tracker = _tracker(args, runs, tracking_uri)
    if tracker is None:
        return 2
    redaction.protect_handlers()  # MLflow and Ray add handlers of their own
    opts = RunOptions(
        store=store, force=args.force, workers=args.workers,
        max_shard_bytes=args.max_shard_bytes if args.max_shard_bytes is not None else DEFAULT_MAX_UNIT_SOURCE_BYTES,
        task_retries=args.task_retries,
        cpus_per_task=args.cpus_per_task,
        backend=args.backend, cache_dir=args.cache_dir, log_level=args.log_level, eval_mode=args.eval_mode,
        keep_replaced=args.keep_replaced,
        git_commit=args.git_commit or git_commit(),
    )
    log.info("zoo %s: %d model(s) -> %s, runs -> %s", zoo.name, len(models), store.uri,
             redaction.redact_uri(tracking_uri))
    zoo_params = {"zoo": zoo.name, "zoo_file": args.zoo, "store": redaction.redact_uri(store.uri),
                  "force": args.force, "workers": args.workers, "max_shard_bytes": opts.max_shard_bytes}
    outcomes = run_zoo(zoo, models, opts, tracker, zoo_params, ray_address=args.ray_address)
    return _summarize(args, zoo, store, tracking_uri, outcomes)


def _zoo_and_store(args, runs: Path):
    """(zoo, selected models, store), or None when one of them is unusable (logged)."""
    from compressor.errors import BirkhoffError
    from workflows import redaction
    from workflows.store import LocalStore, S3Store, open_store
    from workflows.zoo import load_zoo

    try:
        zoo = load_zoo(args.zoo)
        models = zoo.select(args.only)
        store = open_store(args.store or str(runs / "store"), endpoint_url=args.s3_endpoint_url)
        if isinstance(store, S3Store):
            if args.create_bucket:
                store.ensure_bucket()
        elif isinstance(store, LocalStore):
            store.root.mkdir(parents=True, exist_ok=True)
    except BirkhoffError as exc:
        log.error("%s: %s", type(exc).__name__, redaction.redact(exc))
        return None
    except OSError as exc:  # the store folder cannot be created (permissions, a file on the way)
        log.error("store %s unusable: %s", args.store or runs / "store", exc.strerror or exc)
        return None
    return zoo, models, store


def _tracker(args, runs: Path, tracking_uri: str):
    """The MLflow tracker (a SQLite store under ``runs`` by default), or None when it
    is unusable (logged)."""
    from workflows import redaction
    from workflows.tracking import Tracker

    artifact_location = None
    if args.tracking_uri is None:
        runs.mkdir(parents=True, exist_ok=True)
        artifact_location = (runs / "mlartifacts").as_uri()
    try:
        return Tracker(tracking_uri, args.experiment, artifact_location=artifact_location)
    except Exception as exc:  # unreachable server, bad URI: say so plainly, without a traceback
        log.error("MLflow tracking at %s unusable: %s: %s", redaction.redact_uri(tracking_uri),
                  type(exc).__name__, redaction.redact(exc))
        return None


def _summarize(args, zoo, store, tracking_uri: str, outcomes) -> int:
    """Log one line per model, print the summary line (and write it with
    --summary-json); the exit status: 1 when a model failed."""
    from workflows import redaction

    summary = {"zoo": zoo.name, "store": store.uri, "tracking_uri": redaction.redact_uri(tracking_uri),
               "models": {o.name: o.as_dict() for o in outcomes}}
    for o in outcomes:
        extra = f" ratio {o.metrics['ratio']:.3f}x" if o.metrics.get("ratio") else ""
        log.info("  %-24s %-10s %s%s", o.name, o.status, o.checkpoint_uri or o.error or "", extra)
    text = redaction.redact(json.dumps(summary, sort_keys=True))
    if args.summary_json:
        Path(args.summary_json).write_text(text + "\n")
    print("BIRKHOFF_SUMMARY " + text, flush=True)
    return 0 if all(o.status != "failed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
