"""The one set of MLflow client calls: an experiment found or created (two processes
starting at once included), runs created with tags, and metrics, parameters and tags
logged in batches within MLflow's per-call limits.

Everything goes through an explicit :class:`mlflow.tracking.MlflowClient` and run id
(no fluent "active run" state). The evaluation's reporting and the workflow's tracker
both use it; the workflow passes its redaction as ``clean`` so that nothing it sends
carries a credential.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

# MLflow's log_batch limits: 1000 metrics, 100 params and 100 tags per call
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
TAGS_PER_BATCH = 100
PARAM_MAX = 6000  # characters of a param value (MLflow refuses longer ones)
TAG_MAX = 5000


def experiment_id(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created when absent; when another process
    creates it at the same moment, theirs is used."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as exc:
        exp = client.get_experiment_by_name(name)
        if exp is None or exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return exp.experiment_id


def create_run(client, experiment: str, name: str, tags: Mapping[str, Any], clean: Callable[[Any], str] = str) -> str:
    """A new run of ``experiment`` named ``name`` with ``tags``; returns its id."""
    run = client.create_run(experiment, tags={k: clean(v) for k, v in tags.items()}, run_name=name)
    return run.info.run_id


def log_metrics(client, run_id: str, metrics: Mapping[str, float | None], step: int = 0) -> None:
    """Log the metrics that have a value (None is skipped), stamped now."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in sorted(metrics.items()) if v is not None]
    for i in range(0, len(items), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i:i + METRICS_PER_BATCH])


def log_params(client, run_id: str, params: Mapping[str, Any], clean: Callable[[Any], str] = str) -> None:
    """Log ``params`` as ``clean(value)`` cut to MLflow's length limit."""
    from mlflow.entities import Param

    items = [Param(k, clean(v)[:PARAM_MAX]) for k, v in sorted(params.items())]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + PARAMS_PER_BATCH])


def set_tags(client, run_id: str, tags: Mapping[str, Any], clean: Callable[[Any], str] = str) -> None:
    """Set ``tags`` as ``clean(value)`` cut to MLflow's length limit."""
    from mlflow.entities import RunTag

    items = [RunTag(k, clean(v)[:TAG_MAX]) for k, v in tags.items()]
    for i in range(0, len(items), TAGS_PER_BATCH):
        client.log_batch(run_id, tags=items[i:i + TAGS_PER_BATCH])


def log_rows(client, run_id: str, rows: list[dict], artifact_file: str) -> None:
    """Log dict rows as a table (``log_table``: the UI shows it); columns in first-seen order,
    a row without a column gets null there."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    client.log_table(run_id, data={c: [r.get(c) for r in rows] for c in columns}, artifact_file=artifact_file)
