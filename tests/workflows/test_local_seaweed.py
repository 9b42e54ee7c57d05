"""The local SeaweedFS (tests, `infra/local_stack.py`) keeps accepting new buckets on a
machine with little free disk.

CI failed once this way: with `-volume.max=0` SeaweedFS sizes its volume count from
the free disk, and each new bucket claims 7 volumes of `volumeSizeLimitMB`; with
256 MB volumes and about 10 GB free, the sixth bucket of the test session got
`InternalError` on every upload. The server runs here on a 1 GiB tmpfs, in a private
mount namespace, and must take a dozen buckets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SNIPPET = r"""
import sys
from workflows.local_services import SeaweedFS

s = SeaweedFS(sys.argv[1], "AKSMALLDISKTEST01", "sk-small-disk-test-secret").start()
try:
    c = s.client()
    for i in range(12):
        c.create_bucket(Bucket=f"bucket-{i}")
        c.put_object(Bucket=f"bucket-{i}", Key="k", Body=b"x" * 4096)
        assert c.get_object(Bucket=f"bucket-{i}", Key="k")["Body"].read() == b"x" * 4096
    print("12 buckets written", flush=True)
finally:
    s.stop()
"""


def test_a_dozen_buckets_fit_on_a_small_disk(tmp_path):
    if not shutil.which("unshare") or subprocess.run(["unshare", "--mount", "true"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("this machine gives no private mount namespace (a small tmpfs needs one)")
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = 'mount -t tmpfs -o size=1g tmpfs "$1" && exec "$0" -c "$2" "$1"'
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd,
                        sys.executable, str(disk), SNIPPET],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "12 buckets written" in r.stdout, (r.stdout + r.stderr)[-4000:]
