"""Procedural segmentation data: textured shapes on textured backgrounds, with exact masks.

One scene (``render_scene``) holds one to ``max_objects`` shapes of six kinds
(rotated rectangles, rotated ellipses, triangles, polygons, stars, rings), each
filled with a texture (flat, gradient, stripes, checker, noise) whose colours
differ from what lies under it; sizes span a 5x range; later shapes occlude
earlier ones, and a shape that would hide more than ``MAX_OCCLUSION`` of an
earlier one is drawn elsewhere, so every annotated object stays visible.
The ground truth of an object is exactly the pixels painted with its texture
that stay visible (polygons are rasterised by pycocotools, so a polygon
annotation decodes to the painted pixels).

The training script of the project's SAM (``eval_jobs.train_sam``) renders
scenes in memory from its own seeds; ``write_synthetic(out)`` writes an
evaluation set from another seed:

- ``images/NNNNNN.png``: RGB images (sizes drawn from ``[min_size, max_size]``);
- ``coco.json``: COCO instance JSON (polygons for unoccluded polygonal shapes,
  RLE for the rest: both encodings are exercised), ``bbox``, ``area``, ``iscrowd``;
- ``lvis.json``: the same images in LVIS's federated layout (``coco_url``,
  ``neg_category_ids``, ``not_exhaustive_category_ids``, category
  ``frequency``); an image marked not exhaustive for a category lacks one of
  that category's instances, as in LVIS;
- ``sa1b/NNNNNN.json``: the same objects as SA-1B per-image JSON (RLE masks);
- ``detections.json``: detector-style boxes (ground truth boxes, jittered, with
  a score and a false positive per image) for the detector-box mAP path.

``python -m eval_jobs.synthetic OUT [--images N] [--seed S]`` does the same from
the shell; the demo evaluates on it (``--dataset coco:OUT/coco.json:OUT/images``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.format.fsio import write_atomic

# ``frequency`` follows LVIS's r/c/f labels; here it mirrors the sampling weights below.
CATEGORIES = ({"id": 1, "name": "rectangle", "supercategory": "shape", "frequency": "f"},
              {"id": 2, "name": "ellipse", "supercategory": "shape", "frequency": "f"},
              {"id": 3, "name": "triangle", "supercategory": "shape", "frequency": "f"},
              {"id": 4, "name": "polygon", "supercategory": "shape", "frequency": "c"},
              {"id": 5, "name": "star", "supercategory": "shape", "frequency": "c"},
              {"id": 6, "name": "ring", "supercategory": "shape", "frequency": "r"})
_CAT_WEIGHTS = np.array([0.22, 0.22, 0.22, 0.14, 0.12, 0.08])
TEXTURES = ("flat", "gradient", "stripes", "checker", "noise")
MAX_OCCLUSION = 0.6      # an earlier object keeps at least 40 % of its pixels
MIN_AREA = 12            # pixels an object must keep
_MIN_CONTRAST = 80.0     # L1 distance (0..765) between an object's colour and what it covers
SYNTHETIC_VERSION = 2    # bump when the same seed draws other images (caches are keyed by it)


@dataclass(frozen=True)
class SyntheticPaths:
    root: Path
    images: Path
    coco: Path
    sa1b: Path
    detections: Path
    lvis: Path | None = None

    def spec(self, fmt: str = "coco", detections: bool = False) -> str:
        """A ``--dataset`` value for this set."""
        if fmt == "sa1b":
            return f"sa1b:{self.sa1b}:{self.images}"
        if fmt == "lvis":
            return f"lvis:{self.lvis or self.root / 'lvis.json'}:{self.images}"
        return f"{fmt}:{self.coco}:{self.images}" + (f":{self.detections}" if detections else "")


@dataclass
class SceneObject:
    category_id: int
    mask: np.ndarray            # bool [H, W]: the visible pixels
    polygon: list | None        # flat [x0, y0, x1, y1, ...] when the visible mask is that polygon


# -- drawing -------------------------------------------------------------------------
def _poly_mask(h: int, w: int, poly: np.ndarray) -> np.ndarray:
    """The polygon rasterised by pycocotools: what its annotation decodes to."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects([poly.reshape(-1).tolist()], h, w)
    return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def _ellipse(xx, yy, cx, cy, rx, ry, ang) -> np.ndarray:
    c, s = np.cos(ang), np.sin(ang)
    u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _shape(rng: np.random.Generator, h: int, w: int) -> tuple[int, np.ndarray, np.ndarray | None]:
    """(category, mask, polygon points [N, 2] or None) of one random shape."""
    cat = int(rng.choice(len(CATEGORIES), p=_CAT_WEIGHTS)) + 1
    side = min(h, w)
    # sizes log-uniform over a 5x range, aspect up to 2:1
    r = float(np.exp(rng.uniform(np.log(0.07), np.log(0.35)))) * side
    aspect = float(np.exp(rng.uniform(-0.7, 0.7)))
    rx, ry = r * np.sqrt(aspect), r / np.sqrt(aspect)
    cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
    ang = rng.uniform(0, np.pi)
    if cat in (2, 6):
        yy, xx = np.mgrid[0:h, 0:w] + 0.5
        mask = _ellipse(xx, yy, cx, cy, rx, ry, ang)
        if cat == 6:
            k = rng.uniform(0.45, 0.7)
            mask &= ~_ellipse(xx, yy, cx, cy, k * rx, k * ry, ang)
        return cat, mask, None
    if cat == 1:
        local = np.array([[-rx, -ry], [rx, -ry], [rx, ry], [-rx, ry]])
        if rng.random() < 0.4:  # axis-aligned boxes are common in real data
            ang = 0.0
    elif cat == 3:
        t = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2]) + rng.uniform(-0.35, 0.35, 3)
        local = np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)
    elif cat == 4:
        n = int(rng.integers(5, 9))
        t = np.sort(rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, n, endpoint=False)
                    + rng.uniform(-0.25, 0.25, n) * (2 * np.pi / n))
        rad = rng.uniform(0.8, 1.0, n)
        local = np.stack([rx * rad * np.cos(t), ry * rad * np.sin(t)], axis=1)
    else:
        n = int(rng.integers(4, 7))
        t = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
        rad = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.4, 0.6))
        local = np.stack([rx * rad * np.cos(t), ry * rad * np.sin(t)], axis=1)
    c, s = np.cos(ang), np.sin(ang)
    pts = local @ np.array([[c, s], [-s, c]]) + [cx, cy]
    pts = np.stack([np.clip(pts[:, 0], 0, w), np.clip(pts[:, 1], 0, h)], axis=1)
    return cat, _poly_mask(h, w, pts), pts


