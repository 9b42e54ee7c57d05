"""Real services for the workflow tests: SeaweedFS (S3 with auth), an MLflow
server with its artifacts in that S3, and one Ray head (ray start --block, so
stopping its pid stops every Ray process it started). Session scope: each
starts once for the whole module set."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from workflows.local_services import MlflowServer, SeaweedFS, free_ports, stop_pid  # noqa: E402

BUCKET = "birkhoff"
ML_BUCKET = "mlflow"


@pytest.fixture(scope="session")
def s3_creds():
    """Random keys, exported like a pod's Secret would be; restored afterwards."""
    creds = {"AWS_ACCESS_KEY_ID": "BKT" + secrets.token_hex(8).upper(),
             "AWS_SECRET_ACCESS_KEY": "sk-" + secrets.token_urlsafe(24)}
    old = {k: os.environ.get(k) for k in list(creds) + ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(creds)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    yield creds
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory, s3_creds):
    sw = SeaweedFS(str(tmp_path_factory.mktemp("seaweed")), s3_creds["AWS_ACCESS_KEY_ID"],
                   s3_creds["AWS_SECRET_ACCESS_KEY"]).start()
    sw.create_bucket(BUCKET)
    sw.create_bucket(ML_BUCKET)
    yield sw
    sw.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, seaweed, s3_creds):
    ml = MlflowServer(str(tmp_path_factory.mktemp("mlflow")), f"s3://{ML_BUCKET}/artifacts",
                      s3_endpoint=seaweed.endpoint).start(env=dict(os.environ, **s3_creds))
    yield ml
    ml.stop()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


class RayHead:
    def __init__(self, proc, dashboard_port, gcs_port, temp_dir):
        self.proc = proc
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        self.gcs = f"127.0.0.1:{gcs_port}"
        self.temp_dir = Path(temp_dir)

    def submit(self, args: list[str], *, wait: bool = True, timeout: float = 300, env=None, log=None):
        """`ray job submit` of compress_all.py with the repo as working dir (``log``: a
        file for the job's output when not waiting, instead of a pipe)."""
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", self.dashboard,
               "--runtime-env", str(ROOT / "infra" / "runtime_env.yaml"), "--working-dir", str(ROOT),
               "--", "python", "workflows/compress_all.py", *args]
        if wait:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory, s3_creds, cache_dir):
    ports = free_ports(10)
    # not under pytest's basetemp: Ray's unix sockets (<temp>/session_<date>_<pid>/sockets/dash_MetricsHead)
    # must stay under 108 bytes, which a TMPDIR of a dozen characters plus pytest-of-<user>/pytest-<n>/ray0 exceeds
    temp = Path(tempfile.mkdtemp(prefix="ray", dir=os.environ.get("TMPDIR") or "/tmp"))
    env = dict(os.environ, **s3_creds)
    # small store retry budget: the outage test should fail fast, then resume
    env.update(BIRKHOFF_STORE_ATTEMPTS="2", BIRKHOFF_STORE_BASE_DELAY="0.2", BIRKHOFF_CACHE=str(cache_dir),
               RAY_USAGE_STATS_ENABLED="0",
               # node IP 127.0.0.1 really bound and advertised (eval_jobs/ray_cluster.py)
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               # bound to 127.0.0.1 and private to this test session: no token, so that
               # the state API and `ray job submit` need no shared ~/.ray/auth_token
               RAY_AUTH_MODE="disabled")
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", f"--port={ports[0]}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={ports[1]}", "--include-dashboard=true", "--num-cpus=2",
           f"--ray-client-server-port={ports[2]}", f"--dashboard-agent-listen-port={ports[3]}",
           f"--dashboard-agent-grpc-port={ports[4]}", f"--metrics-export-port={ports[5]}",
           f"--node-manager-port={ports[6]}", f"--object-manager-port={ports[7]}",
           f"--runtime-env-agent-port={ports[8]}", f"--temp-dir={temp}", "--disable-usage-stats"]
    log = open(temp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(proc, ports[1], ports[0], temp)
    deadline = time.monotonic() + 120
    from ray.job_submission import JobSubmissionClient

    while True:
        if proc.poll() is not None:
            raise RuntimeError("ray start failed:\n" + (temp / "ray-start.log").read_text()[-3000:])
        try:
            JobSubmissionClient(head.dashboard).list_jobs()
            break
        except Exception:
            if time.monotonic() > deadline:
                stop_pid(proc.pid)
                raise
            time.sleep(1)
    yield head
    stop_pid(proc.pid, timeout=30)
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_sam(cache_dir) -> Path:
    from workflows.demo_models import build

    return build("sam-tiny", cache_dir / "demo-models")


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory) -> Path:
    """Four 2M-element tensors (and a few small ones): with SLOW_CONFIG each shard
    takes seconds, long enough to kill its worker or its store in the middle."""
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("slow") / "slow-model"
    d.mkdir()
    g = torch.Generator().manual_seed(1)
    sd = {f"layers.{i}.weight": torch.randn(1024, 2048, generator=g) * 0.02 for i in range(4)}
    sd.update({f"layers.{i}.bias": torch.randn(1024, generator=g) * 0.01 for i in range(4)})
    sd["step"] = torch.tensor([7], dtype=torch.int64)
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "slow-test", "layers": 4}))
    return d


# every U tried for every K: ~60 trials per tensor
SLOW_CONFIG = {"points": [1225 + 100 * i for i in range(20)], "target_mae": 0.0, "points_target_mae": 0.0,
               "fallback_mae": 1.0}


@pytest.fixture(scope="session")
def slow_config() -> dict:
    return dict(SLOW_CONFIG)


@pytest.fixture(scope="session")
def slow_reference(slow_model):
    """What a local, single-process compress gives for the slow model (per-tensor sha256)."""
    from compressor.checkpoint import compress
    from compressor.config import HyperCompressionConfig

    ckpt = compress(str(slow_model), HyperCompressionConfig.from_dict(SLOW_CONFIG), backend="numba-cpu")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        manifest = ckpt.save(Path(d) / "ref")
    return {n: m["sha256"] for n, m in manifest["tensors"].items()}
