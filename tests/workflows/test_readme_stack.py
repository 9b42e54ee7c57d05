"""Issue 13, item 6: the README's real-stack block runs as written.

The block under ``<!-- readme-stack -->`` in README.md (local SeaweedFS and
MLflow, ``ray start``, ``ray job submit`` of the demo zoo, ``ray stop``) runs
verbatim with bash -e, from a copy of the working tree, in a shell with none of
the stack's variables and a fresh home (so Ray's token set-up starts from
nothing). It runs in its own PID namespace, so that its ``ray stop`` stops its
own Ray only, and in its own network namespace where the machine allows it, so
that Ray's default ports (6379, 8265) are free whatever else runs here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- readme-stack -->"

pytestmark = pytest.mark.slow


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(MARK) + len(MARK):]
    return after.split("```bash\n", 1)[1].split("\n```", 1)[0]


def _isolation() -> tuple[list[str], str]:
    """The unshare prefix, and the shell line that brings the namespace's loopback up."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare here: the block's `ray stop` would stop every Ray on the machine")
    pid_ns = ["unshare", "--pid", "--fork", "--mount-proc"]
    if shutil.which("ip") and subprocess.run(pid_ns + ["--net", "sh", "-c", "ip link set lo up"],
                                             capture_output=True).returncode == 0:
        return pid_ns + ["--net"], "ip link set lo up"
    if subprocess.run(pid_ns + ["true"], capture_output=True).returncode == 0:
        return pid_ns, ":"
    pytest.skip("this machine gives no private PID namespace: the block's `ray stop` would stop every Ray here")


def _copy_tree(dst: Path) -> None:
    """The working tree as a fresh clone would have it (tracked and new files), with the venv."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    (dst / ".venv").symlink_to(Path(sys.prefix))


def test_the_readme_real_stack_block_runs_as_written(tmp_path):
    prefix, loopback = _isolation()
    block = readme_block()
    assert "ray job submit" in block and "ray stop" in block and "local_stack.py start" in block
    tree = tmp_path / "checkout"
    _copy_tree(tree)
    home = tmp_path / "home"
    home.mkdir()
    # Ray's session sockets must stay under 108 bytes: a short temporary folder
    short = Path(tempfile.mkdtemp(prefix="rd", dir=os.environ.get("TMPDIR") or "/tmp"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "BIRKHOFF_", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), TMPDIR=str(short), RAY_TMPDIR=str(short),
               PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                    if not p.startswith(sys.prefix)))
    script = f"set -euo pipefail\n{loopback}\ncd {tree}\n{block}\n"
    try:
        r = subprocess.run(prefix + ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=1500)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "Job 'birkhoff-zoo-" in out and "succeeded" in out, out[-4000:]
    line = next(ln for ln in out.splitlines() if "BIRKHOFF_SUMMARY " in ln)
    models = json.loads(line.split("BIRKHOFF_SUMMARY ", 1)[1])["models"]
    assert {m["status"] for m in models.values()} == {"compressed"}, models
    assert models["sam-shapes"]["checkpoint_uri"].startswith("s3://birkhoff/zoo/sam-shapes/")
    assert models["sam-shapes"]["eval_metrics"]["fidelity_miou/coco-val-mini/box"] >= 0.9
    assert models["sam-shapes.codec-v2"]["eval_metrics"]["fidelity_miou/coco-val-mini/box"] >= 0.9
