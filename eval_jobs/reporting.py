"""Pictures and MLflow logging of evaluation results.

The overlay panels are composed with NumPy on the worker (small RGB arrays
travel back, not masks); matplotlib (Agg) draws the figures on the driver.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from compressor.format.fsio import write_atomic

if TYPE_CHECKING:
    from .prompts import PromptBatch
    from .runner import EvalResults

log = logging.getLogger(__name__)

_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], dtype=np.float32)
_MAX_SIDE = 384


def _blend(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    out = image.astype(np.float32).copy()
    for i, m in enumerate(masks):
        c = _PALETTE[i % len(_PALETTE)]
        out[m] = (1 - alpha) * out[m] + alpha * c
    return out.clip(0, 255).astype(np.uint8)


def _shrink(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image

    h, w = rgb.shape[:2]
    s = _MAX_SIDE / max(h, w)
    if s >= 1:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))


def overlay_panels(image: np.ndarray, gt: np.ndarray, pred_original: np.ndarray, pred_compressed: np.ndarray,
                   prompts: "PromptBatch") -> dict:
    """Three RGB panels (ground truth, original, compressed) and the prompts, scaled to at most 384 px."""
    h, w = image.shape[:2]
    scale = min(1.0, _MAX_SIDE / max(h, w))
    return {
        "ground_truth": _shrink(_blend(image, gt)),
        "original": _shrink(_blend(image, pred_original)),
        "compressed": _shrink(_blend(image, pred_compressed)),
        "boxes": None if prompts.boxes is None else (prompts.boxes * scale).tolist(),
        "points": None if prompts.points is None else (prompts.points * scale).tolist(),
    }


def save_overlay_png(overlay: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, key in zip(axes, ("ground_truth", "original", "compressed")):
        ax.imshow(overlay[key])
        ax.set_title(key.replace("_", " "))
        ax.axis("off")
        for b in overlay.get("boxes") or []:
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, lw=1.2, ec="white"))
        for pts in overlay.get("points") or []:
            p = np.asarray(pts)
            ax.scatter(p[:, 0], p[:, 1], s=18, c="white", edgecolors="black", linewidths=0.6)
    fig.suptitle(title or f"{overlay['dataset']} image {overlay['image_id']} ({overlay['prompt']} prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def save_miou_chart(results: "EvalResults", path: str | Path) -> Path:
    """Grouped bars: mIoU per prompt type, original against compressed, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = results.config["prompts"]
    names = [d["name"] for d in results.datasets]
    fig, axes = plt.subplots(1, len(names), figsize=(1.6 + 1.5 * len(prompts) * len(names), 3.8), squeeze=False)
    x = np.arange(len(prompts))
    for ax, ds in zip(axes[0], names):
        orig = [results.metrics.get(f"miou_original/{ds}/{p}") or 0.0 for p in prompts]
        comp = [results.metrics.get(f"miou/{ds}/{p}") or 0.0 for p in prompts]
        ax.bar(x - 0.2, orig, 0.4, label="original")
        ax.bar(x + 0.2, comp, 0.4, label="compressed")
        ax.set_xticks(x, prompts, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"mIoU on {ds}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def write_artifacts(results: "EvalResults", out_dir: str | Path) -> list[Path]:
    """results.json, the paper's table (paper_table.md / .csv), miou_per_prompt.png and
    overlays/*.png under ``out_dir``."""
    from .paper_table import write_paper_table

    out = Path(out_dir)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    files = []
    write_atomic(out / "results.json", json.dumps(results.to_json_dict(), indent=2, sort_keys=True))
    files.append(out / "results.json")
    files += write_paper_table(results, out)
    files.append(save_miou_chart(results, out / "miou_per_prompt.png"))
    for ov in results.overlays:
        files.append(save_overlay_png(ov, out / "overlays" / f"{ov['dataset']}_{ov['image_id']}.png"))
    return files


def log_eval_to_mlflow(results: "EvalResults", parent_run_id: str | None = None, *, tracking_uri: str | None = None,
                       experiment: str | None = None, run_name: str | None = None) -> str:
    """Log one model's evaluation as an MLflow run, nested under ``parent_run_id`` when given.

    Works through ``MlflowClient`` (no global active run is touched, so a workflow
    can call it while its own run is open). Returns the new run's id. The run is
    tagged with the original's provenance (``birkhoff.weights``); a random-init
    original's run is tagged ``birkhoff.fidelity_meaningful=false`` with a note.
    """
    from mlflow.tracking import MlflowClient

    from . import mlflow_batches as mb
    from .provenance import provenance_tags

    client = MlflowClient(tracking_uri=tracking_uri)
    tags = {"birkhoff.kind": "eval", "birkhoff.model": results.model, **provenance_tags(results.weights)}
    if parent_run_id:
        exp_id = client.get_run(parent_run_id).info.experiment_id
        tags["mlflow.parentRunId"] = parent_run_id
    else:
        exp_id = mb.experiment_id(client, experiment or "birkhoff-eval")
    rid = mb.create_run(client, exp_id, run_name or f"eval {results.model}", tags)
    try:
        metrics = dict(results.metrics)
        metrics.update({f"throughput/{k}": v for k, v in results.timings.items()})
        params = {"compressed": results.compressed, "original": results.original,
                  "datasets": ",".join(d["name"] for d in results.datasets)}
        params.update({f"eval.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in results.config.items()})
        mb.log_metrics(client, rid, metrics)
        mb.log_params(client, rid, params)
        with tempfile.TemporaryDirectory(prefix="birkhoff-eval-") as tmp:
            write_artifacts(results, tmp)
            client.log_artifacts(rid, tmp)
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    log.info("logged evaluation of %s to MLflow run %s", results.model, rid)
    return rid
