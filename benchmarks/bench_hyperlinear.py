"""HyperLinear speed against torch's linear (same dtype) and dequantize()+matmul.

    python benchmarks/bench_hyperlinear.py --device cpu --dtype fp32 --threads 2
    python benchmarks/bench_hyperlinear.py --device cuda --dtype bf16
    python benchmarks/bench_hyperlinear.py --device cuda --dtype bf16 --encoder   # SAM ViT-B image encoder
    python benchmarks/bench_hyperlinear.py --device cuda --dtype bf16 --tokens 1,16 --pipelined --graphs

Prints markdown tables (times in microseconds, medians) with the device and date,
ready for docs/BENCHMARKS.md (HyperLinear section). Weights are SAM-init-like N(0, 0.02) with
a few outliers, compressed with the default config.

On a GPU the main columns are per-call latency (CUDA events around one call, then
a sync: host launch cost included, as a single layer call sees it). ``--pipelined``
adds the time per call of 50 calls issued back to back (what a model's layers see
when the host keeps ahead of the GPU; where it is far below the latency, the call
is host-bound), ``--graphs`` the time per replay of the call captured in a CUDA
graph (no host launch cost at all; a failed capture is reported, not fatal).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.codec import compress_tensor  # noqa: E402
from compressor.hyperlinear import HyperLinear  # noqa: E402

SAM_SHAPES = [(768, 2304), (768, 3072), (3072, 768), (1280, 3840), (1280, 5120), (5120, 1280)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _timer(device):
    if device.type == "cuda":
        def run(fn, repeats):
            times = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) * 1e3)
            return statistics.median(times)
    else:
        def run(fn, repeats):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e6)
            return statistics.median(times)
    return run


def _pipelined(device, fn, calls=50):
    """Time per call of ``calls`` calls issued back to back, one sync at the end."""
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t) * 1e6 / calls


def _graphed(device, fn, replays=50):
    """Time per replay of ``fn`` captured in a CUDA graph, or the capture's error."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up on the capture stream (caches, workspaces)
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        return _pipelined(device, graph.replay, replays)
    except Exception as exc:  # report, keep benchmarking the rest
        return f"capture failed: {type(exc).__name__}: {exc}"


