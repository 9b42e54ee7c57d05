"""Codec v2 as users get it: a checkpoint written by ``birkhoff compress`` and run by
``compressor.load_model`` (LatticeLinear layers for v2, HyperLinear for the paper's
codec), against the paper's codec and round-to-nearest int6/int4 in the same run,
on all-MiniLM-L6-v2 (real trained weights).

    python benchmarks/bench_checkpoints.py                 # held-out sentences
    python benchmarks/bench_checkpoints.py --sentences design

Columns: ratio = source ``model.safetensors`` bytes / bytes of every file of the
compressed directory (shards, manifest, config, tokenizer files); bits/weight = the
shards' bytes per element; fidelity = cosine of mean-pooled sentence embeddings
of the loaded model against the original (mean and min over the sentences); load s
= ``load_model`` wall time; the RTN rows are the same tensors rounded per row (int6)
or per group of 64 (int4) and put into the float model (their ratio counts tensors
only: no file format of theirs is written).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_frontier import Fidelity, minilm_dir, rtn, run_baseline, _Method  # noqa: E402
from benchmarks.sentences import DESIGN, HELD_OUT  # noqa: E402


def _embed(model, enc) -> torch.Tensor:
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", choices=("held-out", "design"), default="held-out")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.numpy import load_file

    from compressor.checkpoint import compress, directory_bytes
    from compressor.codec_v2 import CodecV2Config
    from compressor.config import HyperCompressionConfig
    from compressor.format import read_manifest
    from compressor.modeling import load_model

    mdir = minilm_dir()
    file_bytes = os.path.getsize(mdir / "model.safetensors")
    sd = load_file(str(mdir / "model.safetensors"))
    n_all = sum(a.size for a in sd.values())
    fid = Fidelity(mdir, HELD_OUT if args.sentences == "held-out" else DESIGN)
    rows = []
    runs = [("paper codec (birkhoff compress --codec paper)", HyperCompressionConfig()),
            ("v2 faithful (birkhoff compress, the default)", CodecV2Config()),
            ("v2 small (--preset small)", CodecV2Config(preset="small")),
            ("v2 --bits 4", CodecV2Config(bits_per_weight=4.0))]
    with tempfile.TemporaryDirectory() as tmp:
        for label, cfg in runs:
            d = Path(tmp) / label.split()[0] / str(len(rows))
            ck = compress(str(mdir), cfg)
            ck.save(d)
            shards = sum(r["bytes"] for r in read_manifest(d)["shards"].values())
            t0 = time.perf_counter()
            model = load_model(d)
            load_s = time.perf_counter() - t0
            c = torch.nn.functional.cosine_similarity(_embed(model, fid.enc), fid.ref, dim=1)
            rows.append((label, file_bytes / directory_bytes(d), 8.0 * shards / n_all, ck.stats()["mae"],
                         float(c.mean()), float(c.min()), ck.compress_seconds, load_s))
            print(rows[-1], flush=True)
    for label, bits, group in (("RTN int6 per row (tensors only)", 6, None), ("RTN int4 g64 (tensors only)", 4, 64)):
        dec, nbytes, secs = run_baseline(sd, _Method(lambda a, g, b=bits: rtn(a, b, g), group))
        c_mean, c_min = fid.cosine(dec)
        err = sum(float(np.abs(dec[k].astype(np.float64) - a).sum()) for k, a in sd.items() if a.dtype.kind == "f")
        rows.append((label, file_bytes / nbytes, 8.0 * nbytes / n_all, err / n_all, c_mean, c_min, secs, float("nan")))
    print()
    print(f"all-MiniLM-L6-v2, {len(fid.ref)} {args.sentences} sentences, torch threads {torch.get_num_threads()}")
    print("| method | ratio (all files) | bits/weight (shards) | MAE | mean cosine | min cosine | codec s | load_model s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f}x | {r[2]:.3f} | {r[3]:.6f} | {r[4]:.5f} | {r[5]:.5f} | {r[6]:.2f} | "
              f"{r[7]:.2f} |")


if __name__ == "__main__":
    main()
