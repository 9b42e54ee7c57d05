"""The layer contract (issue 11): numba_kernels <- compressor <- eval_jobs <- workflows <- birkhoff.

The contract lives in pyproject.toml (``[tool.importlinter]``) and is checked by
import-linter (grimp's import graph, function-level imports included), not by a
hand-written scan. The second test proves the check can fail: it copies the
packages, adds one upward import, and expects the contract to break.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("birkhoff", "workflows", "eval_jobs", "compressor", "numba_kernels")
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    # import-linter puts the working directory first on sys.path, so a copy in cwd is
    # analysed instead of the installed (editable) packages
    env = {**os.environ, "PYTHONPATH": str(cwd), "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([str(LINT), "--no-cache", "--no-logo", str(cwd / "pyproject.toml")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_layers_hold():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout and "layers:" in out.stdout


def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "trained", "*.safetensors")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")


@pytest.mark.parametrize("where, line, importer, imported", [
    # a kernel that reaches for the reference codec's tables instead of taking them as arguments
    ("numba_kernels/upward_probe.py", "from compressor import quant_primitives\n",
     "numba_kernels.upward_probe", "compressor.quant_primitives"),
    # the codec's CLI assembling evaluation itself (a function-level import counts too)
    ("compressor/upward_probe.py", "def f():\n    from eval_jobs import cli\n",
     "compressor.upward_probe", "eval_jobs.cli"),
    # evaluation resolving a source through the workflow instead of an injected resolver
    ("eval_jobs/upward_probe.py", "import workflows.zoo\n", "eval_jobs.upward_probe", "workflows.zoo"),
    ("workflows/tracking_probe.py", "import birkhoff.cli\n", "workflows.tracking_probe", "birkhoff.cli"),
])
def test_an_upward_import_breaks_the_contract(tmp_path, where, line, importer, imported):
    _copy_tree(tmp_path)
    assert _lint(tmp_path).returncode == 0  # the copy holds, as the tree does
    (tmp_path / where).write_text('"""A deliberate upward import."""\n' + line)
    out = _lint(tmp_path)
    assert out.returncode != 0, out.stdout[-4000:]
    assert "BROKEN" in out.stdout and importer in out.stdout and imported in out.stdout, out.stdout[-4000:]


def test_the_tracker_may_not_import_the_dev_stack(tmp_path):
    _copy_tree(tmp_path)
    p = tmp_path / "workflows" / "tracking.py"
    p.write_text(p.read_text() + "\nfrom .local_services import free_port  # noqa: E402,F401\n")
    out = _lint(tmp_path)
    assert out.returncode != 0 and "workflows.tracking -> workflows.local_services" in out.stdout, out.stdout[-4000:]
