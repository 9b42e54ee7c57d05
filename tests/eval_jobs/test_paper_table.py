"""The paper's table layout (prompt types down, datasets across, original / compressed / drop)."""

from __future__ import annotations

import csv
import io

from eval_jobs.paper_table import to_csv, to_markdown, write_paper_table
from eval_jobs.runner import EvalConfig, EvalResults


def _results(weights="trained"):
    prompts = ("box", "box_center", "mask_center", "mask_rand1", "mask_rand2")
    metrics = {}
    for i, p in enumerate(prompts):
        for ds, base in (("coco", 0.8), ("sa1b", 0.7)):
            o, c = base - 0.01 * i, base - 0.01 * i - 0.002
            metrics[f"miou_original/{ds}/{p}"], metrics[f"miou/{ds}/{p}"] = o, c
    metrics["map_original/coco"], metrics["map/coco"] = 0.5, 0.49
    cfg = EvalConfig().to_dict()
    return EvalResults("m", "/c", "/o", cfg, [{"name": "coco", "images": 4}, {"name": "sa1b", "images": 4}],
                       metrics, {"coco/box": 11, "sa1b/box": 11}, {}, [], weights)


def test_markdown_has_the_papers_rows_and_columns():
    md = to_markdown(_results())
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert lines[0] == "| Prompt | coco | sa1b |"
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["Box", "Box-Center", "Mask-Center", "Mask-Rand 1pt",
                                                              "Mask-Rand 2pt", "Mask AP (Box)"]
    assert lines[2] == "| Box | 80.00 / 79.80 / 0.20 | 70.00 / 69.80 / 0.20 |"
    assert lines[-1] == "| Mask AP (Box) | 50.00 / 49.00 / 1.00 | - |"  # SA-1B has no AP
    assert "weights: trained" in md and "noise" not in md
    assert "random-init weights" in to_markdown(_results("random-init"))


def test_csv_round_trips_the_numbers(tmp_path):
    r = _results()
    rows = list(csv.reader(io.StringIO(to_csv(r))))
    assert rows[0] == ["prompt", "coco original", "coco compressed", "coco drop", "sa1b original",
                       "sa1b compressed", "sa1b drop"]
    box = dict(zip(rows[0], rows[1]))
    assert box["prompt"] == "Box"
    assert float(box["coco original"]) == r.metrics["miou_original/coco/box"]
    assert float(box["sa1b compressed"]) == r.metrics["miou/sa1b/box"]
    assert float(box["coco drop"]) == r.metrics["miou_original/coco/box"] - r.metrics["miou/coco/box"]
    assert rows[-1][0] == "Mask AP (Box)" and rows[-1][4:] == ["", "", ""]
    files = write_paper_table(r, tmp_path / "out")
    assert [f.name for f in files] == ["paper_table.md", "paper_table.csv"]
    assert files[0].read_text() == to_markdown(r) and not list((tmp_path / "out").glob("*.tmp"))
