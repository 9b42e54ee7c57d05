"""The codec-v2 linear product on the CPU (int8 on-device form, decoded inside the
product) against torch's fp32 linear with the same decoded weight, in one run: the
bare kernel call (``codec_v2.device.linear``) and the ``LatticeLinear`` module that
``load_model`` puts in a model (what users run).

    python benchmarks/bench_lattice_linear.py                       # 768->2304, tokens 1,16,4096, 2 threads
    python benchmarks/bench_lattice_linear.py --shapes 768x2304,3072x768 --tokens 1,4096 --threads 2

Times are medians in microseconds (each case alternates torch and v2 calls, so the
two see the same machine load). The weight is SAM-init-like N(0, 0.02) with a few
outliers, compressed with ``--preset`` (default faithful). Targets (issue 12): at most
1.3x torch at 4096 tokens and 1.5x at 1 token, 768->2304, fp32, 2 threads.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.codec_v2 import CodecV2Config, encode_tensor  # noqa: E402
from compressor.codec_v2.device import linear  # noqa: E402
from compressor.codec_v2.entry import V2Entry  # noqa: E402
from compressor.hyperlinear.lattice_module import LatticeLinear  # noqa: E402


def _weight(in_f, out_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w.view(-1)[:: 9973] *= 8.0
    return w


def _paired(fa, fb, repeats):
    """Medians of ``fa`` and ``fb``, called alternately."""
    ta, tb = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        fa()
        ta.append((time.perf_counter() - t) * 1e6)
        t = time.perf_counter()
        fb()
        tb.append((time.perf_counter() - t) * 1e6)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="768x2304", help="comma list of INxOUT")
    ap.add_argument("--tokens", default="1,16,4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="faithful")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: LatticeLinear's numba-cuda kernels against torch's linear on the GPU")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="with --device cuda")
    args = ap.parse_args()
    if args.device == "cuda":
        return _cuda(args)
    torch.set_num_threads(args.threads)
    print(f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, threads {args.threads}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("| in -> out | tokens | device bits/weight | torch fp32 (us) | v2 kernel (us) | ratio | LatticeLinear (us) "
          "| ratio | path |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        in_f, out_f = (int(s) for s in shape.split("x"))
        w = _weight(in_f, out_f)
        v = encode_tensor(w, CodecV2Config(preset=args.preset), name=f"{shape}.weight")
        form = v.decode_to_device_form()
        wd = torch.from_numpy(v.decode())
        bias = torch.randn(out_f) * 0.01
        layer = LatticeLinear.from_entry(V2Entry(v.name, v, 0.0), bias)
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, in_f)
            ref = F.linear(x.double(), wd.double(), bias.double())
            y = linear(x, form, bias)  # warm-up (JIT cache load) and a check
            err = (y.double() - ref).abs().max().item()
            assert err < 1e-3 * max(1.0, ref.abs().max().item()), err
            for _ in range(2):
                F.linear(x, wd, bias)
                linear(x, form, bias)
            flops = 2 * tokens * in_f * out_f
            repeats = max(5, min(400, int(4e9 / max(flops, 1))))
            tt, tv = _paired(lambda: F.linear(x, wd, bias), lambda: linear(x, form, bias), repeats)
            with torch.no_grad():
                assert torch.equal(layer(x), linear(x, form, bias))
                tt2, tm = _paired(lambda: F.linear(x, wd, bias), lambda: layer(x), repeats)
            path = "fused" if tokens <= 32 else "decode + torch matmul"
            print(f"| {in_f} -> {out_f} | {tokens} | {form.bits_per_weight:.3f} | {tt:.0f} | {tv:.0f} | "
                  f"{tv / tt:.2f}x | {tm:.0f} | {tm / tt2:.2f}x | {path} |", flush=True)


def _cuda(args) -> None:
    """GPU: torch's linear against LatticeLinear (fused kernel up to 16 tokens, decode +
    torch matmul above), in the input dtype, timed with CUDA events after a warm-up."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {args.dtype}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("| in -> out | tokens | torch (us) | LatticeLinear (us) | ratio | max abs err vs fp64 |")
    print("|---|---|---|---|---|---|")

    def timed(fn, repeats):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)

    for shape in args.shapes.split(","):
        in_f, out_f = (int(s) for s in shape.split("x"))
        w = _weight(in_f, out_f)
        v = encode_tensor(w, CodecV2Config(preset=args.preset), name=f"{shape}.weight")
        bias = torch.randn(out_f) * 0.01
        layer = LatticeLinear.from_entry(V2Entry(v.name, v, 0.0), bias).to(dev)
        wd = torch.from_numpy(v.decode()).to(dev, dtype)
        bd = bias.to(dev, dtype)
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, in_f, device=dev, dtype=dtype)
            with torch.no_grad():
                ref = F.linear(x.double(), torch.from_numpy(v.decode()).to(dev).double(), bias.to(dev).double())
                err = (layer(x).double() - ref).abs().max().item()
                tt = timed(lambda: F.linear(x, wd, bd), 50)
                tl = timed(lambda: layer(x), 50)
            print(f"| {in_f} -> {out_f} | {tokens} | {tt:.1f} | {tl:.1f} | {tl / tt:.2f}x | {err:.3g} |", flush=True)


if __name__ == "__main__":
    main()
