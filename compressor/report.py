"""Per-tensor report of a compressed checkpoint, as rows or Parquet (pyarrow)."""

from __future__ import annotations

from pathlib import Path

from .format.fsio import atomic_file, fsync_file
from .stats import shape_numel

REPORT_COLUMNS = ("name", "shape", "dtype", "numel", "raw", "raw_reason", "layout", "U", "K", "bits", "mae")


def manifest_rows(manifest: dict) -> list[dict]:
    rows = []
    for name, m in manifest["tensors"].items():
        raw = bool(m["raw"])
        rows.append({
            "name": name,
            "shape": [int(d) for d in m["shape"]],
            "dtype": m["dtype"],
            "numel": shape_numel(m["shape"]),
            "raw": raw,
            "raw_reason": m.get("raw_reason") if raw else None,
            "layout": None if raw else m["layout"],
            "U": None if raw else int(m["U"]),
            "K": None if raw else int(m["K"]),
            "bits": None if raw else int(m["bits"]),
            "mae": 0.0 if raw else float(m["mae"]),
        })
    return rows


def write_parquet(rows: list[dict], path, *, atomic: bool = True) -> Path:
    """Write the rows as Parquet; ``atomic`` writes a temporary beside ``path`` and
    renames it (callers that publish the file themselves pass False)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("name", pa.string()), ("shape", pa.list_(pa.int64())), ("dtype", pa.string()), ("numel", pa.int64()),
        ("raw", pa.bool_()), ("raw_reason", pa.string()), ("layout", pa.string()), ("U", pa.int64()),
        ("K", pa.int64()), ("bits", pa.int64()), ("mae", pa.float64()),
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
