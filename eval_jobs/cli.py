"""``birkhoff eval``: evaluate a compressed model against its original.

    birkhoff eval COMPRESSED_DIR [--original SOURCE] --dataset FORMAT:ANNOTATIONS:IMAGES [--dataset ...]
                  [--prompts box,mask_center,...] [--limit N] [--seed S] [--json] [--paper-table DIR]

With ``--json`` the last line of stdout is one JSON object holding every metric.
``--paper-table DIR`` writes the paper's table (prompt types down, datasets
across, original / compressed / drop) as ``paper_table.md`` and
``paper_table.csv``; an MLflow run always gets both. When the original's
weights are a random init (``birkhoff_weights.json``), the output says so: its
mIoU, mAP and fidelity are noise.
The top-level ``birkhoff`` CLI (:mod:`birkhoff.cli`) calls ``register`` with the
workflow's source resolver; ``python -m eval_jobs`` runs it on its own (a recorded
workflow source then needs ``--original``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger(__name__)


def register(subparsers, resolve_source=None) -> argparse.ArgumentParser:
    """Add ``eval``; ``resolve_source`` turns a recorded workflow source (``package:``,
    ``demo:``, ``s3://``) into a local path (see :func:`eval_jobs.models.recorded_source`)."""
    p = subparsers.add_parser("eval", help="evaluate a compressed model against its original (mIoU, mAP, fidelity)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compressed", metavar="COMPRESSED_DIR",
                   help="compressed checkpoint directory, s3://bucket/prefix/ of a committed checkpoint, or "
                        "models:/NAME@ALIAS (or any SAM-family transformers directory)")
    p.add_argument("--original", metavar="SOURCE",
                   help="the uncompressed model (default: the source recorded in COMPRESSED_DIR's manifest)")
    p.add_argument("--dataset", action="append", required=True, metavar="[NAME=]FORMAT:ANNOTATIONS:IMAGES[:DETS]",
                   help="FORMAT is coco, lvis or sa1b; DETS a detector's COCO results file (coco only: box "
                        "prompts of the mAP run); repeat for several datasets")
    p.add_argument("--prompts", default="all",
                   help="comma-separated: box, box_center, mask_center, mask_rand1, mask_rand2 (default all)")
    p.add_argument("--limit", type=int, help="a seeded subset of N images per dataset")
    p.add_argument("--seed", type=int, default=0, help="subset and random-point seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    p.add_argument("--executor", choices=("local", "ray"),
                   help="local: this process; ray: one Ray task per dataset subset (default: ray when "
                        "--ray-address or RAY_ADDRESS is set, else local)")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster to fan out to")
    p.add_argument("--shards", type=int, help="shards per dataset (default: 1 locally, the cluster's CPUs on Ray)")
    p.add_argument("--device", default="cpu", help="torch device for the models (default cpu)")
    p.add_argument("--max-prompts", type=int, default=64, help="prompts per forward pass (default 64)")
    p.add_argument("--artifacts", metavar="DIR",
                   help="also write results.json, the paper's table, the mIoU chart and overlays here")
    p.add_argument("--paper-table", metavar="DIR",
                   help="write the paper's table (paper_table.md, paper_table.csv) here; '-' prints the Markdown")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="log to this MLflow tracking URI (default $MLFLOW_TRACKING_URI; not logged when unset)")
    p.add_argument("--parent-run-id", help="nest the MLflow run under this run (the model's compression run)")
    p.add_argument("--experiment", help="MLflow experiment when there is no parent run (default birkhoff-eval)")
    p.set_defaults(func=run_cli, resolve_source=resolve_source)
    return p


def run_cli(args: argparse.Namespace) -> int:
    from .datasets import DatasetSpec, unique_names
    from .runner import EvalConfig, model_under_test, run_eval

    specs = unique_names([DatasetSpec.parse(d) for d in args.dataset])
    cfg = EvalConfig(prompts=args.prompts, limit=args.limit, seed=args.seed, shards=args.shards,
                     device=args.device, max_prompts=args.max_prompts)
    model = model_under_test(args.compressed, specs, original=args.original,
                             resolve_source=getattr(args, "resolve_source", None))
    executor = args.executor or ("ray" if args.ray_address else "local")
    results = run_eval([model], cfg, executor=executor, ray_address=args.ray_address)[0]
    if not results.fidelity_meaningful:
        from .provenance import RANDOM_INIT_NOTE

        print(f"birkhoff eval: WARNING: {results.original} has {RANDOM_INIT_NOTE}", file=sys.stderr)
    if args.paper_table == "-":
        from .paper_table import to_markdown

        # with --json, stdout's last line belongs to the JSON object
        (sys.stderr if args.json else sys.stdout).write(to_markdown(results))
    elif args.paper_table:
        from .paper_table import write_paper_table

        write_paper_table(results, args.paper_table)
    if args.artifacts:
        from .reporting import write_artifacts

        write_artifacts(results, args.artifacts)
    if args.mlflow_uri or args.parent_run_id:
        from .reporting import log_eval_to_mlflow

        rid = log_eval_to_mlflow(results, args.parent_run_id, tracking_uri=args.mlflow_uri,
                                 experiment=args.experiment)
        log.info("MLflow run %s", rid)
    if args.json:
        sys.stdout.write(json.dumps(results.to_json_dict(), sort_keys=True) + "\n")
    else:
        _print_table(results)
    return 0


def _print_table(results) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"{results.model}: compressed vs original"
    if not results.fidelity_meaningful:
        title += " [RANDOM-INIT WEIGHTS: figures not meaningful]"
    t = Table(title=title)
    for col in ("dataset/prompt", "n", "mIoU orig", "mIoU comp", "drop", "fidelity"):
        t.add_column(col, justify="right" if col != "dataset/prompt" else "left")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for key, n in results.counts.items():
        m = results.metrics
        t.add_row(key, str(n), fmt(m.get(f"miou_original/{key}")), fmt(m.get(f"miou/{key}")),
                  fmt(m.get(f"miou_drop/{key}")), fmt(m.get(f"fidelity_miou/{key}")))
    console = Console()
    console.print(t)
    m = results.metrics
    for d in results.datasets:
        n = d["name"]
        if f"map/{n}" in m:
            kind = "LVIS federated mask AP" if d.get("format") == "lvis" else "mask mAP"
            console.print(f"{n}: {kind} {fmt(m['map_original/' + n])} -> {fmt(m['map/' + n])}, "
                          f"mAR {fmt(m['mar_original/' + n])} -> {fmt(m['mar/' + n])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval_jobs")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from compressor.errors import BirkhoffError

    try:
        return int(args.func(args) or 0)
    except BirkhoffError as exc:
        print(f"birkhoff eval: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
