"""Per-tensor report of a compressed checkpoint, as rows or Parquet (pyarrow)."""

from __future__ import annotations

from pathlib import Path

from .format.fsio import atomic_file, fsync_file
from .stats import shape_numel

REPORT_COLUMNS = ("name", "shape", "dtype", "numel", "raw", "raw_reason", "codec", "layout", "U", "K", "bits",
                  "bits_per_weight", "mae")


def manifest_rows(manifest: dict) -> list[dict]:
    rows = []
    for name, m in manifest["tensors"].items():
        raw = bool(m["raw"])
        v2 = not raw and m.get("codec") == "v2"
        paper = not raw and not v2
        rows.append({
            "name": name,
            "shape": [int(d) for d in m["shape"]],
            "dtype": m["dtype"],
            "numel": shape_numel(m["shape"]),
            "raw": raw,
            "raw_reason": m.get("raw_reason") if raw else None,
            "codec": "v2" if v2 else ("paper" if paper else None),
            "layout": m["layout"] if paper else None,
            "U": int(m["U"]) if paper else None,
            "K": int(m["K"]) if paper else None,
            "bits": int(m["bits"]) if paper else None,
            "bits_per_weight": _bits_per_weight(m),
            "mae": 0.0 if raw else float(m["mae"]),
        })
    return rows


def _bits_per_weight(m: dict) -> float:
    """Stored bits per element: a raw tensor's dtype width, the paper codec's packed
    indices (``bits`` per pair), a v2 tensor's whole byte form."""
    from .dtypes import DTYPES

    n = max(shape_numel(m["shape"]), 1)
    if m["raw"]:
        return 8.0 * DTYPES[m["dtype"]].itemsize
    if m.get("codec") == "v2":
        return float(m["bits_per_weight"])
    return float(m["bits"]) * int(m["n_points"]) / n


def write_parquet(rows: list[dict], path, *, atomic: bool = True) -> Path:
    """Write the rows as Parquet; ``atomic`` writes a temporary beside ``path`` and
    renames it (callers that publish the file themselves pass False)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("name", pa.string()), ("shape", pa.list_(pa.int64())), ("dtype", pa.string()), ("numel", pa.int64()),
        ("raw", pa.bool_()), ("raw_reason", pa.string()), ("codec", pa.string()), ("layout", pa.string()),
        ("U", pa.int64()), ("K", pa.int64()), ("bits", pa.int64()), ("bits_per_weight", pa.float64()),
        ("mae", pa.float64()),
    ])
    table = pa.Table.from_pylist([{c: r.get(c) for c in REPORT_COLUMNS} for r in rows], schema=schema)
    path = Path(path)
    if not atomic:
        pq.write_table(table, str(path))
        return path
    with atomic_file(str(path.parent), path.name) as tmp:
        pq.write_table(table, tmp)
        fsync_file(tmp)
    return path
