"""The commit of the code that runs, for MLflow and the manifests' provenance."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path


def git_commit(default: str = "unknown") -> str:
    """The commit of the code that runs: ``BIRKHOFF_GIT_COMMIT``, else ``git rev-parse HEAD``
    in the checkout, else the checkout's ``.git/HEAD`` and refs read directly (a Ray job's
    working dir is a copy of the checkout without git history: ``infra/runtime_env.yaml``
    ships exactly those files)."""
    env = os.environ.get("BIRKHOFF_GIT_COMMIT")
    if env:
        return env
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return _head_from_files(root / ".git") or default


def _head_from_files(git_dir: Path) -> str | None:
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", head) else None
        ref = head[len("ref: "):]
        loose = git_dir / ref
        if loose.is_file():
            return loose.read_text().strip()
        for line in (git_dir / "packed-refs").read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha
    except (OSError, ValueError):
        pass
    return None
