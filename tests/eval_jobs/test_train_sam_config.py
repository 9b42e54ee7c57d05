"""The training config of the project's SAM, and the SAM-HQ architecture's training step.

``TrainConfig.from_dict`` reads the config a model's provenance records: a field
added since (``arch``) takes the value every earlier run had; an unknown field
or architecture is refused. One optimiser step of the SAM-HQ variant trains
its HQ parts: the early ViT features reach the loss.
"""

from __future__ import annotations

import pytest
import torch

from eval_jobs.train_sam import TrainConfig, _optimizer, _train_step, build_model, make_batch


def test_from_dict_round_trips_and_fills_fields_added_since():
    cfg = TrainConfig(arch="sam_hq", steps=7)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "arch"}  # a provenance from before `arch`
    assert TrainConfig.from_dict(old) == TrainConfig() and TrainConfig.from_dict(old).arch == "sam"


def test_unknown_fields_versions_and_archs_are_refused():
    with pytest.raises(ValueError, match="unknown train config fields.*'wings'"):
        TrainConfig.from_dict(dict(TrainConfig().to_dict(), wings=2))
    with pytest.raises(ValueError, match="unknown arch 'sam3'"):
        TrainConfig(arch="sam3")
    with pytest.raises(ValueError, match="unknown train config version 9"):
        TrainConfig.from_dict(dict(TrainConfig().to_dict(), version=9))


def test_sam_hq_step_trains_the_hq_parts():
    from transformers import SamHQModel

    cfg = TrainConfig(arch="sam_hq", steps=10, batch_images=2, prompts_per_image=2, warmup=1)
    torch.manual_seed(0)
    model, processor = build_model(cfg)
    assert isinstance(model, SamHQModel) and type(processor).__name__ == "SamHQProcessor"
    # the HQ decoder reads the first ViT layer's features, as wide as the encoder
    assert model.config.mask_decoder_config.vit_dim == cfg.vision_hidden
    opt, sched = _optimizer(model, cfg)
    model.train()
    hq = {n: p.detach().clone() for n, p in model.named_parameters()
          if n.startswith(("mask_decoder.compress_vit", "mask_decoder.hq_", "vision_encoder.layers.0."))}
    assert len(hq) > 6
    loss, iou = _train_step(model, opt, sched, make_batch(cfg, 0, processor), cfg, 0)
    assert torch.isfinite(torch.tensor(loss)) and 0.0 <= iou <= 1.0
    moved = [n for n, p in model.named_parameters() if n in hq and not torch.equal(p.detach(), hq[n])]
    assert {n.split(".")[1] for n in moved} >= {"compress_vit_conv1", "hq_token", "hq_mask_mlp", "layers"}, moved