def _colour(rng: np.random.Generator, avoid: np.ndarray | None) -> np.ndarray:
    """A random RGB colour at least ``_MIN_CONTRAST`` away (L1) from ``avoid``."""
    for _ in range(32):
        c = rng.uniform(0, 255, 3)
        if avoid is None or np.abs(c - avoid).sum() >= _MIN_CONTRAST:
            return c
    return 255.0 - avoid  # the complement is always far enough


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray, kind: str) -> np.ndarray:
    """A float [H, W, 3] fill around colour ``base``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "flat":
        return np.broadcast_to(base.astype(np.float32), (h, w, 3)).copy()
    if kind == "noise":
        return base + rng.normal(0, rng.uniform(8, 28), (h, w, 3)).astype(np.float32)
    other = np.clip(base + rng.uniform(-70, 70, 3), 0, 255)
    ang = rng.uniform(0, np.pi)
    proj = xx * np.cos(ang) + yy * np.sin(ang)
    if kind == "gradient":
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    elif kind == "stripes":
        t = (np.floor(proj / rng.uniform(2.5, 7.0)) % 2).astype(np.float32)
    else:  # checker
        cell = rng.uniform(3.0, 9.0)
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    return base * (1 - t[..., None]) + other * t[..., None]


def render_scene(rng: np.random.Generator, h: int, w: int, max_objects: int = 5,
                 min_objects: int = 1) -> tuple[np.ndarray, list[SceneObject]]:
    """One image ``uint8 [h, w, 3]`` and its objects (visible masks, in drawing order)."""
    bg = rng.uniform(0, 255, 3)
    img = _texture(rng, h, w, bg, str(rng.choice(TEXTURES, p=[0.3, 0.25, 0.15, 0.1, 0.2])))
    if rng.random() < 0.5:  # low-contrast background texture
        img = 0.6 * img + 0.4 * bg
    objs: list[list] = []  # [category, full mask, visible mask, polygon]
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        for _attempt in range(8):
            cat, mask, pts = _shape(rng, h, w)
            if mask.sum() < MIN_AREA:
                continue
            if all((o[2] & ~mask).sum() >= max(MIN_AREA, (1 - MAX_OCCLUSION) * o[1].sum()) for o in objs):
                break
        else:
            continue
        under = img[mask].mean(axis=0)
        tex = _texture(rng, h, w, _colour(rng, under), str(rng.choice(TEXTURES, p=[0.35, 0.2, 0.15, 0.1, 0.2])))
        img[mask] = tex[mask]
        for o in objs:
            o[2] = o[2] & ~mask
        objs.append([cat, mask, mask.copy(), pts])
    img += rng.normal(0, rng.uniform(0, 6), img.shape)  # sensor noise
    out = [SceneObject(c, vis, None if pts is None or (vis != full).any() else [float(v) for v in pts.reshape(-1)])
           for c, full, vis, pts in objs]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), out


# -- the files ---------------------------------------------------------------------
def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj))


def _object_records(o, ann_id: int, iid: int, h: int, w: int, rng, mask_utils) -> tuple[dict, dict, dict]:
    """One object's COCO annotation, SA-1B annotation and (jittered) detection."""
    rle = mask_utils.encode(np.asfortranarray(o.mask.astype(np.uint8)))
    rle_json = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    seg = [o.polygon] if o.polygon is not None else rle_json
    bbox = _bbox(o.mask)
    area = int(o.mask.sum())
    ann = {"id": ann_id, "image_id": iid, "category_id": o.category_id, "segmentation": seg,
           "bbox": bbox, "area": float(area), "iscrowd": 0}
    sa_ann = {"id": ann_id, "segmentation": rle_json, "bbox": bbox, "area": area,
              "predicted_iou": 1.0, "stability_score": 1.0}
    jitter = rng.normal(0, 1.5, size=4)
    det = {"image_id": iid, "category_id": o.category_id, "score": round(float(rng.uniform(0.5, 1.0)), 4),
           "bbox": [max(0.0, bbox[0] + jitter[0]), max(0.0, bbox[1] + jitter[1]),
                    max(2.0, bbox[2] + jitter[2]), max(2.0, bbox[3] + jitter[3])]}
    return ann, sa_ann, det


