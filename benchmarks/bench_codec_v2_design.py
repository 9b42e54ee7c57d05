"""The measurements behind codec v2's design choices, on all-MiniLM-L6-v2 (real
weights) and the DESIGN sentences (benchmarks/sentences.py), in one run:

    python benchmarks/bench_codec_v2_design.py                  # every part
    python benchmarks/bench_codec_v2_design.py --parts lattice,coder

* ``lattice``: the paper's sheared trajectory lattice (made unbounded), the square
  grid and the hexagonal A2 lattice at the same point density: ideal bits per weight
  (entropy of the two coordinates, coded apart as the codec does, and jointly) and
  SNR, on three weight tensors scaled by their row RMS.
* ``scale``: how the step follows the weights (whole model, A2, equal relative step):
  step per row proportional to the row's RMS (gamma 1), one step per tensor (gamma 0),
  in between (0.5), with a per-row offset, per group of 64/128 of a row, and a robust
  scale (mean absolute deviation) instead of the RMS. Model cosine against ideal bits.
* ``alloc``: the allocation rule across tensors: equal relative step for all, vs equal
  absolute error for all (reverse water-filling on the weights' MSE), vs embedding
  tables at 2, 3, 4 times the step.
* ``coder``: real coded size of the codec's coordinates with constriction's ANS and
  the stored model, against their ideal entropy and against zstd (levels 3 and 19,
  int8 bytes of the same coordinates), plus encode/decode speed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_frontier import Fidelity, minilm_dir  # noqa: E402
from benchmarks.sentences import DESIGN  # noqa: E402
from compressor.codec_v2 import lattice  # noqa: E402

TENSORS = ("encoder.layer.0.intermediate.dense.weight", "encoder.layer.3.attention.self.query.weight",
           "embeddings.word_embeddings.weight")


def entropy_bits(v: np.ndarray) -> float:
    c = np.bincount((v - v.min()).ravel())
    c = c[c > 0]
    return float(-(c * np.log2(c / c.sum())).sum())


def part_lattice(sd) -> None:
    print("\n## lattice: same point density, per-row RMS scaling; bits/weight (apart | joint), SNR dB")
    print("| tensor | step | sheared (paper) | square | A2 (hexagonal) | A2 gain dB |")
    print("|---|---|---|---|---|---|")
    for name in TENSORS:
        w = sd[name].astype(np.float64)
        u = w / np.sqrt((w ** 2).mean(axis=1, keepdims=True))
        x, y = lattice.pairs_of(u)
        x, y = x.ravel(), y.ravel()
        for q in (0.15, 0.3, 0.6):
            cells = []
            snrs = {}
            for lat in ("sheared", "square", "a2"):
                if lat == "a2":
                    d = q * math.sqrt(2 / math.sqrt(3))  # same cell area as the square grid of step q
                    m, b = lattice.a2_nearest(x / d, y / d)
                    px, py = lattice.a2_point(m, b)
                    px, py = px * d, py * d
                elif lat == "square":
                    m, b, px, py = lattice.z2_nearest(x / q, y / q)
                    px, py = px * q, py * q
                else:
                    m, b, px, py = lattice.sheared_nearest(x / q, y / q, k=40)
                    px, py = px * q, py * q
                mse = (((x - px) ** 2).mean() + ((y - py) ** 2).mean()) / 2
                apart = (entropy_bits(m) + entropy_bits(b)) / (2 * x.size)
                joint = entropy_bits((m - m.min()) * (int(b.max() - b.min()) + 1) + (b - b.min())) / (2 * x.size)
                snrs[lat] = 10 * math.log10(1 / mse)
                cells.append(f"{apart:.3f} / {joint:.3f} b, {snrs[lat]:.2f} dB")
            print(f"| {name.replace('.weight', '')} | {q} | {' | '.join(cells)} | "
                  f"{snrs['a2'] - snrs['square']:+.3f} |")


def quantize_model(sd, rule) -> tuple[dict, float]:
    """Quantize every 2-D float tensor by ``rule(name, w) -> decoded, bits``; returns
    the weights and bits per weight over all elements (raw tensors at their size)."""
    out, bits, n = {}, 0.0, 0
    for k, a in sd.items():
        n += a.size
        if a.dtype.kind == "f" and a.ndim == 2:
            out[k], b = rule(k, a)
            bits += b
        else:
            bits += 8 * a.nbytes
    return out, bits / n


def a2_rows(w: np.ndarray, q: float, gamma: float = 1.0, offset: bool = False, kind: str = "rms",
            abs_step: float | None = None) -> tuple[np.ndarray, float]:
    w = w.astype(np.float64)
    mu = w.mean(axis=1, keepdims=True) if offset else 0.0
    c = w - mu
    if kind == "rms":
        s = np.sqrt((c ** 2).mean(axis=1, keepdims=True))
    else:  # mean absolute deviation, scaled to the RMS of a Gaussian
        s = np.abs(c).mean(axis=1, keepdims=True) * math.sqrt(math.pi / 2)
    s = np.maximum(s, 1e-12)
    st = np.sqrt((s ** 2).mean())
    step = abs_step * np.ones_like(s) if abs_step else q * s ** gamma * st ** (1 - gamma)
    step = step.astype(np.float16).astype(np.float64)
    m, b = lattice.encode_rows(c, step[:, 0])
    dec = lattice.decode_rows(m, b, step[:, 0], w.shape[1]) + mu
    bits = entropy_bits(m) + entropy_bits(b) + 16 * w.shape[0] * (2 if offset else 1)
    return dec.astype(np.float32), bits


def grouped(w, q, g):
    r, c = w.shape
    if c % g:
        return a2_rows(w, q)
    dec, bits = a2_rows(w.reshape(-1, g), q)
    return dec.reshape(r, c), bits


def part_scale(sd, fid) -> None:
    print("\n## scale rule (whole model, A2, equal relative step q; embeddings x3)")
    print("| rule | q | bits/weight | ratio | mean cosine | min cosine |")
    print("|---|---|---|---|---|---|")
    fb = os.path.getsize(minilm_dir() / "model.safetensors")
    rules = {
        "per row, step ~ row RMS (gamma 1)": lambda q: lambda n, w: a2_rows(w, q * _f(n)),
        "one step per tensor (gamma 0)": lambda q: lambda n, w: a2_rows(w, q * _f(n), gamma=0.0),
        "gamma 0.5": lambda q: lambda n, w: a2_rows(w, q * _f(n), gamma=0.5),
        "per row + row offset": lambda q: lambda n, w: a2_rows(w, q * _f(n), offset=True),
        "per row, mean-abs-deviation scale": lambda q: lambda n, w: a2_rows(w, q * _f(n), kind="mad"),
        "per group of 128": lambda q: lambda n, w: grouped(w, q * _f(n), 128),
        "per group of 64": lambda q: lambda n, w: grouped(w, q * _f(n), 64),
    }
    for label, make in rules.items():
        for q in (0.12, 0.19):
            dec, bpw = quantize_model(sd, make(q))
            cm, cn = fid.cosine(dec)
            print(f"| {label} | {q} | {bpw:.3f} | {8 * fb / (bpw * _n(sd)):.2f}x | {cm:.5f} | {cn:.5f} |", flush=True)


def _f(name: str, factor: float = 3.0) -> float:
    return factor if "embeddings" in name else 1.0


def _n(sd) -> int:
    return sum(a.size for a in sd.values())


def part_alloc(sd, fid) -> None:
    print("\n## allocation across tensors (whole model, A2, per-row RMS step)")
    print("| rule | q | bits/weight | ratio | mean cosine | min cosine |")
    print("|---|---|---|---|---|---|")
    fb = os.path.getsize(minilm_dir() / "model.safetensors")
    rms_all = math.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in sd.values()
                            if a.dtype.kind == "f" and a.ndim == 2)
                        / sum(a.size for a in sd.values() if a.dtype.kind == "f" and a.ndim == 2))
    cases = [("equal absolute step (reverse water-filling on MSE)", q,
              lambda q: lambda n, w: a2_rows(w, 0, abs_step=q * rms_all)) for q in (0.12, 0.19)]
    for factor in (1, 2, 3, 4):
        cases += [(f"equal relative step, embeddings x{factor}", q,
                   (lambda f: lambda q: lambda n, w: a2_rows(w, q * _f(n, f)))(factor)) for q in (0.12, 0.19)]
    for label, q, make in cases:
        dec, bpw = quantize_model(sd, make(q))
        cm, cn = fid.cosine(dec)
        print(f"| {label} | {q} | {bpw:.3f} | {8 * fb / (bpw * _n(sd)):.2f}x | {cm:.5f} | {cn:.5f} |", flush=True)


def part_coder(sd) -> None:
    import zstandard

    from compressor.codec_v2 import CodecV2Config, encode_tensor
    from compressor.codec_v2.kernels import resolve

    k = resolve("numba-cpu")
    cfg = CodecV2Config()
    encode_tensor(sd["pooler.dense.weight"], cfg, name="warm", kernels=k)
    print("\n## entropy coder on the codec's coordinates (faithful preset), bits per weight")
    print("| tensor | ideal entropy | ANS (constriction, stored model, blocks) | zstd-3 | zstd-19 | ANS enc MB/s | ANS dec MB/s |")
    print("|---|---|---|---|---|---|---|")
    tot = {"ideal": 0.0, "ans": 0.0, "z3": 0.0, "z19": 0.0, "n": 0}
    names = [n for n, a in sd.items() if a.dtype.kind == "f" and a.ndim == 2 and a.size >= 1024]
    for name in names:
        w = sd[name]
        t = time.perf_counter()
        v = encode_tensor(w, cfg, name=name, kernels=k)
        te = time.perf_counter() - t
        t = time.perf_counter()
        m, b = v.coords()
        td = time.perf_counter() - t
        ideal = entropy_bits(m) + entropy_bits(b)
        ans = 32.0 * v.payload.size
        inter = np.stack([np.clip(m, -128, 127), np.clip(b, -128, 127)], -1).astype(np.int8).tobytes()
        z3 = 8.0 * len(zstandard.ZstdCompressor(level=3).compress(inter))
        z19 = 8.0 * len(zstandard.ZstdCompressor(level=19).compress(inter))
        for key, val in (("ideal", ideal), ("ans", ans), ("z3", z3), ("z19", z19)):
            tot[key] += val
        tot["n"] += w.size
        if name in TENSORS or name == names[-1]:
            print(f"| {name.replace('.weight', '')} | {ideal / w.size:.4f} | {ans / w.size:.4f} | {z3 / w.size:.4f} | "
                  f"{z19 / w.size:.4f} | {w.nbytes / te / 1e6:.0f} (whole encode) | {w.nbytes / td / 1e6:.0f} |",
                  flush=True)
    n = tot["n"]
    print(f"| **all {len(names)} coded tensors** | {tot['ideal'] / n:.4f} | {tot['ans'] / n:.4f} | {tot['z3'] / n:.4f} "
          f"| {tot['z19'] / n:.4f} | | |")
    print("(zstd is given int8 bytes of coordinates clipped to int8, i.e. without any escape cost: a lower bound "
          "for it; ANS includes the escape symbols but not the escape list, the model or the header.)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="lattice,scale,alloc,coder")
    args = ap.parse_args()
    from safetensors.numpy import load_file

    sd = load_file(str(minilm_dir() / "model.safetensors"))
    parts = args.parts.split(",")
    fid = Fidelity(minilm_dir(), DESIGN) if {"scale", "alloc"} & set(parts) else None
    if "lattice" in parts:
        part_lattice(sd)
    if "scale" in parts:
        part_scale(sd, fid)
    if "alloc" in parts:
        part_alloc(sd, fid)
    if "coder" in parts:
        part_coder(sd)


if __name__ == "__main__":
    main()
