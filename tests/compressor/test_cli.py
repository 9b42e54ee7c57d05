"""The birkhoff CLI end to end, including the acceptance figures on real trained weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]


def birkhoff(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "compressor.cli", *map(str, args)], capture_output=True,
                         text=True, env=env, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"birkhoff {args} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out


def _mae_between(src_file, decoded_file):
    err, n = 0.0, 0
    with safe_open(str(src_file), "pt") as a, safe_open(str(decoded_file), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype and x.shape == y.shape, k
            if x.is_floating_point():
                err += (x.double() - y.double()).abs().sum().item()
            else:
                assert torch.equal(x, y)
            n += x.numel()
    return err / n


def test_small_checkpoint_roundtrip_and_inspect(tmp_path):
    torch.manual_seed(0)
    sd = {"enc.weight": torch.randn(64, 33) * 0.02, "enc.bias": torch.randn(64) * 0.01,
          "emb.weight": (torch.randn(100, 16) * 0.03).to(torch.bfloat16), "steps": torch.tensor([7, 8])}
    src = tmp_path / "m.safetensors"
    save_file(sd, src)
    out = birkhoff("compress", src, tmp_path / "c", "--json", "--points", "1600")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("original_bytes", "compressed_bytes", "ratio", "mae", "seconds", "tensors",
                "compressed_tensors", "raw_tensors"):
        assert key in res
    assert res["tensors"] == 4 and res["raw_tensors"] == 1 and res["compressed_tensors"] == 3
    files = [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
    assert res["compressed_bytes"] == sum(p.stat().st_size for p in files)
    assert res["ratio"] == pytest.approx(src.stat().st_size / res["compressed_bytes"])
    birkhoff("decompress", tmp_path / "c", tmp_path / "d.safetensors")
    assert _mae_between(src, tmp_path / "d.safetensors") == pytest.approx(res["mae"], abs=1e-7)
    birkhoff("inspect", tmp_path / "c", "--parquet", tmp_path / "r.parquet")
    table = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert {r["name"] for r in table} == set(sd)
    row = next(r for r in table if r["name"] == "enc.weight")
    assert row["U"] == 1600 and not row["raw"] and row["bits"] >= 11
    # refusing to overwrite an earlier result
    again = birkhoff("compress", src, tmp_path / "c", check=False)
    assert again.returncode == 2 and "exists" in again.stderr


def test_bad_source_is_a_typed_error_exit_2(tmp_path):
    w = torch.randn(10, 10)
    w[0, 0] = float("inf")
    save_file({"enc.weight": w}, tmp_path / "m.safetensors")
    out = birkhoff("compress", tmp_path / "m.safetensors", tmp_path / "c", check=False)
    assert out.returncode == 2
    assert "NonFiniteTensorError" in out.stderr and "enc.weight" in out.stderr and "m.safetensors" in out.stderr
    assert not (tmp_path / "c").exists()
    ok = birkhoff("compress", tmp_path / "m.safetensors", tmp_path / "c", "--keep-nonfinite-raw", "--json")
    assert json.loads(ok.stdout.splitlines()[-1])["raw_tensors"] == 1


@pytest.mark.slow
def test_minilm_acceptance(tmp_path, minilm_file):
    """Default settings on real trained weights: the paper's code reaches 3.49x / 0.00236."""
    out = birkhoff("compress", minilm_file, tmp_path / "c", "--json")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ratio"] >= 3.45, res
    assert res["mae"] <= 0.00240, res
    birkhoff("decompress", tmp_path / "c", tmp_path / "d.safetensors")
    assert _mae_between(minilm_file, tmp_path / "d.safetensors") == pytest.approx(res["mae"], abs=1e-7)


def test_import_compressor_stays_light():
    code = ("import sys, compressor, compressor.checkpoint, compressor.cli\n"
            "bad = [m for m in ('ray', 'boto3', 'mlflow', 'numba.cuda') if m in sys.modules]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
