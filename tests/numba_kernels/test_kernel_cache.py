"""The kernel cache survives a move of the sources (a Ray working_dir, a fresh clone)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from numba_kernels import cache, cpu, hyperlinear_cpu

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_use_the_content_keyed_cache():
    root = cache.cache_dir()
    for dispatcher in (cpu._encode_kernel, cpu._pack_kernel, hyperlinear_cpu.fused_rows):
        assert Path(dispatcher.stats.cache_path).parent == root
    assert root.name == cache.sources_hash() and len(root.name) == 16


def _copy_sources(dst: Path) -> Path:
    """The packages a shard task imports, as a Ray working_dir would unpack them."""
    for pkg in ("compressor", "numba_kernels"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _warmup(src: Path, cache_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), NUMBA_CACHE_DIR=str(cache_dir))
    env.pop("NUMBA_CACHE_LOCATOR_CLASSES", None)
    out = subprocess.run([sys.executable, "-m", "compressor.cli", "warmup", "--cuda", "no", "--json"], cwd=src,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_warmup_compiles_once_then_a_moved_copy_loads_everything(tmp_path):
    """`birkhoff warmup` in one checkout compiles every kernel into $NUMBA_CACHE_DIR;
    a second copy of the same sources at another path (numba's own locators key by
    path) then compiles nothing."""
    store = tmp_path / "numba-cache"
    first = _warmup(_copy_sources(tmp_path / "a"), store)
    assert first["compiled"] > 0 and first["loaded_from_cache"] == 0, first
    assert Path(first["cache_dir"]).is_relative_to(store / "birkhoff")
    second = _warmup(_copy_sources(tmp_path / "b" / "elsewhere"), store)
    assert second["compiled"] == 0 and second["loaded_from_cache"] >= first["signatures"] - 3, second
    assert second["cache_dir"] == first["cache_dir"]
    # changed kernel sources get a folder of their own (a stale entry is never loaded)
    moved = tmp_path / "c"
    _copy_sources(moved)
    with open(moved / "numba_kernels" / "bitpack.py", "a") as f:
        f.write("\n# edited\n")
    env = dict(os.environ, PYTHONPATH=str(moved), NUMBA_CACHE_DIR=str(store))
    out = subprocess.run([sys.executable, "-c", "from numba_kernels import cache; print(cache.cache_dir())"],
                         cwd=moved, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() != first["cache_dir"]
