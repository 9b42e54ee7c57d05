#!/usr/bin/env python
"""Start, stop or show the local stack: SeaweedFS (S3) and an MLflow server whose
artifacts live in that S3.

    python infra/local_stack.py start     # prints the environment to export
    python infra/local_stack.py status
    python infra/local_stack.py stop

State (pids, ports) goes to .birkhoff/stack/state.json; the S3 keys to
.birkhoff/stack/credentials.env (mode 600), never to stdout of `status`.
Buckets: `birkhoff` (checkpoints) and `mlflow` (MLflow artifacts).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workflows.local_services import MlflowServer, SeaweedFS, stop_pid  # noqa: E402
from workflows.processes import pid_alive  # noqa: E402


def _paths(base: Path):
    return base / "state.json", base / "credentials.env"


def start(base: Path) -> int:
    state_f, cred_f = _paths(base)
    if state_f.exists():
        st = json.loads(state_f.read_text())
        if any(pid_alive(p) for p in st.get("pids", {}).values() if p):
            print(f"already running (see {state_f}); `stop` first", file=sys.stderr)
            return 1
    base.mkdir(parents=True, exist_ok=True)
    if cred_f.exists():
        creds = dict(line.split("=", 1) for line in cred_f.read_text().split() if "=" in line)
        access, secret = creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"]
    else:
        access, secret = "BK" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    sw = SeaweedFS(str(base / "seaweedfs"), access, secret).start()
    sw.create_bucket("birkhoff")
    sw.create_bucket("mlflow")
    env = dict(os.environ, AWS_ACCESS_KEY_ID=access, AWS_SECRET_ACCESS_KEY=secret)
    try:
        ml = MlflowServer(str(base / "mlflow"), "s3://mlflow/artifacts", s3_endpoint=sw.endpoint).start(env=env)
    except BaseException:
        sw.stop()
        raise
    cred_f.write_text(
        f"AWS_ACCESS_KEY_ID={access}\nAWS_SECRET_ACCESS_KEY={secret}\n"
        f"AWS_ENDPOINT_URL_S3={sw.endpoint}\nMLFLOW_S3_ENDPOINT_URL={sw.endpoint}\n"
        f"MLFLOW_TRACKING_URI={ml.uri}\n")
    os.chmod(cred_f, 0o600)
    state = {"pids": {"seaweedfs": sw.pid, "mlflow": ml.pid}, "s3_endpoint": sw.endpoint,
             "seaweedfs_ports": sw.ports, "mlflow_uri": ml.uri, "store": "s3://birkhoff/zoo",
             "credentials_file": str(cred_f)}
    state_f.write_text(json.dumps(state, indent=1))
    print(f"SeaweedFS S3  {sw.endpoint}  (pid {sw.pid})")
    print(f"MLflow        {ml.uri}  (pid {ml.pid}, artifacts in s3://mlflow/artifacts)")
    print(f"\nset -a; . {cred_f}; set +a")
    # loopback only: see eval_jobs/ray_cluster.py for why the variable is needed
    print("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --node-ip-address=127.0.0.1 "
          "--dashboard-host=127.0.0.1   # from a shell with the variables above")
    print("ray job submit --address http://127.0.0.1:8265 --runtime-env infra/runtime_env.yaml --working-dir . -- \\")
    print(f"  python workflows/compress_all.py --store s3://birkhoff/zoo --tracking-uri {ml.uri}")
    return 0


def status(base: Path) -> int:
    state_f, _ = _paths(base)
    if not state_f.exists():
        print("not started")
        return 1
    st = json.loads(state_f.read_text())
    up = True
    for name, pid in st["pids"].items():
        alive = bool(pid) and pid_alive(pid)
        up &= alive
        print(f"{name:10s} pid {pid}  {'running' if alive else 'DOWN'}")
    print(f"S3 {st['s3_endpoint']}  MLflow {st['mlflow_uri']}  store {st['store']}")
    return 0 if up else 1


def stop(base: Path) -> int:
    state_f, _ = _paths(base)
    if not state_f.exists():
        print("not started")
        return 0
    st = json.loads(state_f.read_text())
    ml = MlflowServer(str(base / "mlflow"), "", pid=st["pids"].get("mlflow"))
    ml.stop()
    if st["pids"].get("seaweedfs"):
        stop_pid(st["pids"]["seaweedfs"])
    state_f.unlink()
    print("stopped")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status"])
    p.add_argument("--dir", default=str(ROOT / ".birkhoff" / "stack"), help="state and data folder")
    a = p.parse_args(argv)
    return {"start": start, "stop": stop, "status": status}[a.command](Path(a.dir))


if __name__ == "__main__":
    sys.exit(main())
