"""LVIS federated mask AP, compatible with the LVIS API's ``LVISEval`` (``iou_type="segm"``).

PyPI's ``lvis`` package (0.5.3, 2020) no longer runs on NumPy 2 (``np.float``)
and pulls OpenCV for plotting, so this is a small re-implementation of its
evaluation, on pycocotools' mask IoU. LVIS is *federated*: not every category
is annotated on every image, so

- a category is evaluated on an image only when the image has a ground-truth
  instance of it (positive) or lists it in ``neg_category_ids`` (verified
  absent); detections of any other category on that image are dropped;
- an unmatched detection of a category in the image's
  ``not_exhaustive_category_ids`` is ignored, not counted as a false positive
  (some of its instances were never annotated);
- at most ``max_dets`` (300) detections per image, the highest scored, count.

The rest is COCO's procedure: greedy matching per IoU threshold 0.50:0.95, 101
recall points, area ranges; AP averaged over the categories that have ground
truth, and per frequency group (APr / APc / APf: rare, common, frequent). With
every absent category listed as negative and none as not exhaustive, the result
equals pycocotools' COCOeval (with at most 100 detections per image): the
tests check that, and the federated rules on a hand-computed case.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DatasetError

IOU_THRS = np.linspace(0.5, 0.95, 10)
REC_THRS = np.linspace(0.0, 1.0, 101)
AREA_RNGS = {"all": (0.0, 1e10), "small": (0.0, 32.0 ** 2), "medium": (32.0 ** 2, 96.0 ** 2),
             "large": (96.0 ** 2, 1e10)}
FREQUENCIES = ("r", "c", "f")
MAX_DETS = 300


@dataclass(frozen=True)
class LvisGroundTruth:
    """What the federated evaluation needs from an LVIS annotation file."""

    path: str
    neg: dict[int, frozenset[int]]             # image -> verified-absent categories
    not_exhaustive: dict[int, frozenset[int]]  # image -> partly annotated categories
    sizes: dict[int, tuple[int, int]]          # image -> (height, width)
    anns: dict[tuple[int, int], list[dict]]    # (image, category) -> {id, rle, area}
    frequency: dict[int, str]                  # category -> r / c / f


def load_lvis(annotation_file: str | Path) -> LvisGroundTruth:
    import json

    from pycocotools import mask as mask_utils

    path = Path(annotation_file)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DatasetError("file not found", file=str(path)) from exc
    except (OSError, ValueError) as exc:
        raise DatasetError(f"unreadable JSON: {exc}", file=str(path)) from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                       "categories")):
        raise DatasetError("LVIS JSON needs 'images', 'annotations' and 'categories' lists", file=str(path))
    freq = {}
    for c in data["categories"]:
        f = c.get("frequency")
        if f not in FREQUENCIES:
            raise DatasetError(f"category frequency must be one of r, c, f; got {f!r}", file=str(path),
                               item=f"category {c.get('id')}")
        freq[int(c["id"])] = f
    neg, nel, sizes = {}, {}, {}
    for im in data["images"]:
        iid = int(im["id"])
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if not isinstance(im.get(key), list):
                raise DatasetError(f"LVIS image needs a {key!r} list", file=str(path), item=f"image {iid}")
        neg[iid] = frozenset(int(c) for c in im["neg_category_ids"])
        nel[iid] = frozenset(int(c) for c in im["not_exhaustive_category_ids"])
        sizes[iid] = (int(im["height"]), int(im["width"]))
    anns: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for a in data["annotations"]:
        iid, cid = int(a["image_id"]), int(a["category_id"])
        if iid not in sizes:
            raise DatasetError(f"annotation refers to unknown image {iid}", file=str(path),
                               item=f"annotation {a.get('id')}")
        if cid not in freq:
            raise DatasetError(f"annotation refers to unknown category {cid}", file=str(path),
                               item=f"annotation {a.get('id')}")
        h, w = sizes[iid]
        seg = a["segmentation"]
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = {"size": seg["size"], "counts": seg["counts"].encode() if isinstance(seg["counts"], str)
                   else seg["counts"]}
        anns[iid, cid].append({"id": int(a["id"]), "rle": rle, "area": float(a["area"])})
    return LvisGroundTruth(str(path), neg, nel, sizes, dict(anns), freq)


def _rle(seg: dict) -> dict:
    counts = seg["counts"]
    return {"size": list(seg["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


def _evaluate_img(gt: list[dict], dt: list[dict], ious: np.ndarray, area: tuple[float, float],
                  not_exhaustive: bool) -> dict | None:
    """Greedy matching of one (image, category) at every IoU threshold (LVISEval.evaluate_img)."""
    if not gt and not dt:
        return None
    g_ig = np.array([not (area[0] <= g["area"] <= area[1]) for g in gt], dtype=bool)
    g_order = np.argsort(g_ig, kind="mergesort")  # ignored ground truth last
    g_ig = g_ig[g_order]
    ious = ious[:, g_order] if ious.size else ious
    n_t, n_g, n_d = len(IOU_THRS), len(gt), len(dt)
    g_m = np.zeros((n_t, n_g), dtype=bool)
    d_m = np.zeros((n_t, n_d), dtype=bool)
    d_ig = np.zeros((n_t, n_d), dtype=bool)
    for t, thr in enumerate(IOU_THRS):
        if not ious.size:
            break
        for d in range(n_d):
            best, m = min(thr, 1 - 1e-10), -1
            for g in range(n_g):
                if g_m[t, g]:
                    continue
                if m > -1 and not g_ig[m] and g_ig[g]:
                    break
                if ious[d, g] < best:
                    continue
                best, m = ious[d, g], g
            if m == -1:
                continue
            d_ig[t, d] = g_ig[m]
            d_m[t, d] = True
            g_m[t, m] = True
    out_of_range = np.array([not (area[0] <= d["area"] <= area[1]) or not_exhaustive for d in dt], dtype=bool)
    d_ig |= ~d_m & out_of_range[None, :]
    return {"scores": np.array([d["score"] for d in dt], dtype=np.float64), "matched": d_m, "ignored": d_ig,
            "gt_ignored": g_ig}


def _precision_recall(evals: list[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    """(precision [T, R], recall [T]) of one category and area range, or None without ground truth."""
    scores = np.concatenate([e["scores"] for e in evals])
    order = np.argsort(-scores, kind="mergesort")
    d_m = np.concatenate([e["matched"] for e in evals], axis=1)[:, order]
    d_ig = np.concatenate([e["ignored"] for e in evals], axis=1)[:, order]
    n_gt = int(np.count_nonzero(~np.concatenate([e["gt_ignored"] for e in evals])))
    if n_gt == 0:
        return None
    tps = np.cumsum(d_m & ~d_ig, axis=1).astype(np.float64)
    fps = np.cumsum(~d_m & ~d_ig, axis=1).astype(np.float64)
    precision = np.zeros((len(IOU_THRS), len(REC_THRS)))
    recall = np.zeros(len(IOU_THRS))
    for t in range(len(IOU_THRS)):
        tp, fp = tps[t], fps[t]
        rc = tp / n_gt
        recall[t] = rc[-1] if len(tp) else 0.0
        pr = tp / (fp + tp + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr  # precision envelope
        idx = np.searchsorted(rc, REC_THRS, side="left")
        ok = idx < len(pr)
        precision[t, ok] = pr[idx[ok]]
    return precision, recall


def lvis_mask_ap(gt: LvisGroundTruth, results: Sequence[dict], image_ids: Sequence[int], *,
                 max_dets: int = MAX_DETS) -> dict[str, float]:
    """Federated AP of COCO-style ``segm`` results (``image_id``, ``category_id``,
    ``segmentation`` RLE, ``score``) over ``image_ids``.

    Returns ``map`` (AP@[.5:.95]), ``ap50``, ``ap75``, ``aps``/``apm``/``apl``,
    ``apr``/``apc``/``apf`` and ``mar`` (AR@max_dets); a group with no ground truth
    is ``nan``.
    """
    from pycocotools import mask as mask_utils

    ids = sorted({int(i) for i in image_ids})
    unknown = [i for i in ids if i not in gt.sizes]
    if unknown:
        raise DatasetError(f"images {unknown[:5]} are not in the LVIS annotations", file=gt.path)
    dts = _federated_detections(gt, results, set(ids), max_dets)
    cats = sorted(gt.frequency)
    n_t, n_r = len(IOU_THRS), len(REC_THRS)
    precision = -np.ones((n_t, n_r, len(cats), len(AREA_RNGS)))
    recall = -np.ones((n_t, len(cats), len(AREA_RNGS)))
    for ci, cid in enumerate(cats):
        pairs = []
        for iid in ids:
            g = gt.anns.get((iid, cid), [])
            d = sorted(dts.get((iid, cid), []), key=lambda x: -x["score"])  # stable: ties keep result order
            if not g and not d:
                continue
            ious = np.asarray(mask_utils.iou([x["rle"] for x in d], [x["rle"] for x in g], [0] * len(g))) \
                if g and d else np.zeros((len(d), len(g)))
            pairs.append((g, d, ious, cid in gt.not_exhaustive[iid]))
        for ai, rng in enumerate(AREA_RNGS.values()):
            evals = [e for e in (_evaluate_img(g, d, ious, rng, ne) for g, d, ious, ne in pairs) if e is not None]
            if not evals:
                continue
            pr = _precision_recall(evals)
            if pr is not None:
                precision[:, :, ci, ai], recall[:, ci, ai] = pr
    return _lvis_summary(precision, recall, cats, gt)


def _federated_detections(gt: LvisGroundTruth, results: Sequence[dict], idset: set[int],
                          max_dets: int) -> dict[tuple[int, int], list[dict]]:
    """The results per (image, category) that LVIS scores: the best ``max_dets`` of an
    image, in categories verified present or absent there."""
    from pycocotools import mask as mask_utils

    per_img: dict[int, list[dict]] = defaultdict(list)
    for k, r in enumerate(results):
        iid = int(r["image_id"])
        if iid in idset:
            rle = _rle(r["segmentation"])
            per_img[iid].append({"id": k + 1, "category_id": int(r["category_id"]), "score": float(r["score"]),
                                 "rle": rle, "area": float(mask_utils.area(rle))})
    dts: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for iid, ds in per_img.items():
        if len(ds) > max_dets:  # LVISResults keeps the best max_dets per image
            ds = sorted(ds, key=lambda d: d["score"], reverse=True)[:max_dets]
        positive = {c for (i, c) in gt.anns if i == iid}
        for d in ds:
            if d["category_id"] in gt.neg[iid] or d["category_id"] in positive:
                dts[iid, d["category_id"]].append(d)
    return dts


def _lvis_summary(precision: np.ndarray, recall: np.ndarray, cats: list[int],
                  gt: LvisGroundTruth) -> dict[str, float]:
    """The AP / AR figures of :func:`lvis_mask_ap` from its precision and recall tables."""

    def mean(a: np.ndarray) -> float:
        v = a[a > -1]
        return float(np.mean(v)) if v.size else float("nan")

    a = {k: i for i, k in enumerate(AREA_RNGS)}
    out = {"map": mean(precision[:, :, :, a["all"]]),
           "ap50": mean(precision[0, :, :, a["all"]]), "ap75": mean(precision[5, :, :, a["all"]]),
           "aps": mean(precision[:, :, :, a["small"]]), "apm": mean(precision[:, :, :, a["medium"]]),
           "apl": mean(precision[:, :, :, a["large"]]), "mar": mean(recall[:, :, a["all"]])}
    for f in FREQUENCIES:
        sel = [i for i, c in enumerate(cats) if gt.frequency[c] == f]
        out[f"ap{f}"] = mean(precision[:, :, sel, a["all"]]) if sel else float("nan")
    return out
