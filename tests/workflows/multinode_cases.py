"""Issue 11, item 3: workers get URIs, never the driver's paths (run by test_multinode.py).

A real two-node Ray cluster: the head (no CPU, so every task runs elsewhere) and a
worker node started in its own mount namespace, with a private tmpfs over the
folder that holds the driver's temporary files, its cache, the zoo file and the
head's Ray session. The worker node therefore cannot read any path of the
driver, as on a real cluster, while both share the network (the S3 store, Ray's
ports) and the installed code. The driver runs as a user runs it,
``workflows/compress_all.py --ray-address``, on the head.

Ray runs a worker node only in multi-node mode, where nodes advertise a routable
address. test_multinode.py runs this file in a private network namespace whose
only routable address sits on its own loopback device, so nothing here binds or
advertises an address the machine's network can reach. It is not named test_*:
pytest collects it only when it is named on the command line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from workflows.local_services import free_ports, stop_pid

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "birkhoff"
DRIVER = Path(__file__).with_name("multinode_driver.py")
RAY = str(Path(sys.executable).parent / "ray")

pytestmark = pytest.mark.slow


def _namespace_prefix() -> list[str]:
    """How this machine gives a process a private mount namespace: as root, or else
    in a user namespace where the caller is root. The test needs one of them."""
    for cmd in (["unshare", "--mount", "--propagation", "private"],
                ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]):
        if shutil.which(cmd[0]) and subprocess.run(
                cmd + ["sh", "-c", "mount -t tmpfs tmpfs /mnt 2>/dev/null || mount -t tmpfs tmpfs /tmp"],
                capture_output=True).returncode == 0:
            return cmd
    pytest.skip("this machine gives no private mount namespace (unshare --mount, as root or in a user "
                "namespace), so a node that cannot see the driver's files cannot be made here")


def _node_ip() -> str:
    """Ray starts a worker node only in multi-node mode, whose nodes advertise the
    machine's outward address (it maps 127.0.0.1 to it): the cluster uses that address,
    found as Ray finds it (the source address of a UDP socket "connected" to a public
    address; no packet is sent)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 80))
            ip = s.getsockname()[0]
        except OSError:
            ip = "127.0.0.1"
    if ip.startswith("127."):
        pytest.skip("this machine has no address but loopback, and Ray's multi-node mode needs one")
    return ip


def _ray_ports_args(ports: list[int]) -> list[str]:
    return [f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
            f"--metrics-export-port={ports[2]}", f"--dashboard-agent-listen-port={ports[3]}",
            f"--dashboard-agent-grpc-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}"]


def _wait_for_nodes(address: str, n: int, procs: list, logs: list[Path], timeout: float = 120) -> None:
    code = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.monotonic() + timeout
    while True:
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                raise RuntimeError(f"ray start exited {p.returncode}:\n" + log.read_text()[-3000:])
        r = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=60)
        if r.returncode == 0 and r.stdout.strip() == str(n):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster did not reach {n} nodes: {r.stdout} {r.stderr[-2000:]}")
        time.sleep(2)


