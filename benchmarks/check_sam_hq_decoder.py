"""Does transformers' SamHQModel reproduce SAM's masks when it holds SAM's weights?

    python benchmarks/check_sam_hq_decoder.py [--model eval_jobs/trained/sam-shapes] [--batches 2]

SAM-HQ keeps SAM's decoder and adds an HQ mask to SAM's. So a ``SamHQModel``
holding a trained ``SamModel``'s weights in every shared part, with the HQ
mask's last layer zeroed (the HQ mask is then 0), should return SAM's masks,
up to the extra HQ token in the decoder's attention. This script builds that
model, runs both on training batches of ``eval_jobs.train_sam`` (box prompts)
and prints each one's box IoU against the ground truth, next to the largest
logit difference. In transformers 5.24.0 the SamHQ decoder discards the
two-way transformer's updated image embedding and swaps rows and columns of
the one it upscales, so the HQ model's IoU collapses (measured: 0.05 against
SAM's 0.78, docs/EVALUATION.md). The reason no SAM-HQ is trained here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import torch
    import transformers
    from safetensors.torch import load_file

    from eval_jobs.models import load_transformers_model
    from eval_jobs.train_sam import TrainConfig, _loss, build_model, make_batch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "eval_jobs" / "trained" / "sam-shapes"))
    ap.add_argument("--batches", type=int, default=2)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    sam, _ = load_transformers_model(a.model)
    cfg = TrainConfig(arch="sam_hq")
    hq, processor = build_model(cfg)
    sd = load_file(str(Path(a.model) / "model.safetensors"))
    hq.load_state_dict(sd, strict=False)  # every SamModel tensor has its place in a SamHQModel of this shape
    with torch.no_grad():
        hq.mask_decoder.hq_mask_mlp.proj_out.weight.zero_()
        hq.mask_decoder.hq_mask_mlp.proj_out.bias.zero_()
    sam.eval(), hq.eval()
    print(f"transformers {transformers.__version__}; {a.model}; box prompts of training batches")
    print("| batch | SamModel box IoU | SamHQModel (SAM's weights, HQ mask 0) box IoU | max logit difference |")
    print("|---|---|---|---|")
    for k in range(a.batches):
        b = make_batch(cfg, 10_000 + k, processor)
        with torch.no_grad():
            vis = hq.vision_encoder(b.pixel_values)
            out_hq = hq(image_embeddings=vis.last_hidden_state, intermediate_embeddings=vis.intermediate_embeddings,
                        input_boxes=b.boxes, multimask_output=False)
            out_sam = sam(pixel_values=b.pixel_values, input_boxes=b.boxes, multimask_output=False)
            iou_hq = _loss(out_hq, b.targets, 0.0, 0.0, True)[1]
            iou_sam = _loss(out_sam, b.targets, 0.0, 0.0, True)[1]
        diff = float((out_hq.pred_masks - out_sam.pred_masks).abs().max())
        print(f"| {k} | {iou_sam:.3f} | {iou_hq:.3f} | {diff:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
