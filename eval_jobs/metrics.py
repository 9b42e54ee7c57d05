"""mIoU, fidelity and COCO mask mAP / mAR.

IoU is computed from integer pixel counts; means use ``math.fsum`` (the
correctly rounded sum), so a mean does not depend on the order in which shards
return their values: a fanned-out run equals a single-process run bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """``|a & b| / |a | b|`` of two boolean masks; two empty masks are identical (1.0)."""
    return float(batch_iou(np.asarray(a)[None], np.asarray(b)[None])[0])


def batch_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of boolean masks ``[N, H, W]`` (float64)."""
    a = np.asarray(a, dtype=bool).reshape(len(a), -1)
    b = np.asarray(b, dtype=bool).reshape(len(b), -1)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    inter = np.logical_and(a, b).sum(axis=1, dtype=np.int64)
    union = np.logical_or(a, b).sum(axis=1, dtype=np.int64)
    out = np.ones(len(a), dtype=np.float64)
    nz = union > 0
    out[nz] = inter[nz] / union[nz]
    return out


def exact_mean(values: Iterable[float]) -> float:
    """Order-independent mean (``nan`` for no values)."""
    vals = list(values)
    return math.fsum(vals) / len(vals) if vals else float("nan")


# -- COCO mask AP ----------------------------------------------------------------
def encode_mask(mask: np.ndarray) -> dict:
    """A boolean ``[H, W]`` mask as a COCO compressed RLE with a str ``counts`` (JSON-able)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def segm_results(image_id: int, category_ids: Sequence[int], masks: np.ndarray, scores: Sequence[float]) -> list[dict]:
    """COCO results entries (``iouType="segm"``) for one image's predicted masks."""
    return [{"image_id": int(image_id), "category_id": int(c), "segmentation": encode_mask(m), "score": float(s)}
            for c, m, s in zip(category_ids, masks, scores)]


@contextlib.contextmanager
def _quiet():
    """pycocotools prints progress to stdout; ``--json`` promises stdout's last line."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    if buf.getvalue().strip():
        log.debug("pycocotools:\n%s", buf.getvalue().rstrip())


def load_coco(annotation_file: str):
    from pycocotools.coco import COCO

    with _quiet():
        return COCO(annotation_file)


def coco_mask_ap(coco_gt, results: list[dict], image_ids: Sequence[int]) -> dict[str, float]:
    """COCOeval(segm) over ``image_ids``: ``map`` (AP@[.5:.95]), ``mar`` (AR@100) and
    the twelve ``stats``. No detections scores 0, as COCOeval would for any image
    with ground truth and nothing predicted."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"map": 0.0, "mar": 0.0, "stats": [0.0] * 12}
    with _quiet():
        dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes writes area/bbox/id into its input
        ev = COCOeval(coco_gt, dt, iouType="segm")
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in ev.stats]
    return {"map": stats[0], "mar": stats[8], "stats": stats}