@pytest.fixture(scope="module")
def two_nodes(s3_creds, seaweed):
    prefix = _namespace_prefix()
    ip = _node_ip()
    # short: Ray's unix socket paths under it must stay under 108 bytes
    private = Path(tempfile.mkdtemp(prefix="mn", dir=os.environ.get("TMPDIR") or "/tmp"))
    drv, cache, head_tmp = private / "drv", private / "cache", private / "hray"
    for d in (drv, cache, head_tmp):
        d.mkdir()
    base = dict(os.environ, **s3_creds, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", BIRKHOFF_STORE_ATTEMPTS="2", BIRKHOFF_CACHE=str(cache),
                TMPDIR=str(drv), PYTHONPATH=str(ROOT))
    ports = free_ports(16)
    gcs = f"{ip}:{ports[0]}"
    # the worker's log outside the folder its namespace hides, so that a failed start can be read
    head_log, worker_log = private / "head.log", private.with_name(private.name + "-worker.log")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--node-ip-address={ip}", f"--port={ports[0]}", "--num-cpus=0",
         "--include-dashboard=false", f"--ray-client-server-port={ports[1]}", f"--temp-dir={head_tmp}",
         "--disable-usage-stats", *_ray_ports_args(ports[2:8])],
        env=base, stdout=open(head_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    # the worker node: same paths, its own (empty) contents; its Ray session inside the tmpfs
    script = (f'mount -t tmpfs -o size=8g tmpfs "{private}" && mkdir -p "{cache}" "{drv}" "{private}/wray" && '
              f'exec "{RAY}" start --block --address={gcs} --node-ip-address={ip} --num-cpus=2 '
              f'--temp-dir="{private}/wray" --disable-usage-stats ' + " ".join(_ray_ports_args(ports[8:14])))
    worker = subprocess.Popen(prefix + ["sh", "-c", script], env=base, stdout=open(worker_log, "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_nodes(gcs, 2, [head, worker], [head_log, worker_log])
        yield {"gcs": gcs, "private": private, "drv": drv, "cache": cache, "env": base, "seaweed": seaweed}
    finally:
        stop_pid(worker.pid, timeout=30)
        stop_pid(head.pid, timeout=30)
        worker_log.unlink(missing_ok=True)
        shutil.rmtree(private, ignore_errors=True)


def _driver(two_nodes, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER), *args], cwd=two_nodes["drv"], env=two_nodes["env"],
                          capture_output=True, text=True, timeout=timeout)


def _keys(seaweed, prefix: str) -> list[str]:
    pages = seaweed.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_the_worker_node_cannot_see_the_driver_files(two_nodes):
    """The set-up is what it claims: a file the driver has is absent on the worker node."""
    marker = two_nodes["drv"] / "marker.txt"
    marker.write_text("driver only")
    r = _driver(two_nodes, "probe", two_nodes["gcs"], str(marker), str(ROOT / "workflows" / "zoo_run.py"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    mine, code = out["seen"]
    assert mine["node"] != out["head"] and code["node"] != out["head"]
    assert not mine["exists"] and code["exists"]


def test_a_zoo_run_with_evaluation_succeeds_on_the_worker_node(two_nodes):
    """Compression and evaluation tasks all run on the node that cannot see the driver's
    files: the checkpoint comes from S3, the original and the dataset are resolved there."""
    drv = two_nodes["drv"]
    zoo = {"name": "mn", "datasets": {"coco-val-mini": "synthetic"},
           "models": [{"name": "sam-shapes", "source": "demo:sam-shapes", "config": {"points": [1600]},
                       "eval": ["coco-val-mini"]}]}
    (drv / "zoo.yaml").write_text(yaml.safe_dump(zoo))
    r = _driver(two_nodes, "zoo", "--", "--zoo", str(drv / "zoo.yaml"), "--store", f"s3://{BUCKET}/mn",
                "--s3-endpoint-url", two_nodes["seaweed"].endpoint, "--ray-address", two_nodes["gcs"],
                "--tracking-uri", f"sqlite:///{drv / 'mlflow.db'}", "--summary-json", str(drv / "ok.json"))
    assert r.returncode == 0, r.stderr[-5000:]
    out = json.loads((drv / "ok.json").read_text())["models"]["sam-shapes"]
    assert out["status"] == "compressed" and out["eval_error"] is None, out
    assert out["checkpoint_uri"].startswith(f"s3://{BUCKET}/mn/sam-shapes/")
    m = out["eval_metrics"]
    assert m["miou_original/coco-val-mini/box"] >= 0.7 and m["fidelity_miou/coco-val-mini/box"] >= 0.9, m
    # the driver never downloaded the checkpoint: the worker node did, into its own cache
    assert not (two_nodes["cache"] / "checkpoints").exists()
    r = _driver(two_nodes, "probe", two_nodes["gcs"], str(two_nodes["cache"] / "checkpoints"))
    assert json.loads(r.stdout.strip().splitlines()[-1])["seen"][0]["exists"], r.stderr[-2000:]
    # the nested eval run names where the models came from, not a temporary folder
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{drv / 'mlflow.db'}")
    exp = client.get_experiment_by_name("birkhoff-zoo")
    evals = [x for x in client.search_runs([exp.experiment_id]) if "compressed" in x.data.params]
    assert len(evals) == 1
    assert evals[0].data.params["compressed"] == out["checkpoint_uri"]
    assert evals[0].data.params["original"] == "demo:sam-shapes"


def test_a_source_changed_after_planning_is_refused_on_the_worker(two_nodes, tmp_path):
    """The driver plans and keys the commit with the S3 source's bytes; the object is then
    replaced (same tensors, shapes and dtypes; other values) before the worker node
    downloads it. The worker refuses it: a typed error, nothing committed."""
    from safetensors.numpy import save_file

    seaweed, drv = two_nodes["seaweed"], two_nodes["drv"]
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.normal(0, 0.02, (128, 256)).astype(np.float32),
               "b.weight": rng.normal(0, 0.02, (256, 128)).astype(np.float32)}
    save_file(tensors, str(tmp_path / "v1.safetensors"))
    save_file({k: -v for k, v in tensors.items()}, str(tmp_path / "v2.safetensors"))
    seaweed.client().upload_file(str(tmp_path / "v1.safetensors"), BUCKET, "mn-src/model.safetensors")
    uri = f"s3://{BUCKET}/mn-src/model.safetensors"
    zoo = {"name": "mn2", "models": [{"name": "changing", "source": uri, "config": {"points": [1600]}}]}
    (drv / "zoo2.yaml").write_text(yaml.safe_dump(zoo))
    r = _driver(two_nodes, "zoo", "--replace-source-after-plan", uri, str(tmp_path / "v2.safetensors"), "--",
                "--zoo", str(drv / "zoo2.yaml"), "--store", f"s3://{BUCKET}/mn2", "--task-retries", "0",
                "--s3-endpoint-url", seaweed.endpoint, "--ray-address", two_nodes["gcs"],
                "--tracking-uri", f"sqlite:///{drv / 'mlflow2.db'}", "--summary-json", str(drv / "changed.json"))
    assert r.returncode == 1, r.stderr[-5000:]
    out = json.loads((drv / "changed.json").read_text())["models"]["changing"]
    assert out["status"] == "failed" and "SourceChangedError" in out["error"], out
    assert "changed since planning" in out["error"]
    left = _keys(seaweed, "mn2/")
    assert not [k for k in left if k.endswith("manifest.json") or k.endswith(".safetensors")], left
