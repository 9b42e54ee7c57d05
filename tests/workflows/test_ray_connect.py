"""The main job's Ray connection: a stale `ray start` record does not matter to the
embedded defaults, which stay on 127.0.0.1; an explicit address that does not answer
fails fast, in one line (issue 10)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from workflows.local_services import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netcheck import SocketLog  # noqa: E402  (a helper beside this file, not a package)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def private_tmp():
    """A short private TMPDIR (Ray's unix sockets live under it) holding a stale
    `ray start` record: the address of a cluster that no longer exists."""
    base = tempfile.mkdtemp(prefix="rc", dir=os.environ.get("TMPDIR"))
    d = Path(base)
    (d / "ray").mkdir()
    dead = f"127.0.0.1:{free_port()}"
    (d / "ray" / "ray_current_cluster").write_text(dead)
    yield d, dead
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def _tiny_zoo(d: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    model = d / "tiny"
    model.mkdir()
    save_file({"a.weight": torch.randn(96, 64, generator=g) * 0.02, "a.bias": torch.zeros(96)},
              str(model / "model.safetensors"))
    zoo = d / "zoo.yaml"
    zoo.write_text(f"name: tiny\nmodels:\n  - name: tiny\n    source: {model}\n    config:\n      points: [1600]\n")
    return zoo


def _env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env.update(TMPDIR=str(tmp), BIRKHOFF_RUNS_DIR=str(tmp / "runs"), RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the job must set loopback up by itself
    env.update(extra)
    return env


def _main_job(tmp: Path, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "workflows" / "compress_all.py"), "--zoo",
                             str(_tiny_zoo(tmp)), "--eval", "none", "--workers", "1", *args],
                            cwd=tmp, env=env or _env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_embedded_default_ignores_a_stale_record_and_stays_on_loopback(private_tmp):
    from compressor.backends import warm_up

    tmp, dead = private_tmp
    warm_up(cuda=False)  # this machine's kernel cache, which the job's Ray workers must find
    summary = tmp / "summary.json"
    proc = _main_job(tmp, "--summary-json", str(summary))
    out: dict = {}
    reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"), proc.communicate(timeout=600))))
    reader.start()
    sockets = SocketLog()
    # every process of the job (driver, GCS, raylet, workers, agents), sampled while it runs
    sockets.watch([proc.pid], until=lambda: proc.poll() is not None, timeout=600)
    reader.join()
    assert proc.returncode == 0, out.get("stderr", "")[-3000:]
    models = json.loads(summary.read_text())["models"]
    assert models["tiny"]["status"] == "compressed", models
    # the worker, a fresh process of a fresh Ray, loaded every kernel from the machine's cache
    assert [sh["kernels_compiled"] for sh in models["tiny"]["shards"]] == [0], models["tiny"]["shards"]
    assert "Connecting to existing Ray cluster" not in out["stderr"]
    assert (tmp / "ray" / "ray_current_cluster").read_text() == dead  # someone else's record: untouched
    assert sockets.listeners_matching("raylet") and sockets.listeners_matching("gcs_server"), sockets.listening
    assert not sockets.violations, sorted(sockets.violations)


def _last_line(text: str) -> str:
    return [ln for ln in text.splitlines() if ln.strip()][-1]


def test_an_explicit_address_nobody_answers_fails_in_one_line(private_tmp):
    tmp, dead = private_tmp
    t0 = time.monotonic()
    proc = _main_job(tmp, env=_env(tmp, RAY_ADDRESS=dead))
    stdout, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 2, stderr[-3000:]
    assert took < 60, took
    assert "RayUnavailableError" in _last_line(stderr) and dead in _last_line(stderr), stderr[-2000:]
    assert "Traceback" not in stderr and "BIRKHOFF_SUMMARY" not in stdout


def test_an_address_that_accepts_but_never_speaks_fails_within_a_minute(private_tmp):
    """A port held by something that is not a GCS (or a hung one): the probe passes,
    Ray's own connection attempt is what must give up in time."""
    tmp, _ = private_tmp
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    address = f"127.0.0.1:{srv.getsockname()[1]}"
    accepted = []
    stop = threading.Event()

    def hold():
        srv.settimeout(0.5)
        while not stop.is_set():
            try:
                accepted.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        proc = _main_job(tmp, "--ray-address", address)
        stdout, stderr = proc.communicate(timeout=180)
        took = time.monotonic() - t0
    finally:
        stop.set()
        t.join()
        for c in accepted:
            c.close()
        srv.close()
    assert proc.returncode == 2, stderr[-3000:]
    assert took < 60, took
    assert "RayUnavailableError" in _last_line(stderr) and address in _last_line(stderr), stderr[-2000:]
    assert "Traceback" not in stderr
