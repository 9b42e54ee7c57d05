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


def sam_parts(hidden: int = 32, layers: int = 2, heads: int = 2, image: int = 128, out_ch: int = 32,
              decoder_hidden: int = 32, *, mlp_dim: int | None = None,
              initializer_range: float | None = None) -> tuple[dict, dict, dict]:
    """The (vision, prompt encoder, mask decoder) config dicts of a small SAM: a ViT of
    ``layers`` blocks (windowed, the last global) with ``mlp_dim`` (default 4 x
    ``hidden``), ``out_ch`` embedding channels, a two-block decoder of
    ``decoder_hidden``. ``initializer_range`` None keeps transformers' default."""
    vision = dict(hidden_size=hidden, output_channels=out_ch, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=image, patch_size=16, window_size=4, global_attn_indexes=[layers - 1],
                  # the prompt encoder's positional embedding has 2*num_pos_feats channels,
                  # which must equal the image embedding's: without this the model cannot run
                  num_pos_feats=out_ch // 2, mlp_dim=4 * hidden if mlp_dim is None else mlp_dim)
    if initializer_range is not None:
        vision["initializer_range"] = initializer_range
    prompt = dict(hidden_size=out_ch, image_size=image, patch_size=16, mask_input_channels=4)
    decoder = dict(hidden_size=decoder_hidden, mlp_dim=2 * decoder_hidden, num_hidden_layers=2, num_attention_heads=2,
                   iou_head_hidden_dim=decoder_hidden)
    return vision, prompt, decoder


def sam_model(kind: str, parts: tuple[dict, dict, dict]):
    """A ``SamModel`` (``kind`` "sam") or ``SamHQModel`` ("sam_hq") of :func:`sam_parts`'
    dicts, drawn from torch's current seed; with its config in ``model.config``."""
    from transformers import SamConfig, SamHQConfig, SamHQModel, SamModel

    vision, prompt, decoder = parts
    if kind == "sam":
        return SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))
    if kind == "sam_hq":
        return SamHQModel(SamHQConfig(vision_config=vision, prompt_encoder_config=prompt,
                                      mask_decoder_config=dict(decoder, vit_dim=vision["hidden_size"])))
    raise ValueError(f"unknown SAM kind {kind!r}; known: sam, sam_hq")


def sam_vit_b():
    """The SAM ViT-B architecture at full size (transformers defaults, 93.7M parameters)."""
    from transformers import SamConfig, SamModel

    return SamModel(SamConfig())


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
    from transformers import Sam2Config, Sam2Model

    if kind == "sam-vit-b":
        model = sam_vit_b()
        return model.eval(), processor_for(model.config)
    vision, prompt, decoder = parts = sam_parts(image=size, mlp_dim=64)
    if kind in ("sam", "sam_hq"):
        model = sam_model(kind, parts)
        return model.eval(), processor_for(model.config)
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
    return save_random_init(model, processor, out_dir, builder=f"eval_jobs.tiny_models:{kind}", seed=seed)


def save_random_init(model, processor, out_dir: str | Path, *, builder: str, seed: int) -> Path:
    """Save a seeded random-init model with its processor and the provenance marker
    that says its accuracy figures are noise."""
    from .provenance import write_provenance

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    write_provenance(out, "random-init", builder=builder, seed=seed)
    return out
