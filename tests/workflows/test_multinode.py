"""Runs multinode_cases.py (issue 11's two-node cluster) in a private network namespace.

Ray starts a worker node only in multi-node mode, and then binds and advertises a
routable address, never 127.0.0.1. So the cases run in a network namespace of
their own: loopback, plus one private address (10.203.0.1) on that namespace's
loopback device, which nothing outside the namespace can reach. The cases start
their own SeaweedFS there (the session fixtures of a pytest run inside it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("multinode_cases.py")
ADDRESS = "10.203.0.1"

pytestmark = pytest.mark.slow


def test_two_node_cases_pass_in_a_private_network(tmp_path):
    if not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("no unshare/ip here: a private network namespace for the two-node cluster cannot be made")
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine gives no private network namespace")
    network = (f"ip link set lo up && ip addr add {ADDRESS}/32 dev lo && "
               f"ip route add default dev lo src {ADDRESS}")
    cmd = f'{network} && exec "$0" -m pytest -q -p no:cacheprovider --basetemp="$1" "$2"'
    r = subprocess.run(["unshare", "--net", "sh", "-c", cmd, sys.executable, str(tmp_path / "cases"), str(CASES)],
                       cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    # every case ran: none skipped (a skip would hide the requirement)
    assert re.search(r"\b3 passed\b", out) and "skipped" not in out, out[-3000:]
