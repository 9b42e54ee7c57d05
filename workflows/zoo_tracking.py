"""What a zoo run shows in MLflow, shaped for comparing nights.

* The parent run is named after the zoo and the time it started (UTC), so nights
  are told apart in the run list. It logs each model's headline figures as
  ``<model>/<metric>`` and a per-model summary table (``models.json``, through
  ``log_table``, which the UI shows as a table).
* A model's run holds everything a user compares on one row: ratio, bits per
  weight, codec seconds, MAE, and the evaluation's mIoU, fidelity and drop per
  dataset and prompt (the evaluation keeps its nested run for the details). Its
  name is the model's and its tags are stable night after night (``model``,
  ``source_sha``, ``config_hash``, ``codec``, ``git_commit``), so that the compare
  view and the charts line up.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from pathlib import Path
from typing import Iterable

from .driver import ModelOutcome

# the compression figures a night is compared on; every evaluation metric joins them
HEADLINE = ("ratio", "bits_per_weight", "compress_seconds", "mae")
# of the evaluation, the parent run and the summary table keep the box prompt's figures
_EVAL_HEADLINE = ("miou/", "miou_original/", "fidelity_miou/", "miou_drop/")


def parent_run_name(zoo: str, now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"{zoo} {now:%Y-%m-%d %H:%M:%S}Z"


def model_metrics(out: ModelOutcome) -> dict[str, float]:
    """The model run's metrics: the compression's and the evaluation's, together."""
    return {**out.metrics, **{k: v for k, v in out.eval_metrics.items() if v is not None}}


def _eval_headline(out: ModelOutcome) -> dict[str, float]:
    return {k: v for k, v in out.eval_metrics.items()
            if v is not None and k.startswith(_EVAL_HEADLINE) and k.endswith("/box")}


def parent_metrics(outcomes: Iterable[ModelOutcome]) -> dict[str, float]:
    """``<model>/<metric>`` for each model's headline figures, and the outcome counts."""
    outcomes = list(outcomes)
    out: dict[str, float] = {f"models_{s}": sum(1 for o in outcomes if o.status == s)
                             for s in ("compressed", "repaired", "skipped", "failed")}
    for o in outcomes:
        for k in HEADLINE:
            if o.metrics.get(k) is not None:
                out[f"{o.name}/{k}"] = o.metrics[k]
        out.update({f"{o.name}/{k}": v for k, v in _eval_headline(o).items()})
    return out


def summary_rows(outcomes: Iterable[ModelOutcome]) -> list[dict]:
    """One row per model: model, status, the headline figures, the box prompt's evaluation
    figures per dataset, the checkpoint URI."""
    return [{"model": o.name, "status": o.status, **{k: o.metrics.get(k) for k in HEADLINE},
             **_eval_headline(o), "checkpoint_uri": o.checkpoint_uri, "error": o.error or o.eval_error}
            for o in outcomes]


def zoo_provenance(zoo_path: str) -> dict[str, str]:
    """The zoo file's content hash, and its path relative to the working directory when
    it lies there (a Ray job's working dir is a temporary copy of the checkout: the
    relative path is the one in the checkout)."""
    p = Path(zoo_path).resolve()
    try:
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError:
        sha = "unreadable"
    try:
        shown = str(p.relative_to(Path(os.getcwd()).resolve()))
    except ValueError:
        shown = str(p)
    return {"zoo_file": shown, "zoo_sha256": sha}
