"""Codec v2 rate control: what stays raw, roles, the relative-error and bits-per-weight knobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.codec_v2 import CodecV2Config, V2Tensor
from compressor.codec_v2.config import REL_ERROR_PER_STEP
from compressor.codec_v2.rate import encode_tensors, plan_tensors, roles_from_module
from compressor.errors import NonFiniteTensorError


def _model(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "embeddings.word_embeddings.weight": (rng.laplace(0, 0.05, (800, 64))).astype(np.float32),
        "layer.0.dense.weight": (rng.standard_normal((96, 64)) * 0.04).astype(np.float32),
        "layer.0.dense.bias": rng.standard_normal(96).astype(np.float32),
        "layer.0.out.weight": (rng.standard_normal((64, 96)) * np.geomspace(0.01, 0.1, 64)[:, None]).astype(np.float32),
        "position_ids": np.arange(64, dtype=np.int64)[None],
        "tiny.weight": np.ones((4, 4), np.float32),
    }


def test_plan_raw_roles_and_steps():
    cfg = CodecV2Config(preset="small")
    plans = plan_tensors(_model(), cfg)
    assert plans["layer.0.dense.bias"].action == "raw" and "1-D" in plans["layer.0.dense.bias"].reason
    assert plans["position_ids"].action == "raw" and plans["tiny.weight"].action == "raw"
    emb, lin = plans["embeddings.word_embeddings.weight"], plans["layer.0.dense.weight"]
    assert emb.role == "embedding" and lin.role == "linear"
    assert lin.q == cfg.rel_step and emb.q == pytest.approx(cfg.embedding_factor * cfg.rel_step)
    forced = plan_tensors(_model(), cfg, roles={"layer.0.dense.weight": "embedding"})
    assert forced["layer.0.dense.weight"].q == pytest.approx(emb.q)


def test_roles_from_a_module_mark_embedding_tables():
    net = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 16))
    roles = roles_from_module(net)
    assert roles == {"0.weight": "embedding"}
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    plans = plan_tensors(sd, CodecV2Config(min_elements=64), roles=roles)
    assert plans["0.weight"].role == "embedding" and plans["1.weight"].role == "linear"


def test_rel_error_knob_gives_that_relative_error():
    sd = _model()
    enc = encode_tensors(sd, CodecV2Config(rel_error=0.03, embedding_factor=1.0), kernels="numba-cpu")
    for name in ("layer.0.dense.weight", "embeddings.word_embeddings.weight", "layer.0.out.weight"):
        v = enc.entries[name]
        assert isinstance(v, V2Tensor) and v.q == pytest.approx(0.03 / REL_ERROR_PER_STEP)
        w = sd[name].astype(np.float64)
        err = v.decode().astype(np.float64) - w
        rel = np.sqrt((err ** 2).mean(axis=1) / (w ** 2).mean(axis=1))  # row by row
        assert np.median(rel) == pytest.approx(0.03, rel=0.1)


@pytest.mark.parametrize("target", [2.5, 4.0, 6.0])
def test_bits_per_weight_budget_is_met(target):
    sd = _model(1)
    enc = encode_tensors(sd, CodecV2Config(bits_per_weight=target), kernels="numba-cpu")
    st = enc.stats()
    # the budget is over the coded tensors, headers and models included; small tensors
    # here make the fixed costs weigh more than on a real model
    assert st["coded_bits_per_weight"] == pytest.approx(target, abs=0.25)


def test_presets_order_and_raw_copies():
    sd = _model(2)
    a = encode_tensors(sd, CodecV2Config(preset="faithful"), kernels="numba-cpu")
    b = encode_tensors(sd, CodecV2Config(preset="small"), kernels="numba-cpu")
    assert a.stats()["bytes"] > b.stats()["bytes"]
    da, db = a.decoded("numba-cpu"), b.decoded("numba-cpu")
    name = "layer.0.dense.weight"
    assert np.abs(da[name] - sd[name]).mean() < np.abs(db[name] - sd[name]).mean()
    assert np.array_equal(da["position_ids"], sd["position_ids"]) and da["position_ids"] is not sd["position_ids"]
    assert a.stats(source_bytes=10**6)["ratio"] == pytest.approx(10**6 / a.stats()["bytes"])


def test_torch_inputs_and_bfloat16_raw_tensors():
    sd = {"w": torch.randn(40, 40), "b": torch.randn(40, dtype=torch.bfloat16)}
    enc = encode_tensors(sd, CodecV2Config(), kernels="numba-cpu")
    assert isinstance(enc.entries["w"], V2Tensor)
    assert np.array_equal(enc.entries["b"], sd["b"].view(torch.int16).numpy())


def test_non_finite_tensors_are_errors_not_raw():
    sd = _model()
    sd["layer.0.dense.weight"][3, 3] = np.inf
    with pytest.raises(NonFiniteTensorError):
        encode_tensors(sd, CodecV2Config(), kernels="numba-cpu")


@pytest.mark.slow
def test_minilm_every_matrix_coded_and_decodes_within_its_lattice(minilm_file):
    from safetensors.numpy import load_file

    sd = load_file(str(minilm_file))
    enc = encode_tensors(sd, CodecV2Config(), kernels="numba-cpu")
    coded = {n for n, e in enc.entries.items() if isinstance(e, V2Tensor)}
    assert coded == {n for n, a in sd.items() if a.dtype.kind == "f" and a.ndim == 2 and a.size >= 1024}
    assert enc.plans["embeddings.token_type_embeddings.weight"].action == "raw"  # 768 elements
    st = enc.stats(minilm_file.stat().st_size)
    assert st["v2_tensors"] == len(coded) and st["raw_tensors"] == len(sd) - len(coded)
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        v = V2Tensor.from_bytes(enc.entries[name].to_bytes(), name=name)
        d = v.decode("numba-cpu")
        steps = v.steps()
        bound = steps[:, None] / np.sqrt(3) + 1e-7
        assert (np.abs(d - sd[name]).reshape(v.rows, -1) <= bound).all()
