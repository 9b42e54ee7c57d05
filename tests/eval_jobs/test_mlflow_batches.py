"""The one set of MLflow wrappers (eval_jobs/mlflow_batches.py), against a real SQLite
tracking store: batches within MLflow's per-call limits, values cleaned and cut,
an experiment found or created once."""

from __future__ import annotations

import pytest

from eval_jobs import mlflow_batches as mb


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


def test_more_than_one_batch_of_each_is_logged_whole(client):
    exp = mb.experiment_id(client, "batches")
    assert mb.experiment_id(client, "batches") == exp  # found, not created again
    rid = mb.create_run(client, exp, "r", {"birkhoff.kind": "test", "n": 3}, clean=lambda v: f"<{v}>")
    mb.log_metrics(client, rid, {f"m{i}": i / 2 for i in range(1500)} | {"none": None})
    mb.log_params(client, rid, {f"p{i}": i for i in range(250)} | {"long": "x" * 9000},
                  clean=lambda v: str(v).replace("x", "y"))
    mb.set_tags(client, rid, {f"t{i}": i for i in range(150)})
    data = client.get_run(rid).data
    assert len(data.metrics) == 1500 and data.metrics["m1499"] == 749.5 and "none" not in data.metrics
    assert len(data.params) == 251 and data.params["p7"] == "7"
    assert data.params["long"] == "y" * mb.PARAM_MAX
    assert data.tags["n"] == "<3>" and data.tags["t149"] == "149"
    assert client.get_run(rid).info.run_name == "r"
