"""Aggregation of an evaluation's subset results into one model's metrics.

Every value is sorted by (prompt, image, object) before ``math.fsum`` means are
taken, so the metrics do not depend on how the images were split into tasks
(nor on which worker ran which subset).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from .datasets import Dataset, ImageEntry
from .lvis_ap import load_lvis, lvis_mask_ap
from .metrics import coco_mask_ap, exact_mean, load_coco
from .prompts import ALL_PROMPTS
from .provenance import RANDOM_INIT_NOTE, weights_kind

if TYPE_CHECKING:
    from .runner import EvalConfig, ModelUnderTest, SubsetResult

log = logging.getLogger(__name__)

DET_BOX = "det_box"  # fidelity of the detector-box masks (the mAP run's prompts)


@dataclass
class EvalResults:
    """Every metric of one model; ``metrics`` is flat and JSON-able."""

    model: str
    compressed: str
    original: str
    config: dict
    datasets: list[dict]
    metrics: dict[str, float]
    counts: dict[str, int]
    timings: dict[str, float]
    overlays: list[dict] = field(default_factory=list, repr=False)
    # where the original's weights come from (``eval_jobs.provenance``): "trained",
    # "random-init" or "unknown"; a random-init model's figures are noise
    weights: str = "unknown"

    @property
    def fidelity_meaningful(self) -> bool:
        return self.weights != "random-init"

    def to_json_dict(self) -> dict:
        return {"model": self.model, "compressed": self.compressed, "original": self.original,
                "config": self.config, "datasets": self.datasets, "metrics": self.metrics,
                "counts": self.counts, "timings": self.timings, "weights": self.weights,
                "fidelity_meaningful": self.fidelity_meaningful}


def _clean(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def aggregate(model: ModelUnderTest, cfg: EvalConfig, selected: dict[str, tuple[Dataset, tuple[ImageEntry, ...]]],
              results: Sequence[SubsetResult]) -> EvalResults:
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    ds_info = []
    order = {p.value: i for i, p in enumerate(ALL_PROMPTS)}
    for ds_name, (ds, entries) in selected.items():
        mine = [r for r in results if r.dataset == ds_name]
        rows = sorted((s for r in mine for s in r.scores), key=lambda s: (order[s[0]], s[1], s[2]))
        ds_info.append({**ds.spec.to_dict(), "images": len(entries),
                        "objects": sum(len(e.eval_objects()) for e in entries)})
        for kind in cfg.prompts:
            sel = [s for s in rows if s[0] == kind.value]
            key = f"{ds_name}/{kind.value}"
            counts[key] = len(sel)
            m_o, m_c = exact_mean(s[3] for s in sel), exact_mean(s[4] for s in sel)
            metrics[f"miou_original/{key}"] = m_o
            metrics[f"miou/{key}"] = m_c
            metrics[f"fidelity_miou/{key}"] = exact_mean(s[5] for s in sel)
            metrics[f"miou_drop/{key}"] = m_o - m_c
        det = sorted(d for r in mine for d in r.det_fidelity)
        if det:
            metrics[f"fidelity_miou/{ds_name}/{DET_BOX}"] = exact_mean(d[2] for d in det)
            counts[f"{ds_name}/{DET_BOX}"] = len(det)
        if ds.has_map:
            ids = [e.image_id for e in entries]
            if ds.spec.format == "lvis":  # federated AP; also per frequency group
                lvis_gt = load_lvis(ds.spec.annotations)
                ap_of = lambda dets: lvis_mask_ap(lvis_gt, dets, ids)  # noqa: E731
                extra = ("apr", "apc", "apf")
            else:
                coco_gt = load_coco(ds.spec.annotations)
                ap_of = lambda dets: coco_mask_ap(coco_gt, dets, ids)  # noqa: E731
                extra = ()
            ap = {}
            for which, attr in (("original", "segm_original"), ("compressed", "segm_compressed")):
                dets = [d for _, d in sorted((x for r in mine for x in getattr(r, attr)), key=lambda x: x[0])]
                ap[which] = ap_of(dets)
            for k in ("map", "mar") + extra:
                metrics[f"{k}/{ds_name}"] = ap["compressed"][k]
                metrics[f"{k}_original/{ds_name}"] = ap["original"][k]
            metrics[f"map_drop/{ds_name}"] = ap["original"]["map"] - ap["compressed"]["map"]
    images = sum(r.images for r in results)
    t_o = sum(r.seconds_original for r in results)
    t_c = sum(r.seconds_compressed for r in results)
    timings = {"images": images, "seconds_original": t_o, "seconds_compressed": t_c,
               "images_per_s_original": images / t_o if t_o else 0.0,
               "images_per_s_compressed": images / t_c if t_c else 0.0}
    overlays = sorted((o for r in results for o in r.overlays), key=lambda o: (o["dataset"], o["image_id"]))
    weights = model.weights or weights_kind(model.original)
    if weights == "random-init":
        log.warning("%s: the original %s has %s", model.name, model.original, RANDOM_INIT_NOTE)
    return EvalResults(model.name, model.compressed, model.original, cfg.to_dict(), ds_info,
                       {k: _clean(v) for k, v in sorted(metrics.items())}, dict(sorted(counts.items())),
                       timings, overlays, weights)
