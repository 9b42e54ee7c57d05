"""LVIS federated mask AP: a hand-computed case, and equality with COCOeval where LVIS reduces to COCO."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from eval_jobs.errors import DatasetError
from eval_jobs.lvis_ap import load_lvis, lvis_mask_ap


def _rle(mask):
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}


def _m(rows, cols):
    m = np.zeros((10, 10), bool)
    m[rows, cols] = True
    return m


A, B = _m(slice(0, 5), slice(0, 5)), _m(slice(5, 10), slice(5, 10))      # image 1, category 1 (frequent)
C = _m(slice(0, 10), slice(0, 5))                                         # image 2, category 3 (rare)
D = _m(slice(0, 5), slice(0, 10))                                         # image 3, category 2 (common)
B16 = _m(slice(5, 9), slice(5, 9))                                        # 16 of B's 25 pixels: IoU 0.64


@pytest.fixture()
def lvis_file(tmp_path):
    images = [
        # image 1: category 2 verified absent
        {"id": 1, "height": 10, "width": 10, "coco_url": "x/1.png", "neg_category_ids": [2],
         "not_exhaustive_category_ids": []},
        # image 2: category 1 verified absent; category 3 not exhaustively annotated
        {"id": 2, "height": 10, "width": 10, "coco_url": "x/2.png", "neg_category_ids": [1],
         "not_exhaustive_category_ids": [3]},
        # image 3: nothing known about category 1
        {"id": 3, "height": 10, "width": 10, "coco_url": "x/3.png", "neg_category_ids": [],
         "not_exhaustive_category_ids": []},
    ]
    anns = [(1, 1, 1, A), (2, 1, 1, B), (3, 2, 3, C), (4, 3, 2, D)]
    data = {"images": images,
            "annotations": [{"id": i, "image_id": im, "category_id": c, "segmentation": _rle(m),
                             "area": float(m.sum()), "bbox": [0, 0, 1, 1]} for i, im, c, m in anns],
            "categories": [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "c"},
                           {"id": 3, "name": "c", "frequency": "r"}]}
    p = tmp_path / "lvis.json"
    p.write_text(json.dumps(data))
    return p


def _det(image_id, cat, mask, score):
    return {"image_id": image_id, "category_id": cat, "segmentation": _rle(mask), "score": score}


DETS = [
    _det(3, 1, A, 0.95),    # category 1 on image 3: neither positive nor negative there -> dropped
    _det(1, 1, A, 0.90),    # TP at every threshold
    _det(2, 1, C, 0.85),    # category 1 is verified absent on image 2 -> a false positive
    _det(1, 1, B16, 0.80),  # IoU 0.64 with B: TP up to 0.60, FP from 0.65
    _det(2, 3, C, 0.60),    # TP
    _det(2, 3, B, 0.70),    # unmatched, but category 3 is not exhaustive on image 2 -> ignored
    _det(1, 2, A, 0.50),    # category 2 verified absent on image 1 -> a false positive
    _det(3, 2, D, 0.40),    # TP
]


def test_federated_ap_matches_the_hand_computation(lvis_file):
    got = lvis_mask_ap(load_lvis(lvis_file), DETS, [1, 2, 3])
    # category 1, thresholds 0.50-0.60: TP, FP, TP -> precision envelope 1 up to recall 0.5, then 2/3
    #   (51 recall points at 1, 50 at 2/3); thresholds 0.65-0.95: TP, FP, FP -> 51 points at 1, the rest 0
    two_thirds = 2 / (3 + np.spacing(1))
    ap1_low, ap1_high = (51 + 50 * two_thirds) / 101, 51 / 101
    ap1 = (3 * ap1_low + 7 * ap1_high) / 10
    ap2 = 0.5   # FP then TP: precision 1/2 at recall 1, at every threshold
    ap3 = 1.0   # the ignored detection does not count
    assert got["apf"] == pytest.approx(ap1, rel=1e-12)
    assert got["apc"] == pytest.approx(ap2, rel=1e-12)
    assert got["apr"] == pytest.approx(ap3, rel=1e-12)
    assert got["map"] == pytest.approx((ap1 + ap2 + ap3) / 3, rel=1e-12)
    assert got["ap50"] == pytest.approx((ap1_low + ap2 + ap3) / 3, rel=1e-12)
    assert got["ap75"] == pytest.approx((ap1_high + ap2 + ap3) / 3, rel=1e-12)
    assert got["aps"] == got["map"]  # every object is small (< 32^2 px)
    assert math.isnan(got["apm"]) and math.isnan(got["apl"])
    # recall: category 1 finds B only up to 0.60 (3 of 10 thresholds)
    assert got["mar"] == pytest.approx(((3 * 1.0 + 7 * 0.5) / 10 + 1.0 + 1.0) / 3, rel=1e-12)


def test_each_federated_rule_changes_the_result(lvis_file):
    base = lvis_mask_ap(load_lvis(lvis_file), DETS, [1, 2, 3])
    data = json.loads(lvis_file.read_text())
    # category 3 exhaustive on image 2: the stray detection becomes a false positive ranked first
    data["images"][1]["not_exhaustive_category_ids"] = []
    lvis_file.write_text(json.dumps(data))
    assert lvis_mask_ap(load_lvis(lvis_file), DETS, [1, 2, 3])["apr"] == pytest.approx(0.5, rel=1e-12)
    # category 2 not listed negative on image 1: its false positive is dropped
    data["images"][0]["neg_category_ids"] = []
    lvis_file.write_text(json.dumps(data))
    assert lvis_mask_ap(load_lvis(lvis_file), DETS, [1, 2, 3])["apc"] == pytest.approx(1.0, rel=1e-12)
    # only image 1 evaluated: category 1 alone counts... and the max_dets cut keeps the best per image
    one = lvis_mask_ap(load_lvis(lvis_file), DETS, [1], max_dets=1)
    assert one["apf"] == pytest.approx((51 + 50 * 0.0) / 101, rel=1e-12)  # B's detection cut: recall 0.5
    assert base["map"] != one["map"]


def test_equals_cocoeval_when_every_category_is_known(tmp_path):
    """Every absent category negative, none partial, < 100 detections per image: LVIS AP == COCO AP."""
    from eval_jobs.datasets import DatasetSpec, decode_masks, load_dataset
    from eval_jobs.metrics import coco_mask_ap, load_coco, segm_results
    from eval_jobs.synthetic import CATEGORIES, write_synthetic

    syn = write_synthetic(tmp_path / "syn", n_images=10, seed=3)
    coco = json.loads(syn.coco.read_text())
    cats = [c["id"] for c in CATEGORIES]
    imgs = []
    for im in coco["images"]:
        pos = {a["category_id"] for a in coco["annotations"] if a["image_id"] == im["id"]}
        imgs.append(dict(im, neg_category_ids=[c for c in cats if c not in pos], not_exhaustive_category_ids=[]))
    full = tmp_path / "lvis_full.json"
    full.write_text(json.dumps(dict(coco, images=imgs, categories=list(CATEGORIES))))
    ds = load_dataset(DatasetSpec.parse(syn.spec("coco")))
    rng = np.random.default_rng(0)
    res = []
    for e in ds.images:
        for o, m in zip(e.objects, decode_masks(e, e.objects)):
            for _ in range(2):  # a shifted copy or noise, the right category or a wrong one
                p = np.roll(m, int(rng.integers(-5, 6)), axis=int(rng.integers(0, 2))) if rng.random() < 0.7 \
                    else rng.random(m.shape) < 0.05
                c = o.category_id if rng.random() < 0.8 else int(rng.integers(1, len(cats) + 1))
                res += segm_results(e.image_id, [c], p[None], [float(rng.random())])
    ids = [e.image_id for e in ds.images]
    ours = lvis_mask_ap(load_lvis(full), res, ids)
    ref = coco_mask_ap(load_coco(str(syn.coco)), res, ids)["stats"]
    assert 0.0 < ours["map"] < 1.0
    assert ours["map"] == pytest.approx(ref[0], abs=1e-12)
    assert ours["ap50"] == pytest.approx(ref[1], abs=1e-12) and ours["ap75"] == pytest.approx(ref[2], abs=1e-12)
    assert ours["aps"] == pytest.approx(ref[3], abs=1e-12)
    assert ours["mar"] == pytest.approx(ref[8], abs=1e-12)
    # the generated LVIS file is federated: partial categories and a subset of negatives change the result
    assert lvis_mask_ap(load_lvis(syn.lvis), res, ids)["map"] != ours["map"]


def test_bad_lvis_files_name_the_file(tmp_path, lvis_file):
    data = json.loads(lvis_file.read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(data, images=[{k: v for k, v in data["images"][0].items()
                                                  if k != "neg_category_ids"}])))
    with pytest.raises(DatasetError, match="neg_category_ids") as ei:
        load_lvis(bad)
    assert ei.value.file == str(bad)
    bad.write_text(json.dumps(dict(data, categories=[{"id": 1, "name": "a"}])))
    with pytest.raises(DatasetError, match="frequency"):
        load_lvis(bad)
    with pytest.raises(DatasetError, match="not in the LVIS annotations"):
        lvis_mask_ap(load_lvis(lvis_file), DETS, [1, 99])
