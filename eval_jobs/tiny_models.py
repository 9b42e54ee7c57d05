"""Small, seeded, real transformers SAM / SAM-HQ / SAM2 models saved with their processors.

No SAM weights can be downloaded here; these architectures (tiny configs, random
init from a fixed seed) exercise the whole evaluation path: processor, image
embedding reuse, prompt batching, post-processing. ``sam-vit-b`` is the full
SAM ViT-B architecture (``SamConfig()``) for the benchmark. Their directories
are marked random-init (``birkhoff_weights.json``): their mIoU and fidelity are
noise. The trained SAM of the project is ``eval_jobs/trained/sam-shapes``.
"""

from __future__ import annotations

from pathlib import Path

import torch

KINDS = ("sam", "sam_hq", "sam2", "sam-vit-b")


def _sam_parts(size: int) -> tuple[dict, dict, dict]:
    vision = dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=size,
                  patch_size=16, window_size=4, global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64)
    prompt = dict(hidden_size=32, image_size=size, patch_size=16, mask_input_channels=4)
    decoder = dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32)
    return vision, prompt, decoder


def processor_for(config):
    """The SAM / SAM-HQ processor matching a config's input size (1024 gives the
    stock processor), so a model built from a config can be saved with one."""
    from transformers import SamHQProcessor, SamImageProcessor, SamProcessor

    size = int(config.vision_config.image_size)
    cls = SamHQProcessor if config.model_type == "sam_hq" else SamProcessor
    if size == 1024:
        return cls(SamImageProcessor())
    return cls(SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size},
                                 mask_size={"longest_edge": size // 4},
                                 mask_pad_size={"height": size // 4, "width": size // 4}))


def build_model(kind: str, size: int = 128):
    """(model, processor) with the seed set by the caller."""
    from transformers import (Sam2Config, Sam2Model, SamConfig, SamHQConfig, SamHQModel, SamHQProcessor,
                              SamImageProcessor, SamModel, SamProcessor)

    if kind == "sam-vit-b":
        return SamModel(SamConfig()).eval(), SamProcessor(SamImageProcessor())
    vision, prompt, decoder = _sam_parts(size)
    if kind == "sam":
        cfg = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
        return SamModel(cfg).eval(), processor_for(cfg)
    if kind == "sam_hq":
        cfg = SamHQConfig(vision_config=vision, prompt_encoder_config=prompt,
                          mask_decoder_config=dict(decoder, vit_dim=vision["hidden_size"]))
        return SamHQModel(cfg).eval(), processor_for(cfg)
    if kind == "sam2":
        backbone = dict(model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1,
                        image_size=[size, size], blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[16, 32, 64, 128],
                        num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 4],
                        global_attention_blocks=[3], window_positional_embedding_background_size=[2, 2])
        v2 = dict(backbone_config=backbone, backbone_channel_list=[128, 64, 32, 16], fpn_hidden_size=32,
                  backbone_feature_sizes=[[size // 4] * 2, [size // 8] * 2, [size // 16] * 2])
        cfg = Sam2Config(vision_config=v2, prompt_encoder_config=prompt, mask_decoder_config=decoder)
        return Sam2Model(cfg).eval(), _sam2_processor(size)
    raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")


def _sam2_processor(size: int):
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import Sam2ImageProcessor, Sam2Processor

        return Sam2Processor(Sam2ImageProcessor(size={"height": size, "width": size},
                                                mask_size={"height": size // 4, "width": size // 4}))
    # No torchvision: the PIL twin writes the same preprocessor_config.json keys.
    from .models import Sam2ProcessorPil

    return Sam2ProcessorPil({"height": size, "width": size}, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def save_model(kind: str, out_dir: str | Path, *, seed: int = 0, size: int = 128) -> Path:
    """Build ``kind`` after ``torch.manual_seed(seed)`` and save model + processor to ``out_dir``."""
    torch.manual_seed(seed)
    model, processor = build_model(kind, size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    from .provenance import write_provenance

    write_provenance(out, "random-init", builder=f"eval_jobs.tiny_models:{kind}", seed=seed)
    return out
