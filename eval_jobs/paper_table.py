"""The paper's accuracy table: prompt types down, datasets across, original / compressed / drop.

Rows are the paper's prompt types (Box, Box-Center, Mask-Center, Mask-Rand
1pt, Mask-Rand 2pt) and, where a dataset measures it, the mask AP with box
prompts (COCO's AP@[.5:.95], LVIS's federated AP). A Markdown cell reads
``original / compressed / drop`` in percent; the CSV has the same rows with
three numeric columns per dataset (fractions, not percent), so a spreadsheet
or a plot can read it back.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.format.fsio import write_atomic

from .prompts import ALL_PROMPTS, PromptType

if TYPE_CHECKING:
    from .runner import EvalResults

ROW_LABELS = {
    PromptType.BOX: "Box",
    PromptType.BOX_CENTER: "Box-Center",
    PromptType.MASK_CENTER: "Mask-Center",
    PromptType.MASK_RAND1: "Mask-Rand 1pt",
    PromptType.MASK_RAND2: "Mask-Rand 2pt",
}
AP_ROW = "Mask AP (Box)"
MARKDOWN_NAME = "paper_table.md"
CSV_NAME = "paper_table.csv"


def table_rows(results: "EvalResults") -> tuple[list[str], list[tuple[str, list[tuple | None]]]]:
    """(dataset names, [(row label, per dataset (original, compressed, drop) or None)])."""
    names = [d["name"] for d in results.datasets]
    m = results.metrics
    prompts = [p for p in ALL_PROMPTS if p.value in results.config["prompts"]]
    rows: list[tuple[str, list[tuple | None]]] = []
    for p in prompts:
        cells = []
        for ds in names:
            o, c = m.get(f"miou_original/{ds}/{p.value}"), m.get(f"miou/{ds}/{p.value}")
            cells.append(None if o is None or c is None else (o, c, o - c))
        rows.append((ROW_LABELS[p], cells))
    ap_cells = []
    for ds in names:
        o, c = m.get(f"map_original/{ds}"), m.get(f"map/{ds}")
        ap_cells.append(None if o is None or c is None else (o, c, o - c))
    if any(ap_cells):
        rows.append((AP_ROW, ap_cells))
    return names, rows


def to_markdown(results: "EvalResults") -> str:
    names, rows = table_rows(results)
    lines = [f"**{results.model}**: mIoU (%) per prompt type, original / compressed / drop "
             f"(weights: {results.weights})", ""]
    if not results.fidelity_meaningful:
        lines[0] += " - random-init weights: these figures are noise, not a measure of the codec"
    lines.append("| Prompt | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for label, cells in rows:
        fmt = [("-" if c is None else f"{100 * c[0]:.2f} / {100 * c[1]:.2f} / {100 * c[2]:.2f}") for c in cells]
        lines.append(f"| {label} | " + " | ".join(fmt) + " |")
    counts = ", ".join(f"{d['name']}: {d['images']} images, {results.counts.get(d['name'] + '/box', '-')} objects"
                       for d in results.datasets)
    lines += ["", f"Compressed: `{results.compressed}`; original: `{results.original}`. {counts}.",
              "Mask AP (Box): COCO AP@[.5:.95] on coco datasets, LVIS federated AP on lvis datasets."]
    return "\n".join(lines) + "\n"


def to_csv(results: "EvalResults") -> str:
    names, rows = table_rows(results)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["prompt"] + [f"{ds} {k}" for ds in names for k in ("original", "compressed", "drop")])
    for label, cells in rows:
        w.writerow([label] + [("" if v is None else repr(float(v))) for c in cells for v in (c or (None,) * 3)])
    return buf.getvalue()


def write_paper_table(results: "EvalResults", out_dir: str | Path) -> list[Path]:
    """``paper_table.md`` and ``paper_table.csv`` under ``out_dir`` (each written whole, then renamed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in ((MARKDOWN_NAME, to_markdown(results)), (CSV_NAME, to_csv(results))):
        write_atomic(out / name, text)
        files.append(out / name)
    return files
