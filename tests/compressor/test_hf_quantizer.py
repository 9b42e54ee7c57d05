"""``from_pretrained`` on compressed directories through transformers' quantizer
registry: HyperLinear layers (no float decode of compressed linears), the same
model as ``load_model``, save_pretrained refusing, loud failure without Birkhoff."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import compressor
from compressor.checkpoint import compress
from compressor.codec import CompressedTensor
from compressor.errors import ChecksumError, ConfigError, UnknownFormatError
from compressor.hyperlinear import HyperLinear
from compressor.modeling import HyperLinearSlot, load_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.core_model_loading")  # the loader the quantizer plugs into

from compressor.hf_quantizer import BirkhoffConfig, BirkhoffHfQuantizer  # noqa: E402

from tests.compressor.test_hyperlinear_models import SENTENCES, _embed, _sam_inputs, _tiny_sam_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _rows_linears(ck) -> set[str]:
    return {n[: -len(".weight")] for n, e in ck.entries.items()
            if isinstance(e, CompressedTensor) and e.layout == "rows" and n.endswith(".weight")}


@pytest.fixture(scope="module")
def minilm(minilm_dir, tmp_path_factory):
    """all-MiniLM-L6-v2 compressed with the default settings, its original and a batch."""
    d = tmp_path_factory.mktemp("minilm") / "c"
    ck = compress(str(minilm_dir))
    ck.save(d)
    original = transformers.AutoModel.from_pretrained(str(minilm_dir)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    batch = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    return d, ck, original, batch


def test_import_registers_the_method():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["birkhoff"] is BirkhoffHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["birkhoff"] is BirkhoffConfig
    compressor.hf_quantizer.register()  # idempotent
    assert AUTO_QUANTIZER_MAPPING["birkhoff"] is BirkhoffHfQuantizer


@pytest.mark.parametrize("first", ["transformers", "compressor"])
def test_registration_whichever_is_imported_first(first):
    imports = ["import transformers.quantizers.auto as auto", "import compressor"]
    if first == "compressor":
        imports.reverse()
    code = "; ".join(imports + ["print(auto.AUTO_QUANTIZER_MAPPING['birkhoff'].__name__)"])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "BirkhoffHfQuantizer"


def test_automodel_from_pretrained_minilm(minilm, monkeypatch):
    d, ck, original, batch = minilm
    decoded: list[str] = []
    real_decode = CompressedTensor.decode

    def spy(self, kernels=None):
        decoded.append(self.name)
        return real_decode(self, kernels)

    monkeypatch.setattr(CompressedTensor, "decode", spy)
    model = transformers.AutoModel.from_pretrained(str(d))
    monkeypatch.setattr(CompressedTensor, "decode", real_decode)

    targets = _rows_linears(ck)
    assert type(model) is transformers.BertModel and not model.training
    hls = {n for n, m in model.named_modules() if isinstance(m, HyperLinear)}
    assert hls and hls <= targets
    assert not {n for n, m in model.named_modules() if type(m) is nn.Linear} & targets
    assert not any(isinstance(m, HyperLinearSlot) for m in model.modules())
    # the compressed linears were never decoded to float weights
    assert not {f"{n}.weight" for n in hls} & set(decoded)
    assert model.config.quantization_config.quant_method == "birkhoff"
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))

    cos = torch.nn.functional.cosine_similarity(_embed(model, batch), _embed(original, batch))
    assert cos.shape == (len(SENTENCES),)
    assert cos.mean().item() >= 0.985, cos
    # the same model load_model builds
    torch.testing.assert_close(_embed(model, batch), _embed(load_model(d), batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["from_pretrained", "load_model"])
def test_save_pretrained_refuses(minilm, tmp_path, how):
    d = minilm[0]
    model = transformers.AutoModel.from_pretrained(str(d)) if how == "from_pretrained" else load_model(d)
    with pytest.raises(ValueError, match="birkhoff"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()  # nothing written that could load as random weights


def test_dequantize_then_save_pretrained_round_trips(minilm, tmp_path):
    d, _, _, batch = minilm
    model = transformers.AutoModel.from_pretrained(str(d))
    expected = _embed(model, batch)
    model.dequantize()
    assert not any(isinstance(m, HyperLinear) for m in model.modules())
    model.save_pretrained(tmp_path / "float")
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())
    again = transformers.AutoModel.from_pretrained(str(tmp_path / "float"))
    assert not any(isinstance(m, HyperLinear) for m in again.modules())
    torch.testing.assert_close(_embed(again, batch), expected, rtol=1e-4, atol=1e-4)


def test_without_birkhoff_transformers_fails_loudly(minilm):
    """No import of Birkhoff: transformers warns that it does not know the method and
    the load fails on the packed tensors; it never returns a model with random weights."""
    code = ("import sys, transformers; "
            "transformers.AutoModel.from_pretrained(sys.argv[1]); "
            "assert 'compressor' not in sys.modules; print('LOADED')")
    r = subprocess.run([sys.executable, "-c", code, str(minilm[0])], capture_output=True, text=True,
                       timeout=600, cwd="/")
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "birkhoff" in r.stderr  # transformers names the method it does not know
    assert "mismatch" in r.stderr.lower()


def test_unknown_format_version_is_refused(minilm, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(minilm[0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownFormatError, match="format_version 99"):
        transformers.AutoModel.from_pretrained(str(d))


def test_corrupt_shard_is_refused(minilm, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(minilm[0], d)
    shard = next(d.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        transformers.AutoModel.from_pretrained(str(d))


def test_device_map_over_several_devices_is_refused():
    # transformers needs accelerate for any device_map (not installed here): the check itself
    q = BirkhoffHfQuantizer(BirkhoffConfig(), pre_quantized=True)
    with pytest.raises(ConfigError, match="one device"):
        q.validate_environment(device_map={"embeddings": "cpu", "encoder": "disk"})
    q.validate_environment(device_map={"": "cpu"})
    q.validate_environment(device_map=None)


def test_sam_from_pretrained(tmp_path):
    torch.manual_seed(0)
    sam = transformers.SamModel(_tiny_sam_config()).eval()
    ck = compress(sam)
    ck.save(tmp_path / "sam")
    ref = load_model(tmp_path / "sam")
    for cls in (transformers.SamModel, transformers.AutoModel):
        model = cls.from_pretrained(str(tmp_path / "sam"))
        assert type(model) is transformers.SamModel
        hls = {n for n, m in model.named_modules() if isinstance(m, HyperLinear)}
        assert hls == {n for n, m in ref.named_modules() if isinstance(m, HyperLinear)}
        assert len(hls) >= 40
        with torch.inference_mode():
            got, exp = model(**_sam_inputs()), ref(**_sam_inputs())
        torch.testing.assert_close(got.pred_masks, exp.pred_masks, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.iou_scores, exp.iou_scores, rtol=1e-5, atol=1e-5)