def _lvis_labels(rng, mine: list[dict], cat_ids: list[int]) -> tuple[list[int], list[int], list[dict]]:
    """LVIS: some absent categories are verified negative; a category with several
    instances may be marked not exhaustive, and then one instance is left out.
    Returns (negative ids, not-exhaustive ids, the image's kept annotations)."""
    present = sorted({a["category_id"] for a in mine})
    neg = [c for c in cat_ids if c not in present and rng.random() < 0.7]
    not_exh = []
    for c in present:
        inst = [a for a in mine if a["category_id"] == c]
        if len(inst) >= 2 and rng.random() < 0.5:
            not_exh.append(c)
            mine = [a for a in mine if a is not inst[-1]]
    return neg, not_exh, mine


def write_synthetic(out: str | Path, *, n_images: int = 8, seed: int = 0, min_size: int = 64, max_size: int = 160,
                    max_objects: int = 5) -> SyntheticPaths:
    """Write the dataset under ``out`` (created); the same seed writes the same bytes."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    root = Path(out)
    paths = SyntheticPaths(root, root / "images", root / "coco.json", root / "sa1b", root / "detections.json",
                           root / "lvis.json")
    paths.images.mkdir(parents=True, exist_ok=True)
    paths.sa1b.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    lvis_images, lvis_annotations = [], []
    cat_ids = [c["id"] for c in CATEGORIES]
    ann_id = 1
    for i in range(n_images):
        iid = i + 1
        h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        img, objs = render_scene(rng, h, w, max_objects)
        name = f"{iid:06d}.png"
        Image.fromarray(img).save(paths.images / name)
        images.append({"id": iid, "file_name": name, "height": h, "width": w})
        sa_anns, mine = [], []
        for o in objs:
            ann, sa_ann, det = _object_records(o, ann_id, iid, h, w, rng, mask_utils)
            annotations.append(ann)
            mine.append(ann)
            sa_anns.append(sa_ann)
            detections.append(det)
            ann_id += 1
        # A false positive per image, so that AP is not trivially the recall.
        fx, fy = float(rng.uniform(0, w - 10)), float(rng.uniform(0, h - 10))
        detections.append({"image_id": iid, "category_id": int(rng.integers(1, len(CATEGORIES) + 1)),
                           "score": round(float(rng.uniform(0.1, 0.6)), 4), "bbox": [fx, fy, 10.0, 10.0]})
        neg, not_exh, mine = _lvis_labels(rng, mine, cat_ids)
        lvis_annotations.extend(mine)
        lvis_images.append({"id": iid, "coco_url": f"synthetic://images/{name}", "height": h, "width": w,
                            "neg_category_ids": neg, "not_exhaustive_category_ids": not_exh})
        _write_json(paths.sa1b / f"{iid:06d}.json",
                    {"image": {"image_id": iid, "file_name": name, "height": h, "width": w},
                     "annotations": sa_anns})
    info = {"description": "Birkhoff synthetic shapes", "seed": seed}
    _write_json(paths.coco, {"info": info, "images": images, "annotations": annotations,
                             "categories": [{k: v for k, v in c.items() if k != "frequency"} for c in CATEGORIES]})
    _write_json(paths.lvis, {"info": info, "images": lvis_images, "annotations": lvis_annotations,
                             "categories": [dict(c, image_count=sum(c["id"] in {a["category_id"] for a in annotations
                                                                               if a["image_id"] == im["id"]}
                                                                    for im in images)) for c in CATEGORIES]})
    _write_json(paths.detections, detections)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval_jobs.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-size", type=int, default=64)
    ap.add_argument("--max-size", type=int, default=160)
    ap.add_argument("--max-objects", type=int, default=5)
    a = ap.parse_args(argv)
    p = write_synthetic(a.out, n_images=a.images, seed=a.seed, min_size=a.min_size, max_size=a.max_size,
                        max_objects=a.max_objects)
    print(p.spec("coco"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
