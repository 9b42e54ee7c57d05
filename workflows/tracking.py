"""MLflow bookkeeping of a zoo run: one parent run, one child run per model.

Uses :class:`mlflow.tracking.MlflowClient` with explicit run ids (no fluent
"active run" state), so a failure while logging one model never leaks into the
next. Everything sent to MLflow goes through :func:`workflows.redaction.redact`.

Parent runs carry the driver's host, pid and a heartbeat tag; at the start of a
zoo run, RUNNING runs whose driver is gone (same host and dead pid, or no
heartbeat for ``stale_after`` seconds) are marked KILLED with a note.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from eval_jobs import mlflow_batches as mb

from .processes import pid_alive
from .redaction import redact, redact_uri

log = logging.getLogger(__name__)

TAG_KIND = "birkhoff.kind"
TAG_STATUS = "birkhoff.status"
TAG_HOST = "birkhoff.driver_host"
TAG_PID = "birkhoff.driver_pid"
TAG_HEARTBEAT = "birkhoff.heartbeat"
# how long a tracking server has to answer before a run starts (MLflow's own client retries
# a refused connection for minutes: 7 attempts with exponential back-off)
PROBE_TIMEOUT_S = 10.0


def probe_tracking_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, in one line, when an ``http(s)://`` tracking server does not answer.
    Any HTTP answer counts (an authenticating proxy's 401 too): only a refused, reset or
    timed-out connection, or an unknown host, is refused. Other URIs (``sqlite:``, a
    folder) need no server."""
    import urllib.error
    import urllib.request

    from .errors import TrackingUnavailableError

    if not uri.startswith(("http://", "https://")):
        return
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read(64)
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise TrackingUnavailableError(
            f"MLflow tracking server {redact_uri(uri)} does not answer ({redact(reason)}) within "
            f"{time.monotonic() - t0:.1f} s: start it, or fix --tracking-uri / MLFLOW_TRACKING_URI") from None


def _flat(prefix: str, value: Any, out: dict) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)) and value and any(isinstance(v, Mapping) for v in value):
        out[prefix] = json.dumps(value, sort_keys=True)
    else:
        out[prefix] = json.dumps(list(value)) if isinstance(value, (list, tuple)) else value


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str = "birkhoff-zoo", artifact_location: str | None = None):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        # an explicit client only: mlflow.set_tracking_uri would also set MLFLOW_TRACKING_URI for
        # the whole process, the default of every later MLflow user in it (birkhoff eval's too)
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = mb.experiment_id(self.client, experiment, artifact_location)
        self._last_beat = 0.0

    # -- runs -------------------------------------------------------------------
    def mark_stale_runs(self, stale_after: float = 6 * 3600) -> list[str]:
        from mlflow.entities import RunStatus

        marked = []
        host = socket.gethostname()
        runs = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
        now = time.time()
        by_id = {r.info.run_id: r for r in runs}
        for r in runs:
            parent = r.data.tags.get("mlflow.parentRunId")
            if parent and parent not in by_id:
                dead, why = True, "its zoo run already ended"
            else:
                owner = by_id[parent] if parent else r
                ot = owner.data.tags
                try:
                    beat = float(ot.get(TAG_HEARTBEAT) or owner.info.start_time / 1000)
                except (TypeError, ValueError):
                    beat = 0.0
                dead = (ot.get(TAG_HOST) == host and ot.get(TAG_PID, "").isdigit()
                        and not pid_alive(int(ot[TAG_PID])))
                why = "driver process gone"
                if not dead and now - beat > stale_after:
                    dead, why = True, f"no heartbeat for {now - beat:.0f} s"
            if dead:
                self.client.set_tag(r.info.run_id, TAG_STATUS, "killed")
                self.client.set_tag(r.info.run_id, "birkhoff.killed_reason", f"{why}; marked by a later zoo run")
                self.client.set_terminated(r.info.run_id, RunStatus.to_string(RunStatus.KILLED))
                marked.append(r.info.run_id)
        if marked:
            log.warning("marked %d RUNNING run(s) of a killed driver as KILLED", len(marked))
        return marked

    def start_parent(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
        t = {"mlflow.runName": name, TAG_KIND: "zoo", TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()),
             TAG_HEARTBEAT: str(time.time())}
        t.update(tags or {})
        run_id = mb.create_run(self.client, self.experiment_id, name, t, clean=redact)
        self.log_params(run_id, params)
        return run_id

    def start_child(self, parent: str, name: str, tags: Mapping[str, str] | None = None) -> str:
        t = {"mlflow.parentRunId": parent, "mlflow.runName": name, TAG_KIND: "model", "birkhoff.model": name,
             TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())}
        t.update(tags or {})
        return mb.create_run(self.client, self.experiment_id, name, t, clean=redact)

    def heartbeat(self, run_id: str, every: float = 30.0) -> None:
        now = time.time()
        if now - self._last_beat >= every:
            self._last_beat = now
            try:
                self.client.set_tag(run_id, TAG_HEARTBEAT, str(now))
            except Exception as exc:  # bookkeeping must not stop compression
                log.warning("MLflow heartbeat failed: %s", redact(exc))

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        flat: dict = {}
        _flat("", dict(params), flat)
        mb.log_params(self.client, run_id, {k: v for k, v in flat.items() if v is not None}, clean=redact)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float]) -> None:
        mb.log_metrics(self.client, run_id, metrics)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        mb.set_tags(self.client, run_id, tags, clean=redact)

    def log_artifacts(self, run_id: str, directory) -> None:
        self.client.log_artifacts(run_id, str(directory))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    # -- per model --------------------------------------------------------------
    def log_model_artifacts(self, run_id: str, manifest: dict, checkpoint_uri: str, shard_stats: list[dict]) -> None:
        from compressor.report import manifest_rows, write_parquet

        rows = manifest_rows(manifest)
        with tempfile.TemporaryDirectory(prefix="birkhoff-mlflow-") as d:
            write_parquet(rows, Path(d) / "tensor_report.parquet")
            plot_tensor_report(rows, Path(d) / "tensor_mae_bits.png", title=checkpoint_uri)
            (Path(d) / "checkpoint_uri.txt").write_text(redact_uri(checkpoint_uri) + "\n")
            (Path(d) / "shards.json").write_text(json.dumps(shard_stats, indent=1, sort_keys=True))
            self.log_artifacts(run_id, d)
        # the same rows as a table the UI previews (a Parquet file it only offers to download)
        mb.log_rows(self.client, run_id, rows, "tensor_report.json")


def plot_tensor_report(rows: list[dict], path, title: str = "") -> Path:
    """Per-tensor MAE (log scale) and bits per index, in the checkpoint's tensor order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    mae = [r["mae"] if not r["raw"] else float("nan") for r in rows]
    bits = [r["bits"] if r["bits"] is not None else float("nan") for r in rows]
    raw_x = [i for i, r in enumerate(rows) if r["raw"]]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax1.scatter(x, mae, s=6, label="compressed")
    ax1.set_yscale("log")
    ax1.set_ylabel("MAE")
    if raw_x:
        ax1.scatter(raw_x, [min((m for m in mae if m == m), default=1e-6)] * len(raw_x), s=6, marker="x",
                    color="gray", label="raw (MAE 0)")
    ax1.legend(loc="upper right", fontsize=8)
    ax2.scatter(x, bits, s=6, color="C1")
    ax2.set_ylabel("bits per index")
    ax2.set_xlabel("tensor (checkpoint order)")
    fig.suptitle(redact(title)[:120], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
