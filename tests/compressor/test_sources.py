"""Source readers: safetensors, weights-only PyTorch files, HF directories, Hub ids."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from compressor import SourceError
from compressor.checkpoint import compress
from compressor.sources import open_source


def _sd():
    torch.manual_seed(0)
    return {"a.weight": torch.randn(8, 6) * 0.02, "a.bias": torch.randn(8), "ids": torch.arange(12)}


def test_safetensors_index_is_lazy_and_read_subset(tmp_path):
    save_file(_sd(), tmp_path / "m.safetensors")
    src = open_source(tmp_path / "m.safetensors")
    idx = {i.name: i for i in src.tensor_index()}
    assert idx["a.weight"].shape == (8, 6) and idx["a.weight"].dtype == "float32" and idx["ids"].dtype == "int64"
    got = dict(src.read(["a.bias"]))
    assert list(got) == ["a.bias"] and torch.equal(got["a.bias"], _sd()["a.bias"])
    with pytest.raises(SourceError, match="nope"):
        list(src.read(["nope"]))


def test_torch_state_dict_and_nested(tmp_path):
    torch.save(_sd(), tmp_path / "m.pt")
    torch.save({"state_dict": _sd(), "epoch": 3}, tmp_path / "nested.pth")
    for f in ("m.pt", "nested.pth"):
        got = dict(open_source(tmp_path / f).read())
        assert set(got) == set(_sd()) and torch.equal(got["a.weight"], _sd()["a.weight"])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(3), "x": _Evil(marker)}, tmp_path / "evil.bin")
    with pytest.raises(SourceError, match="weights_only") as info:
        open_source(tmp_path / "evil.bin").tensor_index()
    assert "evil.bin" in str(info.value)
    assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(SourceError, match="not a state dict"):
        open_source(tmp_path / "list.pt").tensor_index()


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(SourceError, match="bad.safetensors"):
        open_source(tmp_path / "bad.safetensors").tensor_index()


def test_hf_directory_with_sharded_index(tmp_path):
    sd = _sd()
    save_file({"a.weight": sd["a.weight"]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"a.bias": sd["a.bias"], "ids": sd["ids"]}, tmp_path / "model-00002-of-00002.safetensors")
    wm = {"a.weight": "model-00001-of-00002.safetensors", "a.bias": "model-00002-of-00002.safetensors",
          "ids": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    src = open_source(tmp_path)
    assert src.kind == "hf-dir" and len(src.weight_files) == 2
    assert [f.name for f in src.extra_files] == ["config.json", "tokenizer.json"]  # tokenizers travel too
    assert {i.name for i in src.tensor_index()} == set(sd)
    assert src.weight_bytes == sum(f.stat().st_size for f in src.weight_files)
    assert len(src.source_hash()) == 64


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        open_source(tmp_path / "absent.safetensors")
    (tmp_path / "w.npy").write_bytes(b"x")
    with pytest.raises(SourceError, match="unknown checkpoint file type"):
        open_source(tmp_path / "w.npy")


def test_hub_id_offline_is_a_clear_error(tmp_path):
    code = ("from compressor.sources import open_source\n"
            "from compressor import SourceError\n"
            "try:\n    open_source('facebook/sam-vit-base')\nexcept SourceError as e:\n    print('SourceError', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "SourceError" in out.stdout and "hf://facebook/sam-vit-base" in out.stdout, out.stderr[-2000:]


def test_compress_module_keeps_buffers_raw_and_never_modifies_input():
    m = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.BatchNorm1d(30))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ck = compress(m, backend="reference")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert ck.entries["1.running_mean"].raw and ck.entries["1.running_mean"].reason == "buffer"
    assert not ck.entries["0.weight"].raw
    assert ck.source_info["kind"] == "module"
