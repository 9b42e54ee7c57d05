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
    out = birkhoff("compress", src, tmp_path / "c", "--json", "--codec", "paper", "--points", "1600")
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
    out = birkhoff("compress", tmp_path / "m.safetensors", tmp_path / "c", "--codec", "paper", check=False)
    assert out.returncode == 2
    assert "NonFiniteTensorError" in out.stderr and "enc.weight" in out.stderr and "m.safetensors" in out.stderr
    assert not (tmp_path / "c").exists()
    ok = birkhoff("compress", tmp_path / "m.safetensors", tmp_path / "c", "--codec", "paper", "--keep-nonfinite-raw",
                  "--json")
    assert json.loads(ok.stdout.splitlines()[-1])["raw_tensors"] == 1


@pytest.mark.slow
def test_minilm_acceptance(tmp_path, minilm_file):
    """Default settings on real trained weights: the paper's code reaches 3.49x / 0.00236
    (this codec 3.4901x / 0.0023589; without the relative limit 3.4911x / 0.0023590)."""
    out = birkhoff("compress", minilm_file, tmp_path / "c", "--codec", "paper", "--json")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ratio"] >= 3.45, res
    assert res["mae"] <= 0.00240, res
    # the relative limit keeps exactly the noise-level tensors raw: the six attention key
    # biases (MAE 0.9-1.7x their spread) and the all-zero pooler bias; every other tensor
    # is the paper codec's
    tensors = json.loads((tmp_path / "c" / "manifest.json").read_text())["tensors"]
    kept = {n: t["raw_reason"] for n, t in tensors.items() if t["raw"] and t["raw_reason"] in ("relative", "constant")}
    assert kept == {**{f"encoder.layer.{i}.attention.self.key.bias": "relative" for i in range(6)},
                    "pooler.dense.bias": "constant"}, kept
    birkhoff("decompress", tmp_path / "c", tmp_path / "d.safetensors")
    assert _mae_between(minilm_file, tmp_path / "d.safetensors") == pytest.approx(res["mae"], abs=1e-7)


def test_import_compressor_stays_light():
    code = ("import sys, compressor, compressor.checkpoint, compressor.cli\n"
            "bad = [m for m in ('ray', 'boto3', 'mlflow', 'numba.cuda') if m in sys.modules]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


# -- issue 9: every bad input is a typed error, exit status 2, before any tensor is encoded ----

def _bad_sources(d: Path) -> dict:
    """Source paths, each wrong in one way, and what the error must say."""
    g = torch.Generator().manual_seed(0)
    ok = {"enc.weight": torch.randn(16, 16, generator=g) * 0.02}
    torch.save({1: torch.ones(20), "1": torch.zeros(20)}, d / "dup.pt")
    torch.save({"w": torch.empty(30, device="meta")}, d / "meta.pt")
    torch.save({"w": torch.eye(30).to_sparse()}, d / "sparse.pt")
    torch.save({}, d / "empty.pt")
    save_file({}, d / "empty.safetensors")
    save_file({"huge": torch.rand(30, 30, dtype=torch.float64) * 1e300}, d / "huge.safetensors")
    idx = d / "idx"
    idx.mkdir()
    save_file(ok, idx / "s1.safetensors")
    (idx / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"enc.weight": "s1.safetensors",
                                                                                  "ghost": "s1.safetensors"}}))
    wm = d / "wm"
    wm.mkdir()
    save_file(ok, wm / "s1.safetensors")
    (wm / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"enc.weight": 7}}))
    fifo = d / "fifo"
    fifo.mkdir()
    save_file(ok, fifo / "a.safetensors")
    os.mkfifo(fifo / "b.safetensors")
    leak = d / "leak"
    leak.mkdir()
    save_file(ok, leak / "model.safetensors")
    (d / "private.json").write_text("{}")
    (leak / "config.json").symlink_to(d / "private.json")
    return {
        "dup.pt": ("SourceError", "'1'"),
        "meta.pt": ("SourceError", "meta"),
        "sparse.pt": ("SourceError", "sparse"),
        "empty.pt": ("SourceError", "no tensors"),
        "empty.safetensors": ("SourceError", "no tensors"),
        "huge.safetensors": ("OutOfRangeTensorError", "'huge'"),
        "idx": ("SourceError", "'ghost'"),
        "wm": ("SourceError", "must be a file name"),
        "fifo": ("SourceError", "FIFO"),
        "leak": ("SourceError", "outside the source folder"),
        "org/typo": ("SourceError", "no such file"),
    }


