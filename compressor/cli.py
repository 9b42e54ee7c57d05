"""The ``birkhoff`` command: compress, decompress, inspect, warmup (and eval, when installed)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("birkhoff")


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress a checkpoint (file, Hugging Face directory or Hub id)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--box-size", type=float, default=None, help="box side l (default 0.1)")
    p.add_argument("--points", default=None, help="candidate U values, comma-separated (default 1225,1600)")
    p.add_argument("--max-classes", type=int, default=None, help="K_max (default 3)")
    p.add_argument("--target-mae", type=float, default=None, help="stop searching below this MAE (default 0.001)")
    p.add_argument("--fallback-mae", type=float, default=None, help="keep a tensor raw above this MAE (default 0.006)")
    p.add_argument("--raw", action="append", default=[], metavar="PATTERN",
                   help="keep tensors matching this glob raw (repeatable)")
    p.add_argument("--keep-nonfinite-raw", action="store_true", help="keep NaN/Inf tensors raw instead of failing")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--backend", choices=["auto", "reference", "numba-cpu", "numba-cuda"], default=None,
                   help="codec backend (overrides --device)")
    p.add_argument("--max-shard-bytes", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at DST")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=_cmd_compress)


def _cmd_compress(args) -> int:
    from .backends import DEVICE_TO_BACKEND, resolve_backend
    from .checkpoint import DEFAULT_MAX_SHARD_BYTES, compress, directory_bytes
    from .config import TensorOverride, config_from_cli, parse_points
    from .sources import open_source

    cfg = config_from_cli(
        box_size=args.box_size,
        points=parse_points(args.points) if args.points else None,
        max_classes=args.max_classes,
        target_mae=args.target_mae,
        fallback_mae=args.fallback_mae,
    )
    changes = {}
    if args.raw:
        changes["overrides"] = tuple(TensorOverride(p, raw=True) for p in args.raw)
    if args.keep_nonfinite_raw:
        changes["nonfinite"] = "raw"
    if changes:
        cfg = cfg.replace(**changes)
    backend = resolve_backend(args.backend or DEVICE_TO_BACKEND[args.device])
    log.info("backend %s (%s)", backend.backend.value, backend.reason)
    src = open_source(args.src)
    ckpt = compress(src, cfg, backend=backend.kernels, progress=sys.stderr.isatty() or not args.json)
    ckpt.save(args.dst, max_shard_bytes=args.max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
              overwrite=args.overwrite, backend=backend.kernels)
    st = ckpt.stats()
    original = src.weight_bytes
    compressed = directory_bytes(args.dst)
    result = {
        "src": str(args.src),
        "dst": str(args.dst),
        "backend": backend.backend.value,
        "original_bytes": original,
        "compressed_bytes": compressed,
        "ratio": original / compressed if compressed else None,
        "mae": st["mae"],
        "seconds": ckpt.compress_seconds,
        "tensors": st["tensors"],
        "compressed_tensors": st["compressed_tensors"],
        "raw_tensors": st["raw_tensors"],
        "params": st["params"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.src} -> {args.dst}: {result['ratio']:.3f}x ({original:,} -> {compressed:,} bytes), "
              f"MAE {result['mae']:.6g}, {result['seconds']:.2f} s, "
              f"{result['compressed_tensors']} compressed / {result['raw_tensors']} raw tensors")
    return 0


def _add_decompress(sub) -> None:
    p = sub.add_parser("decompress", help="decode a compressed checkpoint into one safetensors file")
    p.add_argument("dst", help="compressed checkpoint directory")
    p.add_argument("out", help="output .safetensors file")
    p.set_defaults(func=_cmd_decompress)


def _cmd_decompress(args) -> int:
    import os

    from safetensors.torch import save_file

    from .checkpoint import CompressedCheckpoint

    ckpt = CompressedCheckpoint.load(args.dst)
    sd = {k: v.contiguous() for k, v in ckpt.state_dict().items()}
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(sd, str(tmp), metadata={"producer": "birkhoff decompress"})
    os.replace(tmp, out)
    print(f"wrote {len(sd)} tensors to {out}")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="per-tensor table of a compressed checkpoint")
    p.add_argument("dst")
    p.add_argument("--json", action="store_true")
    p.add_argument("--parquet", default=None, metavar="FILE", help="write the table as Parquet")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    from .format import read_manifest
    from .report import manifest_rows, write_parquet

    manifest = read_manifest(Path(args.dst))
    rows = manifest_rows(manifest)
    if args.parquet:
        write_parquet(rows, args.parquet)
    if args.json:
        print(json.dumps(rows))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.dst} ({len(rows)} tensors)")
    for col in ("name", "shape", "dtype", "U", "K", "bits", "MAE", "raw"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], "x".join(map(str, r["shape"])), r["dtype"], str(r["U"] or "-"),
                      str(r["K"] if r["K"] is not None else "-"), str(r["bits"] or "-"),
                      f"{r['mae']:.3g}", r["raw_reason"] or ("" if not r["raw"] else "yes"))
    Console().print(table)
    return 0


def _add_warmup(sub) -> None:
    p = sub.add_parser("warmup", help="compile every Numba kernel into the per-machine cache (image build, node start)")
    p.add_argument("--cuda", choices=["auto", "yes", "no"], default="auto",
                   help="also the CUDA codec kernels: when a GPU is usable (auto), required (yes), or not (no)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=_cmd_warmup)


def _cmd_warmup(args) -> int:
    from numba_kernels.warmup import warm_up

    try:
        res = warm_up(cuda={"auto": None, "yes": True, "no": False}[args.cuda])
    except RuntimeError as exc:  # --cuda yes without a usable GPU
        print(f"birkhoff warmup: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['signatures']} kernel signatures ready in {res['seconds']:.1f} s: {res['compiled']} compiled, "
              f"{res['loaded_from_cache']} loaded from {res['cache_dir']} (CUDA: {res['cuda']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="birkhoff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compress(sub)
    _add_decompress(sub)
    _add_inspect(sub)
    _add_warmup(sub)
    try:  # evaluation lives in eval_jobs (it needs Ray and MLflow); optional here
        from eval_jobs.cli import register
    except ImportError as exc:
        log.debug("eval subcommand unavailable: %s", exc)
    else:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .errors import BirkhoffError

    t0 = time.perf_counter()
    try:
        return int(args.func(args) or 0)
    except BirkhoffError as exc:
        log.debug("failed after %.2f s", time.perf_counter() - t0, exc_info=True)
        print(f"birkhoff {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
