"""compress_all.py refuses nonsense arguments up front: exit status 2, one line on
stderr that names the option, no traceback, nothing created, before any Ray or
MLflow work (issue 9)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "workflows" / "compress_all.py"


@pytest.mark.parametrize("args,env,needle", [
    (["--store", "{file}"], {}, "--store {file}: exists and is not a folder"),
    (["--store", "{file}/sub/store"], {}, "{file} is not a folder"),
    (["--store", ""], {}, "--store is empty"),
    (["--max-shard-bytes", "0"], {}, "argument --max-shard-bytes: must be at least 1, got 0"),
    (["--max-shard-bytes", "-5"], {}, "argument --max-shard-bytes: must be at least 1, got -5"),
    (["--max-shard-bytes", "1e9"], {}, "argument --max-shard-bytes: must be an integer, got '1e9'"),
    (["--workers", "0"], {}, "argument --workers: must be at least 1"),
    (["--workers", "-3"], {}, "argument --workers: must be at least 1"),
    (["--task-retries", "-1"], {}, "argument --task-retries: must be at least 0"),  # Ray reads -1 as forever
    (["--task-retries", "1000"], {}, "argument --task-retries: must be at most 100"),
    (["--cpus-per-task", "0"], {}, "argument --cpus-per-task: must be at least 1"),
    (["--cpus-per-task", "two"], {}, "argument --cpus-per-task: must be an integer"),
    (["--s3-endpoint-url", "localhost:9000"], {}, "--s3-endpoint-url must be an http:// or https:// URL"),
    (["--cache-dir", "{file}"], {}, "--cache-dir {file}: exists and is not a folder"),
    (["--summary-json", "{tmp}/no/such/dir/s.json"], {}, "--summary-json {tmp}/no/such/dir/s.json: no folder"),
    (["--summary-json", "{tmp}"], {}, "is a folder"),
    ([], {"BIRKHOFF_COMMIT_LEASE_S": "0"}, "BIRKHOFF_COMMIT_LEASE_S must be a positive number of seconds"),
    ([], {"BIRKHOFF_ORPHAN_AGE_S": "nan"}, "BIRKHOFF_ORPHAN_AGE_S must be a positive number"),
    ([], {"BIRKHOFF_STALE_UPLOAD_S": "soon"}, "BIRKHOFF_STALE_UPLOAD_S must be a positive number"),
])
def test_bad_arguments_are_refused_in_one_line(tmp_path, args, env, needle):
    work = tmp_path / "cwd"
    work.mkdir()
    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    fill = {"file": str(afile), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in args]
    r = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=work, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "BIRKHOFF_RUNS_DIR": str(work / "runs"), **env})
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle.format(**fill) in lines[0]
    assert lines[0].startswith("compress_all.py: error: ")
    assert not list(work.iterdir()) and afile.read_text() == "not a folder"  # nothing created or touched


def test_run_options_refuse_nonsense():
    from workflows.driver import RunOptions
    from workflows.errors import WorkflowError
    from workflows.store import LocalStore

    store = LocalStore("/nonexistent-birkhoff-store")
    for bad in ({"max_shard_bytes": 0}, {"workers": 0}, {"task_retries": -1}, {"cpus_per_task": 0},
                {"lease_seconds": 0.0}, {"orphan_age": float("nan")}, {"eval_mode": "sometimes"}):
        with pytest.raises(WorkflowError, match=next(iter(bad))):
            RunOptions(store=store, **bad)


def test_an_mlflow_server_that_does_not_answer_fails_fast_in_one_line(tmp_path):
    """Issue 13: MLflow's client retries a refused connection for minutes; the run says
    so within seconds, before any Ray or store work, in one line with exit status 2."""
    import time

    from workflows.local_services import free_ports

    port = free_ports(1)[0]  # nothing listens there
    work = tmp_path / "cwd"
    work.mkdir()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(SCRIPT), "--tracking-uri", f"http://127.0.0.1:{port}",
                        "--store", str(work / "store")], cwd=work, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "BIRKHOFF_RUNS_DIR": str(work / "runs")})
    took = time.monotonic() - t0
    assert r.returncode == 2, (r.stdout, r.stderr[-3000:])
    assert took < 30, took
    errors = [ln for ln in r.stderr.splitlines() if "ERROR" in ln or "Error" in ln]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"MLflow tracking server http://127.0.0.1:{port} does not answer" in errors[0]
    assert not (work / "store").exists() and not (work / "runs").exists()  # nothing started or created


def test_the_tracking_probe_accepts_any_http_answer_and_no_server_uris(tmp_path):
    import http.server
    import threading

    from workflows.tracking import probe_tracking_server

    class Deny(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # an authenticating proxy in front of the server
            self.send_response(401)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        probe_tracking_server(f"http://127.0.0.1:{srv.server_address[1]}")
    finally:
        srv.shutdown()
        srv.server_close()
    probe_tracking_server(f"sqlite:///{tmp_path / 'x.db'}")
    probe_tracking_server(str(tmp_path / "mlruns"))