def test_bad_sources_exit_2_before_compressing(tmp_path, capsys, monkeypatch):
    from compressor.cli import main

    monkeypatch.chdir(tmp_path)
    for name, (etype, needle) in _bad_sources(tmp_path).items():
        # the paper codec: "huge" is its value check (float64 geometry); the others are the source's
        rc = main(["compress", name, str(tmp_path / "out"), "--codec", "paper", "--backend", "reference"])
        err = capsys.readouterr().err
        assert rc == 2 and etype in err and needle in err, (name, err)
        assert name.split("/")[0] in err and "Traceback" not in err and "param" not in err, (name, err)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,needle", [
    (["--points", "abc"], "--points"),
    (["--points", "1600.9"], "--points"),
    (["--points", "1600,1e999"], "--points"),
    (["--fallback-mae", "0.0001"], "below the target"),
    (["--target-mae", "nan"], "finite"),
    (["--target-mae", "-5"], "finite"),
    (["--max-shard-bytes", "0"], "--max-shard-bytes"),
    (["--max-shard-bytes", "-1"], "--max-shard-bytes"),
    (["--max-classes", "0"], "max_classes"),
    (["--relative-fallback", "-1"], "relative_fallback"),
    (["--raw", ""], "pattern"),
    (["--box-size", "inf"], "box_size"),
])
def test_bad_settings_exit_2(tmp_path, capsys, args, needle):
    from compressor.cli import main

    save_file({"enc.weight": torch.randn(16, 16) * 0.02}, tmp_path / "m.safetensors")
    rc = main(["compress", str(tmp_path / "m.safetensors"), str(tmp_path / "out"), "--codec", "paper", *args])
    err = capsys.readouterr().err
    assert rc == 2 and "ConfigError" in err and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_minilm_v2_is_the_default_and_beats_int6_on_size(tmp_path, minilm_file):
    """`birkhoff compress` with no codec flag writes codec v2's faithful preset: on
    MiniLM 7.1x of the tensors' bytes at MAE 0.0030 (int6 per row: 5.24x; the
    fidelity figures against int6 are in benchmarks/bench_frontier.py)."""
    out = birkhoff("compress", minilm_file, tmp_path / "c", "--json")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["codec"] == "v2" and res["bits_per_weight"] <= 4.6 and res["ratio"] >= 6.9, res
    assert 0.0025 <= res["mae"] <= 0.0032, res
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["format_version"] == 2
    birkhoff("decompress", tmp_path / "c", tmp_path / "d.safetensors")
    assert _mae_between(minilm_file, tmp_path / "d.safetensors") == pytest.approx(res["mae"], abs=1e-7)


def test_fifo_source_process_ends_fast(tmp_path):
    """The real command on a folder with a FIFO named like a weight file: refused
    in seconds (it used to block in open() for good)."""
    save_file({"enc.weight": torch.randn(16, 16) * 0.02}, tmp_path / "a.safetensors")
    os.mkfifo(tmp_path / "b.safetensors")
    out = birkhoff("compress", tmp_path, tmp_path.parent / f"{tmp_path.name}-out", check=False)
    assert out.returncode == 2 and "FIFO" in out.stderr and "b.safetensors" in out.stderr


def test_malformed_checkpoints_exit_2(tmp_path, capsys):
    """decompress and inspect on a checkpoint whose manifest is wrong in each of the
    issue's ways: typed error, exit 2, no output file."""
    from compressor.cli import main

    save_file({"enc.weight": torch.randn(16, 16) * 0.02}, tmp_path / "m.safetensors")
    assert main(["compress", str(tmp_path / "m.safetensors"), str(tmp_path / "c"), "--backend", "reference"]) == 0
    good = json.loads((tmp_path / "c" / "manifest.json").read_text())
    edits = {
        "unknown-top": lambda m: m.update(extra=1),
        "overrides-unknown-key": lambda m: m["config"].update(overrides=[{"pattern": "a", "x": 1}]),
        "overrides-no-pattern": lambda m: m["config"].update(overrides=[{"raw": True}]),
        "points-abc": lambda m: m["config"].update(points=["abc"]),
        "mae-big-int": lambda m: m["tensors"]["enc.weight"].update(mae=10**400),
        "mae-nan": lambda m: m["tensors"]["enc.weight"].update(mae=float("nan")),
        "decode-table": lambda m: m["tensors"]["enc.weight"].update(U=2**24, K=3, bits=26),
    }
    for label, edit in edits.items():
        m = json.loads(json.dumps(good))
        edit(m)
        (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
        for cmd in (["decompress", str(tmp_path / "c"), str(tmp_path / "d.safetensors")],
                    ["inspect", str(tmp_path / "c")]):
            rc = main(cmd)
            err = capsys.readouterr().err
            assert rc == 2 and "manifest.json" in err and "Traceback" not in err, (label, err)
        assert not (tmp_path / "d.safetensors").exists()
