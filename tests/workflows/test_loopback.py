"""Every server of the test stack binds and advertises 127.0.0.1 only, and no process
of it connects anywhere else, while a job runs through all of them (issue 10)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netcheck import SocketLog, tree  # noqa: E402  (a helper beside this file, not a package)

pytestmark = pytest.mark.slow

BUCKET = "birkhoff"


def test_stack_listens_and_connects_on_loopback_only(tmp_path, ray_head, seaweed, mlflow_server):
    g = torch.Generator().manual_seed(3)
    model = tmp_path / "loop-model"
    model.mkdir()
    save_file({"w.weight": torch.randn(128, 96, generator=g) * 0.02}, str(model / "model.safetensors"))
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(f"name: loop\nmodels:\n  - name: loop\n    source: {model}\n    config:\n      points: [1600]\n")
    summary = tmp_path / "summary.json"
    job = ray_head.submit(["--zoo", str(zoo), "--store", f"s3://{BUCKET}/loopback", "--s3-endpoint-url",
                           seaweed.endpoint, "--tracking-uri", mlflow_server.uri, "--experiment", "loopback",
                           "--eval", "none", "--summary-json", str(summary)], wait=False)
    sockets = SocketLog()
    roots = [ray_head.proc.pid, seaweed.pid, mlflow_server.pid, job.pid]
    # the Ray head's tree holds GCS, raylet, dashboard, agents, the job's driver and its workers
    sockets.watch(roots, until=lambda: job.poll() is not None, timeout=600)
    out = job.communicate()[0]
    assert job.returncode == 0, out[-3000:]
    assert json.loads(summary.read_text())["models"]["loop"]["status"] == "compressed"
    sockets.sample(roots, extra=tree(os.getpid())[:1])  # and this process, the tests' S3/MLflow client
    # the check saw the servers themselves (so an empty violation list means something)
    ports = {port for _, _, port in sockets.listening}
    servers = {"GCS": ray_head.gcs, "dashboard": ray_head.dashboard, "SeaweedFS S3": seaweed.endpoint,
               "MLflow": mlflow_server.uri}
    for what, address in servers.items():
        port = int(address.rsplit(":", 1)[1])
        assert port in ports, (what, port, sorted(sockets.listening))
    assert sockets.listeners_matching("raylet"), sorted(sockets.listening)
    assert not sockets.violations, sorted(sockets.violations)
