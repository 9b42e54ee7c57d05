"""Codec v2 in checkpoints (issue 12, phase 2): format version 2 written by the one
checkpoint writer, read back by the validating loader, run by LatticeLinear layers
through load_model and from_pretrained, chosen with `birkhoff compress --codec v2`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from compressor import format as fmt
from compressor.checkpoint import CompressedCheckpoint, compress
from compressor.codec import RawTensor
from compressor.codec_v2 import CodecV2Config
from compressor.codec_v2.entry import V2Entry
from compressor.errors import (ChecksumError, DTypeMismatchError, EntropyStreamError, FormatError, ManifestError,
                               UnknownFormatError)
from compressor.hyperlinear.lattice_module import LatticeLinear
from compressor.modeling import load_model

transformers = pytest.importorskip("transformers")
from tests.compressor.test_hf_files import _tiny_bert  # noqa: E402  (one tiny BERT for the suite)


def _state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"lin.weight": torch.randn(48, 80, generator=g) * 0.05, "lin.bias": torch.randn(48, generator=g),
            "tok.embeddings.weight": torch.randn(64, 24, generator=g), "ids": torch.arange(12),
            "half.weight": (torch.randn(40, 64, generator=g) * 0.1).to(torch.bfloat16)}


@pytest.fixture(scope="module")
def bert_v2(tmp_path_factory):
    model = _tiny_bert(hidden=64)  # 64x64 and wider matrices: codec v2 codes tensors of 1024+ elements
    src = tmp_path_factory.mktemp("bert-v2-src")
    model.save_pretrained(src)
    d = tmp_path_factory.mktemp("bert-v2") / "c"
    ck = compress(str(src), CodecV2Config())
    manifest = ck.save(d)
    return model, src, d, ck, manifest


def _rewrite_manifest(d, edit) -> None:
    m = json.loads((d / fmt.MANIFEST_NAME).read_text())
    edit(m)
    (d / fmt.MANIFEST_NAME).write_text(json.dumps(m, sort_keys=True, indent=1) + "\n")


def test_v2_round_trip_writes_format_2_and_loads_the_same_weights(tmp_path):
    sd = _state_dict()
    before = {n: t.clone() for n, t in sd.items()}
    ck = compress(sd, CodecV2Config())
    assert all(torch.equal(sd[n], before[n]) for n in sd)  # the input is never modified
    kinds = {n: type(e).__name__ for n, e in ck.entries.items()}
    assert kinds == {"lin.weight": "V2Entry", "lin.bias": "RawTensor", "tok.embeddings.weight": "V2Entry",
                     "ids": "RawTensor", "half.weight": "V2Entry"}
    manifest = ck.save(tmp_path / "c")
    assert (manifest["format_version"], manifest["codec_version"]) == (fmt.FORMAT_VERSION_V2, 2)
    assert CodecV2Config.from_dict(manifest["config"]) == CodecV2Config()
    m = manifest["tensors"]["tok.embeddings.weight"]
    assert m["codec"] == "v2" and m["role"] == "embedding" and m["q"] == pytest.approx(3 * 0.12)
    assert manifest["tensors"]["lin.weight"]["role"] == "linear"
    back = CompressedCheckpoint.load(tmp_path / "c")
    assert back.config == CodecV2Config()
    for name, e in ck.entries.items():
        a, b = e.decode(), back.entries[name].decode()
        assert a.dtype == b.dtype == sd[name].dtype and torch.equal(a, b), name
    # the error the manifest reports is the one the weights have
    w = ck.entries["lin.weight"]
    err = (w.decode().double() - sd["lin.weight"].double()).abs().sum().item()
    assert manifest["tensors"]["lin.weight"]["abs_error_sum"] == pytest.approx(err, rel=1e-9)
    assert 0 < manifest["tensors"]["lin.weight"]["mae"] < 0.01


def test_the_rate_knobs_order_size_and_error(tmp_path):
    sd = {"w.weight": torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) * 0.02}
    sizes, errs = [], []
    for cfg in (CodecV2Config(bits_per_weight=6.0), CodecV2Config(), CodecV2Config(preset="small"),
                CodecV2Config(bits_per_weight=3.0)):
        e = compress(sd, cfg).entries["w.weight"]
        sizes.append(e.stored_bytes)
        errs.append(e.abs_error_sum)
    assert sizes == sorted(sizes, reverse=True) and errs == sorted(errs)
    bpw = 8 * compress(sd, CodecV2Config(bits_per_weight=4.0)).entries["w.weight"].stored_bytes / 65536
    assert 3.7 < bpw < 4.3


def test_a_paper_manifest_with_a_v2_entry_or_other_versions_is_refused(tmp_path):
    d = tmp_path / "c"
    compress(_state_dict(), CodecV2Config()).save(d)
    cases = [
        (lambda m: m.update(format_version=1, codec_version=1), ManifestError),  # v2 entries, paper's format
        (lambda m: m.update(format_version=3), UnknownFormatError),
        (lambda m: m.update(codec_version=1), UnknownFormatError),
        (lambda m: m["tensors"]["lin.weight"].update(codec="v3"), ManifestError),
        (lambda m: m["tensors"]["lin.weight"].update(role="conv"), ManifestError),
        (lambda m: m["tensors"]["lin.weight"].update(stored_bytes=-1), ManifestError),
        (lambda m: m["tensors"]["lin.weight"].update(extra=1), ManifestError),
        (lambda m: m["config"].update(preset="tiny"), ManifestError),
    ]
    original = (d / fmt.MANIFEST_NAME).read_text()
    for edit, error in cases:
        (d / fmt.MANIFEST_NAME).write_text(original)
        _rewrite_manifest(d, edit)
        with pytest.raises(error) as info:
            CompressedCheckpoint.load(d)
        assert fmt.MANIFEST_NAME in str(info.value)


def test_a_header_that_disagrees_with_the_manifest_is_refused(tmp_path):
    d = tmp_path / "c"
    compress(_state_dict(), CodecV2Config()).save(d)
    _rewrite_manifest(d, lambda m: m["tensors"]["lin.weight"].update(role="embedding"))
    with pytest.raises(DTypeMismatchError, match="stored v2 header has role 'linear'") as info:
        CompressedCheckpoint.load(d)
    assert info.value.tensor == "lin.weight" and info.value.file.endswith(".safetensors")


def _flip_payload_byte(d, manifest, name):
    """Flip the last byte of a v2 tensor's byte form (inside its entropy-coded
    payload) in its shard, leaving every header intact."""
    from compressor.format.shards import _parse_shard_header

    shard = d / manifest["tensors"][name]["shard"]
    with open(shard, "rb") as f:
        import hashlib

        start, entries = _parse_shard_header(f, str(shard), shard.stat().st_size, fmt.LoadLimits(),
                                             hashlib.sha256(), 1 << 20)
    raw = bytearray(shard.read_bytes())
    raw[start + entries[name].end - 1] ^= 0x5A
    shard.write_bytes(bytes(raw))


def test_a_corrupted_block_is_a_typed_error_never_wrong_weights(tmp_path):
    d = tmp_path / "c"
    manifest = compress(_state_dict(), CodecV2Config()).save(d)
    _flip_payload_byte(d, manifest, "lin.weight")
    with pytest.raises(ChecksumError) as info:  # the shard's and the tensor's sha256
        CompressedCheckpoint.load(d)
    assert info.value.tensor == "lin.weight"
    # unverified, the stream's own checks still catch it: block CRC, ANS end, decoded-symbol CRC
    ck = CompressedCheckpoint.load(d, verify=False)
    with pytest.raises((ChecksumError, EntropyStreamError)) as info:
        ck.entries["lin.weight"].decode()
    assert isinstance(info.value, FormatError) and info.value.tensor == "lin.weight"
    with pytest.raises(FormatError):
        ck.entries["lin.weight"].device_form()


def test_lattice_linear_runs_the_product_without_float_weights():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 131, generator=g) * 0.03
    w[3, 7] = 2.5  # an outlier: its own lattice point, maybe an escape
    bias = torch.randn(96, generator=g)
    e = compress({"l.weight": w}, CodecV2Config()).entries["l.weight"]
    layer = LatticeLinear.from_entry(e, bias)
    assert {k: v.dtype for k, v in layer.state_dict().items() if k in ("xt", "bt")} == \
        {"xt": torch.int8, "bt": torch.int8}
    assert layer.xt.numel() + layer.bt.numel() == 96 * 131 + 96  # 8 bits a weight (odd `in`: one pad per row)
    dense = e.decode()
    assert torch.equal(layer.dequantize(), dense) or torch.allclose(layer.dequantize(), dense, atol=1e-7)
    for tokens in (1, 5, 40):
        x = torch.randn(tokens, 131, generator=g)
        ref = torch.nn.functional.linear(x.double(), dense.double(), bias.double()).float()
        with torch.no_grad():
            assert torch.allclose(layer(x), ref, atol=1e-4, rtol=1e-4), tokens
    # bf16 input and a call that needs gradients take the torch decode, and work
    x = torch.randn(4, 131, generator=g)
    assert torch.allclose(layer(x.to(torch.bfloat16)).float(), layer(x), atol=0.1)
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert torch.allclose(xg.grad, dense.sum(0).expand(4, -1), atol=1e-4)


def _pooled(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def test_load_model_and_from_pretrained_run_lattice_layers(bert_v2):
    model, src, d, ck, manifest = bert_v2
    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    assert (cfg["format_version"], cfg["codec_version"]) == (2, 2)
    inputs = dict(input_ids=torch.tensor([[5, 17, 33, 2, 99, 64]]), attention_mask=torch.ones(1, 6, dtype=torch.long))
    loaded = load_model(d)
    lattice = [n for n, m in loaded.named_modules() if isinstance(m, LatticeLinear)]
    v2_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  and isinstance(ck.entries.get(f"{n}.weight"), V2Entry)]
    assert sorted(lattice) == sorted(v2_linears) and len(lattice) >= 12
    # the same model with the decoded float weights: what the lattice layers must compute
    ref = _tiny_bert(hidden=64)
    ref.load_state_dict(ck.state_dict(), strict=False)
    out = _pooled(loaded, inputs)
    assert torch.allclose(out, _pooled(ref, inputs), atol=1e-4)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), _pooled(model, inputs).flatten(), dim=0)
    assert cos > 0.99
    hf = transformers.AutoModel.from_pretrained(str(d)).eval()
    assert sum(isinstance(m, LatticeLinear) for m in hf.modules()) == len(lattice)
    assert torch.allclose(_pooled(hf, inputs), out, atol=1e-5)
    # model.dequantize() gives plain nn.Linear layers with the decoded weights back
    hf.dequantize()
    assert not any(isinstance(m, LatticeLinear) for m in hf.modules())
    assert torch.allclose(_pooled(hf, inputs), out, atol=1e-4)


def _cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "compressor.cli", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_cli_compress_codec_v2_reports_bits_and_inspect_shows_the_codec(bert_v2, tmp_path):
    _, src, _, _, _ = bert_v2
    r = _cli("compress", str(src), str(tmp_path / "v2"), "--preset", "small", "--json")  # v2: the default
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["codec"] == "v2" and 2.5 < res["bits_per_weight"] < 8 and res["ratio"] > 3
    manifest = fmt.read_manifest(tmp_path / "v2")
    assert manifest["config"]["preset"] == "small" and manifest["format_version"] == 2
    paper = json.loads(_cli("compress", str(src), str(tmp_path / "p"), "--codec", "paper", "--json")
                       .stdout.strip().splitlines()[-1])
    assert paper["codec"] == "paper" and fmt.read_manifest(tmp_path / "p")["format_version"] == 1
    assert res["bits_per_weight"] < paper["bits_per_weight"]
    rows = json.loads(_cli("inspect", str(tmp_path / "v2"), "--json").stdout)
    coded = [row for row in rows if row["codec"] == "v2"]
    assert coded and all(row["U"] is None and 1 < row["bits_per_weight"] < 8 for row in coded)
    table = _cli("inspect", str(tmp_path / "v2")).stdout
    assert "v2" in table
    # settings of the other codec are refused before any work, naming the flag
    for args, flag in ((["--box-size", "0.2"], "--box-size"), (["--codec", "paper", "--bits", "4"], "--bits"),
                       (["--codec", "v2", "--bits", "4", "--rel-error", "0.03"], "--rel-error")):
        r = _cli("compress", str(src), str(tmp_path / "no"), *args, check=False)
        assert r.returncode != 0 and "ConfigError" in r.stderr and flag in r.stderr, r.stderr
        assert not (tmp_path / "no").exists()


def test_decompress_writes_the_decoded_v2_weights(bert_v2, tmp_path):
    _, _, d, ck, _ = bert_v2
    _cli("decompress", str(d), str(tmp_path / "out.safetensors"))
    from safetensors.numpy import load_file

    got = load_file(str(tmp_path / "out.safetensors"))
    for name, e in ck.entries.items():
        want = e.decode().numpy() if not isinstance(e, RawTensor) else e.tensor.numpy()
        assert np.array_equal(got[name], want), name


def test_lattice_linear_cuda_paths_under_the_simulator():
    """The CUDA orchestration of LatticeLinear (fused up to 16 tokens, decode + matmul
    above; fp32, bf16) run on CPU tensors by Numba's CUDA simulator, as CI can."""
    import numba

    if not numba.config.ENABLE_CUDASIM:
        pytest.skip("runs with NUMBA_ENABLE_CUDASIM=1 (scripts/test.sh sets it without a GPU)")
    from compressor.codec_v2.device import DeviceForm

    g = torch.Generator().manual_seed(9)
    m = torch.randint(-20, 21, (24, 61), generator=g).numpy()
    b = torch.randint(-20, 21, (24, 61), generator=g).numpy()
    m[2, 5], b[7, 60] = 300, -200  # beyond int8: escapes (the second in the odd last column's pair)
    rel = np.full(24, 1.0, dtype=np.float16)
    form = DeviceForm.from_coords("l.weight", m, b, 0.001953125, rel, 121)
    assert form.esc_row.size == 3  # (2, 10), (2, 11) and (7, 120)
    bias = torch.randn(24, generator=g)
    layer = LatticeLinear(form, bias, backend="numba-cuda")
    dense = torch.from_numpy(form.dense())
    assert torch.equal(layer.dequantize(), dense)
    for tokens in (1, 5, 16, 40):
        x = torch.randn(2, tokens, 121, generator=g)
        ref = torch.nn.functional.linear(x.double(), dense.double(), bias.double())
        with torch.no_grad():
            y = layer(x)
            assert y.shape == (2, tokens, 24) and y.dtype == torch.float32
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
            yb = layer(x.to(torch.bfloat16))
            assert yb.dtype == torch.bfloat16
            torch.testing.assert_close(yb.double(), ref, rtol=0.05, atol=0.1)
