"""The codec's subcommands: compress, decompress, inspect, warmup.

``python -m compressor.cli`` runs them on their own; the ``birkhoff`` command
(:mod:`birkhoff.cli`) adds the layers above (``eval``) through ``main``'s
``register_more``, so the codec never imports evaluation or the workflow."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("birkhoff")


_OFF = "off"


def _number_or_off(text: str):
    if text.strip().lower() in ("off", "none"):
        return _OFF
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {text!r}") from None


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress a checkpoint (file, Hugging Face directory or Hub model)")
    p.add_argument("src", help="a .safetensors/.pt/.pth/.bin file, a model directory, or hf://org/name[@revision]")
    p.add_argument("dst", help="the compressed checkpoint directory to create")
    p.add_argument("--hub", action="store_true",
                   help="take an org/name SRC that is no local path as a Hugging Face Hub model (same as hf://)")
    p.add_argument("--codec", choices=["paper", "v2"], default="v2",
                   help="v2 (default): entropy-coded, scale-adaptive A2 lattice (format 2), smaller at equal "
                        "fidelity; paper: the paper's codec (format 1, bit-identical to earlier releases)")
    p.add_argument("--preset", choices=["faithful", "small"], default=None,
                   help="v2 only: the rate (default faithful; small trades ~0.007 cosine on MiniLM for 17%% less)")
    p.add_argument("--bits", type=float, default=None, metavar="B",
                   help="v2 only: a mean budget of B bits per weight over the coded tensors, split data-free "
                        "(equal relative error)")
    p.add_argument("--rel-error", type=float, default=None, metavar="E",
                   help="v2 only: the RMS error of each row relative to its RMS (e.g. 0.03)")
    p.add_argument("--box-size", type=float, default=None, help="box side l (default 0.1)")
    p.add_argument("--points", default=None, help="candidate U values, comma-separated (default 1225,1600)")
    p.add_argument("--max-classes", type=int, default=None, help="K_max (default 3)")
    p.add_argument("--target-mae", type=float, default=None, help="stop searching below this MAE (default 0.001)")
    p.add_argument("--fallback-mae", type=float, default=None, help="keep a tensor raw above this MAE (default 0.006)")
    p.add_argument("--relative-fallback", type=_number_or_off, default=None, metavar="FRACTION|off",
                   help="also keep a tensor raw when its MAE is above this fraction of its spread (mean |w - mean w|); "
                        "keeps near-zero and constant tensors exact (default 0.5; 'off': the paper's rules only)")
    p.add_argument("--raw", action="append", default=[], metavar="PATTERN",
                   help="keep tensors matching this glob raw (repeatable)")
    p.add_argument("--keep-nonfinite-raw", action="store_true", help="keep NaN/Inf tensors raw instead of failing")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--backend", choices=["auto", "reference", "numba-cpu", "numba-cuda"], default=None,
                   help="codec backend (overrides --device)")
    p.add_argument("--max-shard-bytes", type=int, default=None, help="largest shard (default 2 GiB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing Birkhoff checkpoint at DST (never another folder or the source)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=_cmd_compress)


_PAPER_FLAGS = {"box_size": "--box-size", "points": "--points", "max_classes": "--max-classes",
                "target_mae": "--target-mae", "fallback_mae": "--fallback-mae",
                "relative_fallback": "--relative-fallback"}
_V2_FLAGS = {"preset": "--preset", "bits": "--bits", "rel_error": "--rel-error"}


def _v2_config(args):
    from .codec_v2.config import CodecV2Config
    from .errors import ConfigError

    given = [flag for key, flag in _PAPER_FLAGS.items() if getattr(args, key) is not None]
    given += ["--raw"] if args.raw else []
    given += ["--keep-nonfinite-raw"] if args.keep_nonfinite_raw else []
    if given:
        raise ConfigError(f"{', '.join(given)}: settings of the paper's codec; with --codec v2 use --preset, "
                          "--bits or --rel-error")
    if args.bits is not None and args.rel_error is not None:
        raise ConfigError("--bits and --rel-error are two ways to set the same rate: give one")
    return CodecV2Config(preset=args.preset or "faithful", bits_per_weight=args.bits, rel_error=args.rel_error)


def _compress_config(args):
    """The codec settings the compress flags ask for (checked: ConfigError)."""
    from .config import TensorOverride, config_from_cli, parse_points
    from .errors import ConfigError

    if args.codec == "v2":
        return _v2_config(args)
    given = [flag for key, flag in _V2_FLAGS.items() if getattr(args, key) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: settings of codec v2; add --codec v2")

    cfg = config_from_cli(
        box_size=args.box_size,
        points=parse_points(args.points) if args.points is not None else None,
        max_classes=args.max_classes,
        target_mae=args.target_mae,
        fallback_mae=args.fallback_mae,
    )
    changes = {}
    if args.raw:
        changes["overrides"] = tuple(TensorOverride(p, raw=True) for p in args.raw)
    if args.keep_nonfinite_raw:
        changes["nonfinite"] = "raw"
    if args.relative_fallback is not None:
        changes["relative_fallback"] = None if args.relative_fallback == _OFF else args.relative_fallback
    return cfg.replace(**changes) if changes else cfg


def _cmd_compress(args) -> int:
    from .backends import DEVICE_TO_BACKEND, resolve_backend
    from .checkpoint import DEFAULT_MAX_SHARD_BYTES, check_destination, check_source_values, compress, directory_bytes
    from .errors import ConfigError
    from .sources import open_source

    # everything that can be refused is refused before the first tensor is encoded:
    # settings, then the source (headers, file kinds, values), then the destination
    cfg = _compress_config(args)
    shard_bytes = DEFAULT_MAX_SHARD_BYTES if args.max_shard_bytes is None else args.max_shard_bytes
    if shard_bytes <= 0:
        raise ConfigError(f"--max-shard-bytes must be a positive number of bytes, got {shard_bytes}")
    src = open_source(args.src, hub=args.hub)
    src.tensor_index()
    check_destination(args.dst, overwrite=args.overwrite, protected=src.protected_paths())
    if args.codec == "paper":
        check_source_values(src, cfg)  # v2 checks values as it codes (NaN/Inf: a typed error naming the tensor)
    backend = resolve_backend(args.backend or DEVICE_TO_BACKEND[args.device])  # loads numba: after the checks
    log.info("backend %s (%s)", backend.backend.value, backend.reason)
    ckpt = compress(src, cfg, backend=backend.kernels if args.codec == "paper" else backend.backend,
                    progress=sys.stderr.isatty() or not args.json)
    manifest = ckpt.save(args.dst, max_shard_bytes=shard_bytes, overwrite=args.overwrite, backend=backend.kernels,
                         protected=src.protected_paths())
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
        "codec": args.codec,
        # stored tensor bytes (the shards) per weight; the ratio above counts every file
        "bits_per_weight": 8.0 * sum(r["bytes"] for r in manifest["shards"].values()) / max(st["params"], 1),
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
              f"{result['bits_per_weight']:.3f} bits/weight ({args.codec}), MAE {result['mae']:.6g}, "
              f"{result['seconds']:.2f} s, "
              f"{result['compressed_tensors']} compressed / {result['raw_tensors']} raw tensors")
    return 0


def _add_decompress(sub) -> None:
    p = sub.add_parser("decompress", help="decode a compressed checkpoint into one safetensors file, "
                                          "or into a Hugging Face model directory")
    p.add_argument("dst", help="compressed checkpoint directory, or s3://bucket/prefix/ or models:/NAME@ALIAS")
    p.add_argument("out", help="output .safetensors file (its directory must exist), or a new directory: "
                               "model.safetensors with the source's config.json, tokenizer and processor "
                               "files (loads with from_pretrained)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing regular .safetensors file at OUT (never the source, a checkpoint "
                        "file, a directory or a device)")
    p.set_defaults(func=_cmd_decompress)


def _recorded_source_files(directory: Path, manifest: dict) -> list[str]:
    """The source files the manifest records, where they still exist here: a
    decompress must never write over the original."""
    src = manifest.get("source") or {}
    out = []
    uri = src.get("uri")
    if isinstance(uri, str) and uri and "://" not in uri:
        p = Path(uri).expanduser()
        out.append(str(p))
        names = src.get("weight_files")
        if isinstance(names, list) and p.is_dir():
            out.extend(str(p / n) for n in names if isinstance(n, str) and "/" not in n)
    return out


def _cmd_decompress(args) -> int:
    from safetensors.torch import save_file

    from . import destination as dest
    from . import format as fmt
    from .checkpoint import CompressedCheckpoint
    from .uris import resolve_checkpoint

    directory = resolve_checkpoint(args.dst)  # s3:// and models:/ through the verified cache
    manifest = fmt.read_manifest(directory)  # validated and capped: cheap, before any decoding
    checkpoint_files = [str(directory / n) for n in
                        [fmt.MANIFEST_NAME, *manifest["shards"], *manifest["extra_files"]]]
    guard = dict(protected_dirs=[str(directory)],
                 protected_files=checkpoint_files + _recorded_source_files(directory, manifest))
    if Path(args.out).suffix != ".safetensors" and (os.path.isdir(args.out) or not os.path.lexists(args.out)):
        from .hf_files import write_original_layout

        if args.overwrite:
            raise dest.DestinationError("--overwrite replaces a .safetensors file only; a model directory "
                                        "output is never replaced", file=str(args.out))
        out = write_original_layout(directory, args.out,
                                    protected=[str(directory), *guard["protected_files"]])
        print(f"wrote {out} (model.safetensors and the source's config, tokenizer and processor files)")
        return 0
    dest.check_output_file(args.out, overwrite=args.overwrite, **guard)
    ckpt = CompressedCheckpoint.load(directory)
    sd = {k: v.contiguous() for k, v in ckpt.state_dict().items()}
    out = dest.publish_file(lambda tmp: save_file(sd, tmp, metadata={"producer": "birkhoff decompress"}),
                            args.out, overwrite=args.overwrite, **guard)
    print(f"wrote {len(sd)} tensors to {out}")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="per-tensor table of a compressed checkpoint")
    p.add_argument("dst", help="compressed checkpoint directory, or s3://bucket/prefix/ or models:/NAME@ALIAS")
    p.add_argument("--json", action="store_true")
    p.add_argument("--parquet", default=None, metavar="FILE", help="write the table as Parquet")
    p.add_argument("--overwrite", action="store_true", help="replace an existing Parquet FILE")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    from . import destination as dest
    from .format import read_manifest
    from .report import manifest_rows, write_parquet
    from .uris import resolve_checkpoint

    directory = resolve_checkpoint(args.dst)  # s3:// and models:/ through the verified cache
    manifest = read_manifest(directory)
    rows = manifest_rows(manifest)
    if args.parquet:
        guard = dict(protected_dirs=[str(directory)])
        dest.check_output_file(args.parquet, overwrite=args.overwrite, **guard)
        dest.publish_file(lambda tmp: write_parquet(rows, tmp, atomic=False), args.parquet,
                          overwrite=args.overwrite, **guard)
    if args.json:
        print(json.dumps(rows))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # names, paths and reasons come from files: plain Text, never parsed as rich markup
    table = Table(title=Text(f"{args.dst} ({len(rows)} tensors)"))
    for col in ("name", "shape", "dtype", "codec", "U", "K", "bits", "bits/weight", "MAE", "raw"):
        table.add_column(col)
    for r in rows:
        cells = (r["name"], "x".join(map(str, r["shape"])), r["dtype"], r["codec"] or "-", str(r["U"] or "-"),
                 str(r["K"] if r["K"] is not None else "-"), str(r["bits"] or "-"), f"{r['bits_per_weight']:.3g}",
                 f"{r['mae']:.3g}", r["raw_reason"] or ("" if not r["raw"] else "yes"))
        table.add_row(*(Text(str(c)) for c in cells))
    Console().print(table)
    return 0


def _add_warmup(sub) -> None:
    p = sub.add_parser("warmup", help="compile every Numba kernel into the per-machine cache (image build, node start)")
    p.add_argument("--cuda", choices=["auto", "yes", "no"], default="auto",
                   help="also the CUDA codec kernels: when a GPU is usable (auto), required (yes), or not (no)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=_cmd_warmup)


def _cmd_warmup(args) -> int:
    from .backends import warm_up

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


def build_parser(register_more=()) -> argparse.ArgumentParser:
    """The codec's subcommands, then each of ``register_more`` (a function that adds
    its subcommands to the subparsers)."""
    parser = argparse.ArgumentParser(prog="birkhoff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compress(sub)
    _add_decompress(sub)
    _add_inspect(sub)
    _add_warmup(sub)
    for register in register_more:
        register(sub)
    return parser


class _Interrupt:
    """SIGINT handler that remembers it fired. A Ctrl-C that lands inside a native
    reader (safetensors calls back into torch) can surface as that reader's own error,
    which the source layer wraps as SourceError; the flag lets main still exit 130."""

    fired = False

    def __call__(self, signum, frame):
        type(self).fired = True
        raise KeyboardInterrupt


def _interrupted(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return _Interrupt.fired


def main(argv: list[str] | None = None, *, register_more=()) -> int:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _Interrupt())
    parser = build_parser(register_more)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .errors import BirkhoffError

    t0 = time.perf_counter()
    try:
        return int(args.func(args) or 0)
    except BirkhoffError as exc:
        log.debug("failed after %.2f s", time.perf_counter() - t0, exc_info=True)
        if _interrupted(exc):
            print(f"birkhoff {args.command}: interrupted", file=sys.stderr)
            return 130
        print(f"birkhoff {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system said no somewhere we did not foresee: still name the file
        log.debug("failed after %.2f s", time.perf_counter() - t0, exc_info=True)
        if _interrupted(exc):
            print(f"birkhoff {args.command}: interrupted", file=sys.stderr)
            return 130
        where = ", ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        print(f"birkhoff {args.command}: error: {type(exc).__name__}: {exc.strerror or exc}"
              + (f" (file {where})" if where else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"birkhoff {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
