"""Evaluation throughput: images per second, original against compressed SAM ViT-B.

    python benchmarks/bench_eval.py [--images 3] [--device cpu] [--out FILE]

Builds the SAM ViT-B architecture (``SamModel(SamConfig())`` after
``torch.manual_seed(0)``: no trained weights can be downloaded here), compresses
it with the paper's SAM-B setting (``U = [1600]``), and times ``SamPredictor`` on
a few synthetic images (1024 x 1024 model input): the image embedding once per
image, then every object's box prompt in one batch. One warm-up image per model
is not timed. Both models are loaded in the same process and timed
interleaved (the order swapped every image) on the same images and prompts.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _time_one(pred, image, boxes, masks, iid):
    from eval_jobs.prompts import PromptType, build_prompts

    t0 = time.perf_counter()
    st = pred.set_image(image)
    t1 = time.perf_counter()
    batch = build_prompts(iid, boxes, masks, [PromptType.BOX], 0)[PromptType.BOX]
    pred.predict(st, batch)
    if pred.device.type == "cuda":
        torch.cuda.synchronize()
    return t1 - t0, time.perf_counter() - t1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    a = ap.parse_args(argv)

    from compressor.checkpoint import compress
    from compressor.config import HyperCompressionConfig
    from eval_jobs.datasets import DatasetSpec, decode_masks, load_dataset, load_image
    from eval_jobs.models import SamPredictor, load_compressed_model, load_transformers_model
    from eval_jobs.synthetic import write_synthetic
    from eval_jobs.tiny_models import save_model

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp = Path(tmp)
        src = save_model("sam-vit-b", tmp / "sam-vit-b", seed=0)
        t0 = time.perf_counter()
        compress(str(src), HyperCompressionConfig(points=(1600,))).save(tmp / "sam-vit-b-hc")
        t_compress = time.perf_counter() - t0
        syn = write_synthetic(tmp / "data", n_images=a.images + 1, seed=0, min_size=480, max_size=640)
        ds = load_dataset(DatasetSpec.parse(syn.spec("coco")))
        items = []
        for e in ds.images:
            objs = list(e.eval_objects())
            items.append((load_image(e), np.array([o.bbox for o in objs]), decode_masks(e, objs), e.image_id))
        warm, timed = items[0], items[1:]
        preds, loads = {}, {}
        for label, loader, path in (("original", load_transformers_model, src),
                                    ("compressed", load_compressed_model, tmp / "sam-vit-b-hc")):
            t0 = time.perf_counter()
            model, proc = loader(str(path))
            loads[label] = time.perf_counter() - t0
            preds[label] = SamPredictor(model, proc, device=a.device)
            _time_one(preds[label], *warm)
        # Interleaved, order swapped every image: load from other processes hits both models alike.
        acc = {k: [0.0, 0.0] for k in preds}
        for i, it in enumerate(timed):
            for label in (("original", "compressed") if i % 2 == 0 else ("compressed", "original")):
                e, d = _time_one(preds[label], *it)
                acc[label][0] += e
                acc[label][1] += d
        rows = [(k, loads[k], acc[k][0] / len(timed), acc[k][1] / len(timed), len(timed) / sum(acc[k]))
                for k in ("original", "compressed")]
    n_obj = sum(len(it[1]) for it in timed)
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} torch threads"
    lines = [f"### SAM ViT-B evaluation throughput, {a.device} ({dev})", "",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- command: `python {' '.join(shlex.quote(x) for x in [sys.argv[0], *sys.argv[1:]])}`",
             f"- {len(timed)} timed images (+1 warm-up), {n_obj} box prompts, 1024x1024 model input; "
             f"compression took {t_compress:.1f} s",
             "", "| model | load s | embedding s/img | prompts s/img | images/s |", "|---|---|---|---|---|"]
    for label, t_load, e, d, ips in rows:
        lines.append(f"| {label} | {t_load:.2f} | {e:.3f} | {d:.3f} | {ips:.3f} |")
    ratio = rows[1][4] / rows[0][4]
    lines += ["", f"compressed / original throughput: {ratio:.3f}x", ""]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
