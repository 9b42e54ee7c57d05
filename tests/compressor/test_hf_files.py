"""The Hugging Face files of a compressed checkpoint: config.json with its
quantization_config (what the manifest records), the original config kept byte for
byte, the weights index, tokenizer files, and the original layout back from
``birkhoff decompress DST DIR``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from compressor import HyperCompressionConfig, TensorOverride, hf_files
from compressor import format as fmt
from compressor.checkpoint import CompressedCheckpoint, compress
from compressor.errors import SourceError

transformers = pytest.importorskip("transformers")

SENTENCES = ["The cat sat quietly on the warm windowsill.",
             "Quantum computers use qubits that can exist in superposition.",
             "Don't forget to bring your passport to the airport!"]


def _tiny_bert(seed=0, hidden=32):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=2 * hidden, max_position_embeddings=40)
    return transformers.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def bert_source(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert-src")
    model = _tiny_bert()
    model.save_pretrained(d)
    return model, d


@pytest.fixture(scope="module")
def bert_compressed(bert_source, tmp_path_factory):
    _, src = bert_source
    d = tmp_path_factory.mktemp("bert-c") / "c"
    manifest = compress(str(src)).save(d)
    return d, manifest


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_config_json_carries_quantization_config_recorded_by_the_manifest(bert_source, bert_compressed):
    _, src = bert_source
    d, manifest = bert_compressed
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    assert qc == {"quant_method": "birkhoff", "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION,
                  "codec_version": manifest["codec_version"], "manifest": "manifest.json",
                  "original_config": "config.original.json"}
    assert cfg == json.loads((src / "config.json").read_text())  # nothing else changed
    # the original, byte for byte
    assert (d / "config.original.json").read_bytes() == (src / "config.json").read_bytes()
    # the manifest records what is on disk: the rewritten config, the original, the index
    for name in ("config.json", "config.original.json", "model.safetensors.index.json"):
        rec = manifest["extra_files"][name]
        assert rec == {"bytes": (d / name).stat().st_size, "sha256": _sha(d / name)}
    CompressedCheckpoint.load(d)  # every check passes, extra files included
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {n: m["shard"] for n, m in manifest["tensors"].items()}
    assert all((d / f).is_file() for f in index["weight_map"].values())


def test_saving_a_loaded_checkpoint_again_gives_the_same_files(bert_compressed, tmp_path):
    d, _ = bert_compressed
    manifest = CompressedCheckpoint.load(d).save(tmp_path / "again")
    for name in ("config.json", "config.original.json", "model.safetensors.index.json"):
        assert (tmp_path / "again" / name).read_bytes() == (d / name).read_bytes(), name
    assert "quantization_config" not in json.loads((tmp_path / "again" / "config.original.json").read_text())
    assert set(manifest["extra_files"]) == {"config.json", "config.original.json", "model.safetensors.index.json"}


def test_module_source_gets_the_block(tmp_path):
    model = _tiny_bert(1)
    compress(model).save(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "birkhoff"
    assert json.loads((tmp_path / "c" / "config.original.json").read_text()) == json.loads(
        model.config.to_json_string())


def test_bare_state_dict_gets_no_hugging_face_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(16, 16)}, tmp_path / "m.safetensors")
    manifest = compress(str(tmp_path / "m.safetensors")).save(tmp_path / "c")
    assert manifest["extra_files"] == {}


def test_already_quantized_source_is_refused(bert_source, tmp_path):
    _, src = bert_source
    d = tmp_path / "q"
    d.mkdir()
    (d / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    ck = compress(str(d), HyperCompressionConfig(overrides=(TensorOverride("*", raw=True),)))
    with pytest.raises(SourceError, match="gptq") as info:
        ck.save(tmp_path / "out")
    assert info.value.file == str(d / "config.json")
    assert not (tmp_path / "out").exists()


def test_config_that_is_not_an_object_is_refused():
    with pytest.raises(SourceError, match="not an object"):
        hf_files.checkpoint_files({"config.json": b"[1, 2]"}, {})
    with pytest.raises(SourceError, match="not valid JSON"):
        hf_files.checkpoint_files({"config.json": b"{"}, {})


def test_tokenizer_of_the_compressed_directory_equals_the_original(minilm_dir, tmp_path):
    # all raw: the tokenizer does not depend on the codec, and this keeps the test fast
    ck = compress(str(minilm_dir), HyperCompressionConfig(overrides=(TensorOverride("*", raw=True),)))
    ck.save(tmp_path / "c")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "c" / name).read_bytes() == (minilm_dir / name).read_bytes(), name
    orig = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    got = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "c"))
    assert len(got) == len(orig) == 30522
    assert got.get_vocab() == orig.get_vocab()
    assert got(SENTENCES)["input_ids"] == orig(SENTENCES)["input_ids"]


def _birkhoff(*args):
    return subprocess.run([sys.executable, "-m", "compressor.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_decompress_into_a_directory_gives_the_original_layout(bert_source, bert_compressed, tmp_path):
    model, src = bert_source
    d, _ = bert_compressed
    r = _birkhoff("decompress", d, tmp_path / "plain")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "plain"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    plain = transformers.AutoModel.from_pretrained(str(out)).eval()
    assert not getattr(plain, "hf_quantizer", None)
    decoded = CompressedCheckpoint.load(d).state_dict()
    own = plain.state_dict()
    for k, v in decoded.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0)
    # a non-empty destination is refused, not overwritten
    r = _birkhoff("decompress", d, tmp_path / "plain")
    assert r.returncode == 2 and "not empty" in r.stderr
