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
    """Asked for explicitly (hf:// or hub=True), the Hub is used; offline that is a
    SourceError naming the hf:// id."""
    code = ("from compressor.sources import open_source\n"
            "from compressor import SourceError\n"
            "for spec, kw in (('hf://facebook/sam-vit-base', {}), ('facebook/sam-vit-base', {'hub': True})):\n"
            "    try:\n        open_source(spec, **kw)\n    except SourceError as e:\n        print('SourceError', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("SourceError")]
    assert len(lines) == 2 and all("Hugging Face Hub" in ln and "hf://facebook/sam-vit-base" in ln for ln in lines), \
        out.stdout + out.stderr[-2000:]


def test_missing_relative_path_never_goes_to_the_hub(tmp_path, monkeypatch):
    """A mistyped local path that happens to look like org/name is "no such file";
    nothing is downloaded unless the Hub was asked for."""
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("the Hub must not be contacted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match="no such file or directory; to download") as info:
        open_source("models/sam-vit-bsae")
    assert "hf://models/sam-vit-bsae" in str(info.value) and "--hub" in str(info.value)
    with pytest.raises(SourceError, match="not a Hugging Face Hub id"):
        open_source("hf://../../etc")
    # a local folder of that shape is the folder, hub or not
    (tmp_path / "models" / "m").mkdir(parents=True)
    save_file(_sd(), tmp_path / "models" / "m" / "model.safetensors")
    assert open_source("models/m", hub=True).kind == "hf-dir"


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


# -- issue 9: what a source may be ----------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_fast_never_opened_blocking(tmp_path):
    save_file(_sd(), tmp_path / "model-a.safetensors")
    os.mkfifo(tmp_path / "model-b.safetensors")  # nobody ever writes to it
    import threading

    got = []
    t = threading.Thread(target=lambda: got.append(pytest.raises(SourceError, open_source, tmp_path)), daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive() and got
    assert "FIFO" in str(got[0].value) and "model-b.safetensors" in str(got[0].value)
    os.mkfifo(tmp_path / "lone.pt")
    with pytest.raises(SourceError, match="FIFO"):
        open_source(tmp_path / "lone.pt")
    # a FIFO swapped in after the directory was opened is refused when read, not waited on
    d2 = tmp_path / "d2"
    d2.mkdir()
    save_file(_sd(), d2 / "model.safetensors")
    src = open_source(d2)
    os.unlink(d2 / "model.safetensors")
    os.mkfifo(d2 / "model.safetensors")
    with pytest.raises(SourceError, match="FIFO"):
        src.tensor_index()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_permission_denied_is_reported_as_such(tmp_path):
    save_file(_sd(), tmp_path / "m.safetensors")
    os.chmod(tmp_path / "m.safetensors", 0)
    with pytest.raises(SourceError, match="permission denied"):
        open_source(tmp_path / "m.safetensors").tensor_index()
    locked = tmp_path / "locked"
    locked.mkdir()
    save_file(_sd(), locked / "m.safetensors")
    locked.chmod(0)
    try:
        with pytest.raises(SourceError, match="permission denied"):
            open_source(locked / "m.safetensors")
    finally:
        locked.chmod(0o755)


def test_not_a_directory_component_is_named(tmp_path):
    save_file(_sd(), tmp_path / "m.safetensors")
    with pytest.raises(SourceError, match="not a directory"):
        open_source(tmp_path / "m.safetensors" / "x.safetensors")


def test_pt_keys_that_collide_as_strings(tmp_path):
    torch.save({1: torch.ones(20), "1": torch.zeros(20)}, tmp_path / "dup.pt")
    with pytest.raises(SourceError, match="same name") as info:
        open_source(tmp_path / "dup.pt").tensor_index()
    assert info.value.tensor == "1" and "dup.pt" in str(info.value)
    torch.save({"state_dict": {1: torch.ones(20), "1": torch.zeros(20)}}, tmp_path / "nested.pt")
    with pytest.raises(SourceError, match="same name"):
        open_source(tmp_path / "nested.pt").tensor_index()
    torch.save({1: torch.ones(20), 2: torch.zeros(20)}, tmp_path / "ints.pt")  # int keys alone are fine
    assert {i.name for i in open_source(tmp_path / "ints.pt").tensor_index()} == {"1", "2"}


@pytest.mark.parametrize("kind", ["meta", "sparse_coo", "sparse_csr", "nested"])
def test_pt_tensors_without_dense_data_are_refused(tmp_path, kind):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = {"meta": lambda: torch.empty(30, device="meta"), "sparse_coo": lambda: torch.eye(30).to_sparse(),
             "sparse_csr": lambda: torch.eye(30).to_sparse_csr(),
             "nested": lambda: torch.nested.nested_tensor([torch.ones(20), torch.ones(30)])}[kind]()
        torch.save({"ok": torch.ones(30), "bad": t}, tmp_path / "x.pt")
        with pytest.raises(SourceError) as info:
            open_source(tmp_path / "x.pt").tensor_index()
    assert info.value.tensor == "bad" and "x.pt" in str(info.value)


def test_weight_map_values_must_be_file_names(tmp_path):
    save_file({"a": torch.randn(30)}, tmp_path / "s1.safetensors")
    for wm, needle in [({"a": 1}, "must be a file name"), ({"a": ["s1.safetensors"]}, "must be a file name"),
                       ({"a": "../s1.safetensors"}, "not a weight file inside"), ({}, "no 'weight_map'"),
                       ({"a": "/etc/passwd"}, "not a weight file inside")]:
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        with pytest.raises(SourceError, match=needle) as info:
            open_source(tmp_path)
        assert "model.safetensors.index.json" in str(info.value)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "s1.safetensors", '
                                                          '"a": "s1.safetensors"}}')
    with pytest.raises(SourceError, match="twice"):
        open_source(tmp_path)


def test_index_listing_a_tensor_no_shard_holds(tmp_path):
    save_file({"a": torch.randn(30)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.randn(30)}, tmp_path / "s2.safetensors")
    wm = {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(SourceError, match="does not hold it") as info:
        open_source(tmp_path).tensor_index()
    assert info.value.tensor in ("b", "c")


def test_bin_that_is_safetensors_is_read_as_safetensors(tmp_path):
    save_file(_sd(), tmp_path / "pytorch_model.bin")
    got = dict(open_source(tmp_path / "pytorch_model.bin").read())
    assert torch.equal(got["a.weight"], _sd()["a.weight"])
    d = tmp_path / "hf"
    d.mkdir()
    save_file(_sd(), d / "pytorch_model.bin")
    assert {i.name for i in open_source(d).tensor_index()} == set(_sd())
    # and the other way round: a pickle named .safetensors says what it is
    torch.save(_sd(), tmp_path / "pickled.safetensors")
    with pytest.raises(SourceError, match="PyTorch checkpoint"):
        open_source(tmp_path / "pickled.safetensors").tensor_index()


def test_empty_sources_are_refused(tmp_path):
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(SourceError, match="no tensors"):
        open_source(tmp_path / "empty.safetensors").tensor_index()
    torch.save({}, tmp_path / "empty.pt")
    with pytest.raises(SourceError, match="no tensors"):
        open_source(tmp_path / "empty.pt").tensor_index()
    (tmp_path / "zero.safetensors").write_bytes(b"")
    with pytest.raises(SourceError, match="zero.safetensors"):
        open_source(tmp_path / "zero.safetensors").tensor_index()
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(SourceError, match="no weight files"):
        open_source(tmp_path / "emptydir")


def test_architecture_files_only_from_inside_the_source(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "s3cr3t"}')
    d = tmp_path / "model"
    d.mkdir()
    save_file(_sd(), d / "model.safetensors")
    (d / "config.json").symlink_to(secret)
    with pytest.raises(SourceError, match="outside the source folder") as info:
        open_source(d)
    assert "config.json" in str(info.value)
    (d / "config.json").unlink()
    if hasattr(os, "mkfifo"):
        os.mkfifo(d / "config.json")
        with pytest.raises(SourceError, match="FIFO"):
            open_source(d)
        (d / "config.json").unlink()
    # a link inside the folder is fine; so is a Hugging Face cache link into its blob store
    (d / "real-config.json").write_text("{}")
    (d / "config.json").symlink_to("real-config.json")
    assert [f.name for f in open_source(d).extra_files] == ["config.json"]
    snap = tmp_path / "models--org--m" / "snapshots" / "abc123"
    blobs = tmp_path / "models--org--m" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    save_file(_sd(), blobs / "w1")
    (blobs / "c1").write_text('{"model_type": "x"}')
    (snap / "model.safetensors").symlink_to("../../blobs/w1")
    (snap / "config.json").symlink_to("../../blobs/c1")
    src = open_source(snap)
    assert src.extra_file_map()["config.json"] == blobs / "c1"


def test_copied_architecture_files_get_the_usual_mode(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    save_file(_sd(), d / "model.safetensors")
    (d / "config.json").write_text("{}")
    os.chmod(d / "config.json", 0o600)
    ck = compress(str(d), backend="reference")
    ck.save(tmp_path / "c", backend="reference")
    mode = os.stat(tmp_path / "c" / "config.json").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # what any new file gets, not the source's 0600


def test_compressed_checkpoint_is_not_a_source(tmp_path):
    save_file(_sd(), tmp_path / "m.safetensors")
    compress(str(tmp_path / "m.safetensors"), backend="reference").save(tmp_path / "c", backend="reference")
    with pytest.raises(SourceError, match="decompress it first"):
        open_source(tmp_path / "c")


def test_huge_float64_values_are_refused_before_compressing(tmp_path):
    from compressor.checkpoint import check_source_values
    from compressor.config import HyperCompressionConfig
    from compressor.errors import OutOfRangeTensorError

    sd = {"a.weight": torch.randn(30, 30, dtype=torch.float64) * 0.02,
          "huge.weight": torch.rand(30, 30, dtype=torch.float64) * 1e300}
    save_file(sd, tmp_path / "m.safetensors")
    src = open_source(tmp_path / "m.safetensors")
    with pytest.raises(OutOfRangeTensorError) as info:
        check_source_values(src, HyperCompressionConfig())
    assert info.value.tensor == "huge.weight" and str(tmp_path / "m.safetensors") in str(info.value)
    check_source_values(src, HyperCompressionConfig(nonfinite="raw"))
    ck = compress(src, HyperCompressionConfig(nonfinite="raw"), backend="reference")
    assert ck.entries["huge.weight"].raw and ck.entries["huge.weight"].reason == "nonfinite"
