"""A small offline evaluation set: images of coloured shapes and their exact masks.

``write_synthetic(out)`` writes, from one seed:

- ``images/NNNNNN.png``: RGB images (sizes drawn from ``[min_size, max_size]``)
  with rectangles, ellipses and triangles of random colours on a noisy background;
- ``coco.json``: COCO instance JSON (polygons for rectangles and triangles, RLE
  for ellipses: both encodings are exercised), ``bbox``, ``area``, ``iscrowd``,
  three ``categories``; masks account for occlusion by later shapes;
- ``sa1b/NNNNNN.json``: the same objects as SA-1B per-image JSON (RLE masks);
- ``detections.json``: detector-style boxes (ground truth boxes, jittered, with
  a score and a few false positives) for the detector-box mAP path.

``python -m eval_jobs.synthetic OUT [--images N] [--seed S]`` does the same from
the shell; the demo evaluates on it (``--dataset coco:OUT/coco.json:OUT/images``).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CATEGORIES = ({"id": 1, "name": "rectangle", "supercategory": "shape"},
              {"id": 2, "name": "ellipse", "supercategory": "shape"},
              {"id": 3, "name": "triangle", "supercategory": "shape"})


@dataclass(frozen=True)
class SyntheticPaths:
    root: Path
    images: Path
    coco: Path
    sa1b: Path
    detections: Path

    def spec(self, fmt: str = "coco", detections: bool = False) -> str:
        """A ``--dataset`` value for this set."""
        if fmt == "sa1b":
            return f"sa1b:{self.sa1b}:{self.images}"
        return f"{fmt}:{self.coco}:{self.images}" + (f":{self.detections}" if detections else "")


def _triangle_mask(h: int, w: int, pts: np.ndarray) -> np.ndarray:
    """Pixels whose centre lies inside the triangle (edge functions, either winding)."""
    yy, xx = np.mgrid[0:h, 0:w]
    px, py = xx + 0.5, yy + 0.5
    d = []
    for i in range(3):
        (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % 3]
        d.append((x1 - x0) * (py - y0) - (y1 - y0) * (px - x0))
    d = np.stack(d)
    return np.all(d >= 0, axis=0) | np.all(d <= 0, axis=0)


def _shape(rng: np.random.Generator, h: int, w: int) -> tuple[int, np.ndarray, list | None]:
    """(category, mask, polygon or None) of one random shape."""
    cat = int(rng.integers(1, 4))
    cx, cy = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
    rx, ry = rng.uniform(0.08, 0.3) * w, rng.uniform(0.08, 0.3) * h
    if cat == 1:
        x0, x1 = int(max(0, cx - rx)), int(min(w, cx + rx))
        y0, y1 = int(max(0, cy - ry)), int(min(h, cy + ry))
        mask = np.zeros((h, w), dtype=bool)
        mask[y0:y1, x0:x1] = True
        return cat, mask, [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]
    if cat == 2:
        yy, xx = np.mgrid[0:h, 0:w]
        mask = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0
        return cat, mask, None
    ang = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
    pts = np.stack([np.clip(cx + rx * np.cos(ang), 0, w), np.clip(cy + ry * np.sin(ang), 0, h)], axis=1)
    return cat, _triangle_mask(h, w, pts), [float(v) for v in pts.reshape(-1)]


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def write_synthetic(out: str | Path, *, n_images: int = 8, seed: int = 0, min_size: int = 64, max_size: int = 160,
                    max_objects: int = 4) -> SyntheticPaths:
    """Write the dataset under ``out`` (created); the same seed writes the same bytes."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    root = Path(out)
    paths = SyntheticPaths(root, root / "images", root / "coco.json", root / "sa1b", root / "detections.json")
    paths.images.mkdir(parents=True, exist_ok=True)
    paths.sa1b.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    ann_id = 1
    for i in range(n_images):
        iid = i + 1
        h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        img = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8) + np.uint8(rng.integers(0, 120))
        shapes = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            cat, mask, poly = _shape(rng, h, w)
            img[mask] = rng.integers(60, 256, size=3).astype(np.uint8)
            shapes.append([cat, mask, poly])
        # Later shapes cover earlier ones: each object's mask is what stays visible.
        for j in range(len(shapes)):
            covered = np.zeros((h, w), dtype=bool)
            for later in shapes[j + 1:]:
                covered |= later[1]
            if (shapes[j][1] & covered).any():
                shapes[j][1] = shapes[j][1] & ~covered
                shapes[j][2] = None  # an occluded polygon no longer describes the mask
        name = f"{iid:06d}.png"
        Image.fromarray(img).save(paths.images / name)
        images.append({"id": iid, "file_name": name, "height": h, "width": w})
        sa_anns = []
        for cat, mask, poly in shapes:
            if poly is not None:  # the ground truth is the polygon as pycocotools rasterises it
                mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w))).astype(bool)
            area = int(mask.sum())
            if area < 4:
                continue
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle_json = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            seg = [poly] if poly is not None else rle_json
            bbox = _bbox(mask)
            annotations.append({"id": ann_id, "image_id": iid, "category_id": cat, "segmentation": seg,
                                "bbox": bbox, "area": float(area), "iscrowd": 0})
            sa_anns.append({"id": ann_id, "segmentation": rle_json, "bbox": bbox, "area": area,
                            "predicted_iou": 1.0, "stability_score": 1.0})
            jitter = rng.normal(0, 1.5, size=4)
            detections.append({"image_id": iid, "category_id": cat, "score": round(float(rng.uniform(0.5, 1.0)), 4),
                               "bbox": [max(0.0, bbox[0] + jitter[0]), max(0.0, bbox[1] + jitter[1]),
                                        max(2.0, bbox[2] + jitter[2]), max(2.0, bbox[3] + jitter[3])]})
            ann_id += 1
        # A false positive per image, so that AP is not trivially the recall.
        fx, fy = float(rng.uniform(0, w - 10)), float(rng.uniform(0, h - 10))
        detections.append({"image_id": iid, "category_id": int(rng.integers(1, 4)),
                           "score": round(float(rng.uniform(0.1, 0.6)), 4), "bbox": [fx, fy, 10.0, 10.0]})
        _write_json(paths.sa1b / f"{iid:06d}.json",
                    {"image": {"image_id": iid, "file_name": name, "height": h, "width": w},
                     "annotations": sa_anns})
    _write_json(paths.coco, {"info": {"description": "Birkhoff synthetic shapes", "seed": seed},
                             "images": images, "annotations": annotations, "categories": list(CATEGORIES)})
    _write_json(paths.detections, detections)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval_jobs.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-size", type=int, default=64)
    ap.add_argument("--max-size", type=int, default=160)
    a = ap.parse_args(argv)
    p = write_synthetic(a.out, n_images=a.images, seed=a.seed, min_size=a.min_size, max_size=a.max_size)
    print(p.spec("coco"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
