"""The one checkpoint writer (issue 11): shards, extra files, manifest last, through a sink;
each shard hashed once, while it is written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from compressor import format as fmt
from compressor.checkpoint import compress
from compressor.checkpoint_writer import CheckpointWriter
from compressor.config import HyperCompressionConfig


class RecordingSink:
    """A sink that records what it was handed, in order, and what the staging folder held."""

    def __init__(self):
        self.events = []

    def put_shard(self, path: Path, record: dict) -> None:
        data = path.read_bytes()
        self.events.append(("shard", record["file"], len(data), hashlib.sha256(data).hexdigest(), dict(record)))

    def commit(self, staged: Path, manifest: dict):
        self.events.append(("commit", sorted(p.name for p in staged.iterdir()), manifest))
        return "committed"


def _checkpoint():
    g = torch.Generator().manual_seed(0)
    sd = {f"l{i}.weight": torch.randn(24, 40, generator=g) * 0.02 for i in range(3)}
    sd["l0.bias"] = torch.randn(24, generator=g).to(torch.bfloat16)
    ck = compress(sd, HyperCompressionConfig(points=(1600,)), backend="numba-cpu")
    ck.extra_files = {"config.json": b'{"model_type": "writer-test"}'}
    return ck


def test_shards_then_extras_then_manifest_last_through_the_sink(tmp_path, monkeypatch):
    ck = _checkpoint()
    from compressor.format import fsio, shards

    sink = RecordingSink()
    writer = CheckpointWriter(tmp_path, sink)
    names = list(ck.entries)
    with monkeypatch.context() as m:
        # a shard is hashed while it is written: reading a file back to hash it fails the test
        def reread(*args):
            raise AssertionError(f"a file was read back to be hashed: {args[:1]}")

        for mod in (fsio, shards):
            for name in ("_hash_file", "_hash_stream"):
                if hasattr(mod, name):
                    m.setattr(mod, name, reread)
        writer.write_shard("a.safetensors", {n: ck.entries[n] for n in names[:2]})
        writer.write_shard("b.safetensors", {n: ck.entries[n] for n in names[2:]},
                           name_from_sha256=lambda sha: f"b-{sha[:8]}.safetensors")
    manifest, result = writer.finish(ck.config, {"uri": "mem"}, ck.extra_files, names)
    assert result == "committed"
    kinds = [e[0] for e in sink.events]
    assert kinds == ["shard", "shard", "commit"]  # every shard before the commit
    for _, file, size, sha, record in sink.events[:2]:
        # the record is the file's: size and sha256 of the bytes handed to the sink
        assert record == {"file": file, "bytes": size, "sha256": sha}
        assert manifest["shards"][file] == {"bytes": size, "sha256": sha}
    b_file = sink.events[1][1]
    assert b_file == f"b-{sink.events[1][3][:8]}.safetensors"  # content-addressed name
    staged, committed = sink.events[2][1], sink.events[2][2]
    assert committed is manifest and list(manifest["tensors"]) == names
    # the extra files (the config, its original copy, the weights index) are staged before the commit
    assert "config.json" in manifest["extra_files"]
    assert staged == sorted(["a.safetensors", b_file, fmt.MANIFEST_NAME, *manifest["extra_files"]])
    assert json.loads((tmp_path / fmt.MANIFEST_NAME).read_text())["shards"] == manifest["shards"]
    assert {m["shard"] for m in manifest["tensors"].values()} == {"a.safetensors", b_file}


def test_a_shard_is_a_safetensors_file_the_library_reads(tmp_path):
    t = {"w": torch.randn(5, 3), "i": torch.arange(9, dtype=torch.uint8), "h": torch.ones(4, dtype=torch.bfloat16),
         "e": torch.zeros(0, 2), "b": torch.tensor([True, False])}
    rec = fmt.write_shard(tmp_path, "s.safetensors", t)
    data = (tmp_path / "s.safetensors").read_bytes()
    assert rec == {"file": "s.safetensors", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert f.metadata() == {"format": fmt.FORMAT_NAME}
        assert sorted(f.keys()) == sorted(t)
        for k in t:
            assert torch.equal(f.get_tensor(k), t[k]), k


def test_save_writes_through_the_writer_and_loads_back(tmp_path):
    ck = _checkpoint()
    manifest = ck.save(tmp_path / "out", max_shard_bytes=1200, backend="numba-cpu")
    assert len(manifest["shards"]) >= 2
    for file, rec in manifest["shards"].items():
        data = (tmp_path / "out" / file).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    back = type(ck).load(tmp_path / "out")
    assert sorted(back.entries) == sorted(ck.entries)
    for n, e in ck.entries.items():
        assert torch.equal(back.entries[n].decode(), e.decode()), n