def _weight(in_f, out_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w.view(-1)[:: 9973] *= 8.0  # a few outliers
    return w


def _repeats(tokens, in_f, out_f, device):
    flops = 2 * tokens * in_f * out_f
    if device.type == "cuda":
        return 50
    return max(3, min(50, int(2e10 / max(flops, 1))))


def bench_layers(device, dtype, tokens_list, shapes, pipelined=False, graphs=False):
    run = _timer(device)
    rows = []
    for in_f, out_f in shapes:
        w = _weight(in_f, out_f)
        entry = compress_tensor(f"{in_f}x{out_f}.weight", w)
        bias = torch.randn(out_f) * 0.01
        hl = HyperLinear.from_compressed(entry, bias, device=device)
        wd = hl.dequantize(dtype)  # the same decoded weight, for torch's own linear
        bd = bias.to(device, dtype)
        for tokens in tokens_list:
            x = torch.randn(tokens, in_f, device=device).to(dtype)
            reps = _repeats(tokens, in_f, out_f, device)
            with torch.inference_mode():
                fns = {
                    "torch": lambda: F.linear(x, wd, bd),
                    "hyper": lambda: hl(x),
                    "deq": lambda: F.linear(x, hl.dequantize(dtype), bd),
                }
                res = {}
                for name, fn in fns.items():
                    fn()  # warm-up: compile, workspace, cuBLAS heuristics
                    res[name] = run(fn, reps)
                    if device.type == "cuda" and pipelined and name != "deq":
                        res[name + "_pipe"] = _pipelined(device, fn)
                    if device.type == "cuda" and graphs and name != "deq":
                        res[name + "_graph"] = _graphed(device, fn)
            rows.append((in_f, out_f, tokens, res))
            print(f"  {in_f}->{out_f} T={tokens}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in res.items()),
                  file=sys.stderr, flush=True)
    return rows


def _fmt(v):
    return f"{v:.0f}us" if isinstance(v, float) else str(v)


def _cell(v):
    return f"{v:.1f}" if isinstance(v, float) else "failed"


def _ratio(a, b):
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "-"


def bench_encoder(device, dtype, repeats):
    from transformers import SamConfig, SamModel

    from compressor.checkpoint import compress
    from compressor.modeling import apply_hyperlinear

    torch.manual_seed(0)
    enc = SamModel(SamConfig()).vision_encoder.eval()
    t = time.perf_counter()
    ck = compress(enc)
    secs = time.perf_counter() - t
    henc = copy.deepcopy(enc)
    n = len(apply_hyperlinear(henc, ck, device=device))
    enc = enc.to(device, dtype)
    henc = henc.to(device, dtype)
    x = torch.randn(1, 3, 1024, 1024, device=device, dtype=dtype)
    run = _timer(device)
    res = {}
    with torch.inference_mode():
        for name, m in (("original", enc), ("hyper", henc)):
            m(x)
            res[name] = run(lambda: m(x), repeats)
    return n, secs, res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--tokens", default="1,16,4096,16384")
    ap.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in SAM_SHAPES), help="in x out, comma-separated")
    ap.add_argument("--threads", type=int, default=None, help="torch and numba CPU threads")
    ap.add_argument("--encoder", action="store_true", help="SAM ViT-B image encoder end to end (1024x1024)")
    ap.add_argument("--encoder-only", action="store_true")
    ap.add_argument("--encoder-repeats", type=int, default=3)
    ap.add_argument("--pipelined", action="store_true", help="CUDA: also time 50 calls issued back to back")
    ap.add_argument("--graphs", action="store_true", help="CUDA: also time CUDA-graph replays of each call")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
        import numba

        numba.set_num_threads(args.threads)
        from numba_kernels import threads

        threads.set_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"### HyperLinear, {dev_name}, {args.dtype}, {datetime.date.today().isoformat()}, torch {torch.__version__}\n")
    if not args.encoder_only:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        tokens = [int(t) for t in args.tokens.split(",")]
        rows = bench_layers(device, dtype, tokens, shapes, args.pipelined, args.graphs)
        print("| in -> out | tokens | torch linear (us) | HyperLinear (us) | ratio | dequantize()+matmul (us) | ratio |")
        print("|---|---|---|---|---|---|---|")
        for in_f, out_f, t, r in rows:
            line = (f"| {in_f} -> {out_f} | {t} | {r['torch']:.0f} | {r['hyper']:.0f} | {r['hyper'] / r['torch']:.2f}x "
                    f"| {r['deq']:.0f} | {r['deq'] / r['torch']:.2f}x |")
            print(line)
        for key, title in (("_pipe", "50 calls back to back, time per call"), ("_graph", "CUDA graph replay")):
            if any("torch" + key in r for *_, r in rows):
                print(f"\n{title} (us):\n\n| in -> out | tokens | torch linear | HyperLinear | ratio |\n|---|---|---|---|---|")
                for in_f, out_f, t, r in rows:
                    a, b = r["torch" + key], r["hyper" + key]
                    print(f"| {in_f} -> {out_f} | {t} | {_cell(a)} | {_cell(b)} | {_ratio(b, a)} |")
                    for v in (a, b):
                        if not isinstance(v, float):
                            print(f"<!-- {v} -->")
    if args.encoder or args.encoder_only:
        n, secs, res = bench_encoder(device, dtype, args.encoder_repeats)
        print(f"\nSAM ViT-B image encoder, 1x3x1024x1024, {args.dtype}: {n} linears replaced "
              f"(compressed in {secs:.1f} s)\n")
        print("| model | time (ms) | ratio |\n|---|---|---|")
        print(f"| original | {res['original'] / 1e3:.1f} | 1.00x |")
        print(f"| HyperLinear | {res['hyper'] / 1e3:.1f} | {res['hyper'] / res['original']:.2f}x |")


if __name__ == "__main__":
    main()
