"""apply_hyperlinear / load_model on real transformers models (tiny SAM, all-MiniLM-L6-v2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.checkpoint import compress
from compressor.codec import CompressedTensor
from compressor.errors import MissingTensorError, UnexpectedTensorError
from compressor.hyperlinear import HyperLinear
from compressor.modeling import apply_hyperlinear, load_model

transformers = pytest.importorskip("transformers")


def _tiny_sam_config():
    vc = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=128, patch_size=16,
              output_channels=32, mlp_dim=128, global_attn_indexes=[1], window_size=4, num_pos_feats=16)
    return transformers.SamConfig(
        vision_config=vc,
        prompt_encoder_config=dict(hidden_size=32, image_size=128, patch_size=16, image_embedding_size=8,
                                   mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=32),
    )


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.SamModel(_tiny_sam_config()).eval()
    ck = compress(model)
    d = tmp_path_factory.mktemp("sam") / "compressed"
    ck.save(d)
    return model, ck, d


def _sam_inputs():
    g = torch.Generator().manual_seed(3)
    return dict(pixel_values=torch.randn(1, 3, 128, 128, generator=g),
                input_points=torch.tensor([[[[30.0, 40.0], [90.0, 70.0]]]]))


def _compressed_linear_names(model, ck):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and isinstance(ck.entries.get(f"{n}.weight"), CompressedTensor)}


def _dequantized_reference(model_cls, config, ck):
    ref = model_cls(config).eval()
    ref.load_state_dict(ck.state_dict(), strict=False)
    ref.tie_weights()
    return ref


def test_load_model_sam_matches_dequantized_model(tiny_sam, monkeypatch):
    model, ck, d = tiny_sam
    targets = _compressed_linear_names(model, ck)
    assert len(targets) >= 40
    decoded: list[str] = []
    real_decode = CompressedTensor.decode

    def spy(self, kernels=None):
        decoded.append(self.name)
        return real_decode(self, kernels)

    monkeypatch.setattr(CompressedTensor, "decode", spy)
    loaded = load_model(d)
    monkeypatch.setattr(CompressedTensor, "decode", real_decode)

    # the float weights of compressed linears were never decoded, and none is held
    assert not {f"{n}.weight" for n in targets} & set(decoded)
    assert type(loaded) is transformers.SamModel and not loaded.training
    hls = {n for n, m in loaded.named_modules() if isinstance(m, HyperLinear)}
    assert hls == targets
    left = {n for n, m in loaded.named_modules() if type(m) is nn.Linear}
    assert not left & targets
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))

    ref = _dequantized_reference(transformers.SamModel, model.config, ck)
    with torch.inference_mode():
        got = loaded(**_sam_inputs())
        exp = ref(**_sam_inputs())
    torch.testing.assert_close(got.pred_masks, exp.pred_masks, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.iou_scores, exp.iou_scores, rtol=1e-4, atol=1e-4)


def test_apply_hyperlinear_in_place_on_real_model(tiny_sam):
    model, ck, _ = tiny_sam
    torch.manual_seed(1)
    target = transformers.SamModel(model.config).eval()  # different random weights, all replaced/loaded
    replaced = apply_hyperlinear(target, ck)
    assert set(replaced) == _compressed_linear_names(model, ck)
    ref = _dequantized_reference(transformers.SamModel, model.config, ck)
    with torch.no_grad():
        torch.testing.assert_close(target(**_sam_inputs()).pred_masks, ref(**_sam_inputs()).pred_masks,
                                   rtol=1e-4, atol=1e-4)
    # the layers own their indices: the checkpoint's arrays are not aliased
    import numpy as np

    for n in replaced:
        assert not np.shares_memory(target.get_submodule(n).theta.numpy(), ck.entries[f"{n}.weight"].theta)


def test_apply_hyperlinear_strict_and_missing_bias(tiny_sam):
    model, ck, _ = tiny_sam
    extra = dict(ck.entries)
    extra["not.in.model"] = ck.entries["vision_encoder.neck.conv1.weight"]
    with pytest.raises(UnexpectedTensorError):
        apply_hyperlinear(transformers.SamModel(model.config), extra)
    name = sorted(_compressed_linear_names(model, ck))[0]
    no_bias = {k: v for k, v in ck.entries.items() if k != f"{name}.bias"}
    with pytest.raises(MissingTensorError):
        apply_hyperlinear(transformers.SamModel(model.config), no_bias)


def test_load_model_needs_config(tmp_path, tiny_sam):
    with pytest.raises(MissingTensorError, match="config.json"):
        load_model(tmp_path)


SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "I can't believe how delicious this homemade lasagna turned out!",
    "The quarterback threw a sixty-yard touchdown pass in overtime.",
    "Quantum computers use qubits that can exist in superposition.",
    "Please remember to water the tomatoes before you leave for work.",
    "The Treaty of Versailles was signed in 1919.",
    "My laptop battery dies after barely two hours of use.",
    "She painted the old wooden fence a bright shade of yellow.",
    "How do I reset my password if I no longer have access to my email?",
    "The orchestra performed Beethoven's ninth symphony to a standing ovation.",
    "Heavy rain is expected across the northern region this weekend.",
    "Neural networks learn representations by adjusting their weights.",
    "He ordered a double espresso and a croissant at the corner cafe.",
    "The museum's new exhibit features ancient Egyptian artifacts.",
    "Regular exercise reduces the risk of heart disease.",
    "The train to Berlin was delayed by forty minutes.",
    "Our team finally fixed the memory leak in the production server.",
    "A gentle breeze rustled the leaves of the old oak tree.",
    "Electric vehicles are becoming cheaper to manufacture every year.",
    "The detective examined the footprints near the broken window.",
    "Children built an enormous sandcastle on the beach.",
    "Inflation affects the purchasing power of ordinary households.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Volcanic eruptions can inject ash high into the stratosphere.",
    "Don't forget to bring your passport to the airport.",
    "The startup raised twenty million dollars in its latest funding round.",
    "Jazz musicians often improvise solos during live performances.",
    "Honeybees communicate the location of flowers through a waggle dance.",
    "The hospital opened a new wing dedicated to pediatric care.",
    "Why is the sky blue during the day but red at sunset?",
    "He spent the entire afternoon reading a mystery novel.",
    "The software update introduced several critical security patches.",
    "Migrating birds travel thousands of kilometres each autumn.",
    "A good night's sleep improves concentration and memory.",
]


def _embed(model, batch):
    with torch.inference_mode():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1)


def test_minilm_sentence_embeddings(minilm_dir, tmp_path):
    ck = compress(minilm_dir)  # default settings
    ck.save(tmp_path / "minilm")
    loaded = load_model(tmp_path / "minilm")
    targets = {n[: -len(".weight")] for n, e in ck.entries.items()
               if isinstance(e, CompressedTensor) and e.layout == "rows" and n.endswith(".weight")}
    linear_left = {n for n, m in loaded.named_modules() if type(m) is nn.Linear}
    hls = {n for n, m in loaded.named_modules() if isinstance(m, HyperLinear)}
    assert hls and not linear_left & targets
    assert hls <= targets

    original = transformers.AutoModel.from_pretrained(str(minilm_dir)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    batch = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    cos = torch.nn.functional.cosine_similarity(_embed(loaded, batch), _embed(original, batch))
    assert cos.shape == (len(SENTENCES),)
    assert cos.mean().item() >= 0.985, cos
