"""Evaluation datasets: COCO / LVIS instance JSON and SA-1B per-image JSON.

Everything here is plain data (dataclasses of numbers and strings) so that a
subset of images travels to a Ray worker cheaply; masks are decoded on the
worker, from the annotation's own segmentation (polygons or RLE), with
pycocotools.

- ``coco`` / ``lvis``: one instance JSON (``images``, ``annotations``,
  ``categories``) plus an image folder. LVIS keeps the COCO layout; its images
  carry ``coco_url`` instead of ``file_name``, so the file name is the URL's last
  part, and each image lists its verified-absent (``neg_category_ids``) and
  partly annotated (``not_exhaustive_category_ids``) categories. Mask AP with
  box prompts: COCO's (pycocotools) for ``coco``, LVIS's federated AP
  (``eval_jobs.lvis_ap``) for ``lvis``; SA-1B has no categories.
- ``sa1b``: a folder of per-image JSON files (``{"image": {...}, "annotations":
  [...]}`` with RLE masks), or one such file, plus the image folder.
- A detector's results file (COCO results format: ``image_id``, ``category_id``,
  ``bbox``, ``score``) supplies the box prompts of the mAP run; the paper used
  detector boxes on COCO.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import DatasetError, DatasetSpecError

log = logging.getLogger(__name__)

FORMATS = ("coco", "lvis", "sa1b")
# COCOeval scores at most this many detections per image (its maxDets[-1]).
MAX_DETECTIONS_PER_IMAGE = 100
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class DatasetSpec:
    """One ``--dataset`` value: ``[NAME=]FORMAT:ANNOTATIONS:IMAGES[:DETECTIONS]``.

    ``name`` keys the metrics (``miou/<name>/<prompt>``); it defaults to the format.
    """

    format: str
    annotations: str
    images: str
    name: str = ""
    detections: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DatasetSpecError(f"dataset format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not self.name:
            object.__setattr__(self, "name", self.format)
        if not _NAME.match(self.name):
            raise DatasetSpecError(f"dataset name {self.name!r} must be letters, digits, '_', '-' or '.'")
        if self.detections is not None and self.format != "coco":
            raise DatasetSpecError(f"detections are only used for mask mAP on coco datasets, not {self.format}")

    @classmethod
    def parse(cls, text: str) -> "DatasetSpec":
        name = ""
        body = text
        head, sep, rest = text.partition("=")
        if sep and ":" not in head:
            name, body = head, rest
        parts = body.split(":")
        if len(parts) not in (3, 4) or not all(parts):
            raise DatasetSpecError(
                f"--dataset takes [NAME=]FORMAT:ANNOTATIONS:IMAGES[:DETECTIONS], got {text!r}")
        return cls(format=parts[0].lower(), annotations=parts[1], images=parts[2], name=name,
                   detections=parts[3] if len(parts) == 4 else None)

    def to_dict(self) -> dict:
        return {"name": self.name, "format": self.format, "annotations": self.annotations,
                "images": self.images, "detections": self.detections}


def unique_names(specs: Sequence[DatasetSpec]) -> list[DatasetSpec]:
    """Give datasets that share a name (two ``coco`` sets) the suffixes -2, -3, ..."""
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        n = seen.get(s.name, 0) + 1
        seen[s.name] = n
        out.append(s if n == 1 else DatasetSpec(s.format, s.annotations, s.images, f"{s.name}-{n}", s.detections))
    if len({s.name for s in out}) != len(out):
        raise DatasetSpecError(f"dataset names collide: {[s.name for s in out]}")
    return out


@dataclass(frozen=True)
class ObjectAnn:
    """One ground-truth object: its box (x, y, w, h) and segmentation as stored."""

    ann_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    segmentation: Any  # polygons (list of lists) or an RLE dict, as in the file
    iscrowd: int = 0


@dataclass(frozen=True)
class Detection:
    category_id: int
    bbox: tuple[float, float, float, float]
    score: float


@dataclass(frozen=True)
class ImageEntry:
    image_id: int
    path: str
    height: int
    width: int
    objects: tuple[ObjectAnn, ...]
    detections: tuple[Detection, ...] = ()

    def eval_objects(self) -> tuple[ObjectAnn, ...]:
        """The objects prompted for mIoU: crowd regions and empty boxes are not objects."""
        return tuple(o for o in self.objects if not o.iscrowd and o.bbox[2] > 0 and o.bbox[3] > 0)


@dataclass(frozen=True)
class Dataset:
    spec: DatasetSpec
    images: tuple[ImageEntry, ...]
    categories: tuple[dict, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def has_map(self) -> bool:
        """Mask AP is measured: COCO's for ``coco``, the federated one for ``lvis``."""
        return self.spec.format in ("coco", "lvis")


# -- reading ---------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise DatasetError("file not found", file=str(path)) from exc
    except (OSError, ValueError) as exc:
        raise DatasetError(f"unreadable JSON: {exc}", file=str(path)) from exc


def _bbox(value, path: Path, item: str) -> tuple[float, float, float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 4):
        raise DatasetError("bbox must be [x, y, w, h]", file=str(path), item=item)
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"bbox holds a non-number: {value!r}", file=str(path), item=item) from exc
    if not all(math.isfinite(v) for v in box) or box[2] < 0 or box[3] < 0:
        raise DatasetError(f"bbox must be finite with w, h >= 0, got {value!r}", file=str(path), item=item)
    return box  # type: ignore[return-value]


def _int(d: dict, key: str, path: Path, item: str) -> int:
    try:
        v = d[key]
    except KeyError as exc:
        raise DatasetError(f"missing key {key!r}", file=str(path), item=item) from exc
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise DatasetError(f"{key!r} must be an integer, got {v!r}", file=str(path), item=item)
    return int(v)


def _check_segmentation(seg, h: int, w: int, path: Path, item: str) -> None:
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise DatasetError("RLE segmentation needs 'size' and 'counts'", file=str(path), item=item)
        if [int(x) for x in seg["size"]] != [h, w]:
            raise DatasetError(f"RLE size {seg['size']} differs from the image's {[h, w]}", file=str(path), item=item)
    elif isinstance(seg, list):
        if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
            raise DatasetError("polygon segmentation must be lists of at least 3 (x, y) pairs",
                               file=str(path), item=item)
    else:
        raise DatasetError(f"segmentation must be polygons or RLE, got {type(seg).__name__}",
                           file=str(path), item=item)


def _image_file(img: dict, images_dir: Path, path: Path, item: str) -> str:
    name = img.get("file_name")
    if not name and img.get("coco_url"):  # LVIS
        name = str(img["coco_url"]).rsplit("/", 1)[-1]
    if not name or not isinstance(name, str):
        raise DatasetError("image has neither 'file_name' nor 'coco_url'", file=str(path), item=item)
    p = (images_dir / name)
    # Annotation files come from outside: a file name must not climb out of the image folder.
    if ".." in Path(name).parts or Path(name).is_absolute():
        raise DatasetError(f"image file name {name!r} leaves the image folder", file=str(path), item=item)
    return str(p)


def _load_coco(spec: DatasetSpec) -> Dataset:
    path = Path(spec.annotations)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DatasetError("instance JSON needs 'images' and 'annotations' lists", file=str(path))
    images_dir = Path(spec.images)
    metas: dict[int, dict] = {}
    for img in data["images"]:
        iid = _int(img, "id", path, "an image")
        item = f"image {iid}"
        if iid in metas:
            raise DatasetError("duplicate image id", file=str(path), item=item)
        h, w = _int(img, "height", path, item), _int(img, "width", path, item)
        if h <= 0 or w <= 0:
            raise DatasetError(f"image size must be positive, got {h}x{w}", file=str(path), item=item)
        metas[iid] = {"path": _image_file(img, images_dir, path, item), "h": h, "w": w, "objects": []}
    seen_ann: set[int] = set()
    for ann in data["annotations"]:
        aid = _int(ann, "id", path, "an annotation")
        item = f"annotation {aid}"
        if aid in seen_ann:
            raise DatasetError("duplicate annotation id", file=str(path), item=item)
        seen_ann.add(aid)
        iid = _int(ann, "image_id", path, item)
        if iid not in metas:
            raise DatasetError(f"annotation refers to unknown image {iid}", file=str(path), item=item)
        m = metas[iid]
        seg = ann.get("segmentation")
        _check_segmentation(seg, m["h"], m["w"], path, item)
        m["objects"].append(ObjectAnn(aid, _int(ann, "category_id", path, item), _bbox(ann.get("bbox"), path, item),
                                      seg, int(ann.get("iscrowd", 0))))
    dets = _load_detections(Path(spec.detections), set(metas)) if spec.detections else {}
    images = tuple(
        ImageEntry(iid, m["path"], m["h"], m["w"], tuple(sorted(m["objects"], key=lambda o: o.ann_id)),
                   dets.get(iid, ()))
        for iid, m in sorted(metas.items()))
    cats = tuple(data.get("categories") or ())
    return Dataset(spec, images, cats)


def _load_detections(path: Path, image_ids: set[int]) -> dict[int, tuple[Detection, ...]]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError("a detections file is a JSON list of {image_id, category_id, bbox, score}", file=str(path))
    per: dict[int, list[Detection]] = {}
    for i, d in enumerate(data):
        item = f"detection #{i}"
        if not isinstance(d, dict):
            raise DatasetError("each detection must be an object", file=str(path), item=item)
        iid = _int(d, "image_id", path, item)
        if iid not in image_ids:
            raise DatasetError(f"detection refers to unknown image {iid}", file=str(path), item=item)
        score = d.get("score")
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DatasetError(f"score must be a finite number, got {score!r}", file=str(path), item=item)
        box = _bbox(d.get("bbox"), path, item)
        if box[2] > 0 and box[3] > 0:
            per.setdefault(iid, []).append(Detection(_int(d, "category_id", path, item), box, float(score)))
    # COCOeval keeps the best maxDets per image; prompting the rest would be wasted work.
    return {iid: tuple(sorted(v, key=lambda d: -d.score)[:MAX_DETECTIONS_PER_IMAGE]) for iid, v in per.items()}


def _load_sa1b(spec: DatasetSpec) -> Dataset:
    root = Path(spec.annotations)
    if root.is_dir():
        files = sorted(root.glob("*.json"))
        if not files:
            raise DatasetError("no *.json files in the SA-1B annotation folder", file=str(root))
    elif root.is_file():
        files = [root]
    else:
        raise DatasetError("file not found", file=str(root))
    images_dir = Path(spec.images)
    out: dict[int, ImageEntry] = {}
    for f in files:
        data = _read_json(f)
        if not isinstance(data, dict) or not isinstance(data.get("image"), dict) \
                or not isinstance(data.get("annotations"), list):
            raise DatasetError("SA-1B JSON needs an 'image' object and an 'annotations' list", file=str(f))
        img = data["image"]
        iid = _int(img, "image_id", f, "the image")
        item = f"image {iid}"
        if iid in out:
            raise DatasetError("duplicate image id across SA-1B files", file=str(f), item=item)
        h, w = _int(img, "height", f, item), _int(img, "width", f, item)
        objs = []
        for ann in data["annotations"]:
            aid = _int(ann, "id", f, f"an annotation of image {iid}")
            seg = ann.get("segmentation")
            if not isinstance(seg, dict):
                raise DatasetError("SA-1B segmentations are RLE objects", file=str(f), item=f"annotation {aid}")
            _check_segmentation(seg, h, w, f, f"annotation {aid}")
            objs.append(ObjectAnn(aid, 1, _bbox(ann.get("bbox"), f, f"annotation {aid}"), seg, 0))
        out[iid] = ImageEntry(iid, _image_file(img, images_dir, f, item), h, w,
                              tuple(sorted(objs, key=lambda o: o.ann_id)))
    return Dataset(spec, tuple(out[k] for k in sorted(out)), ({"id": 1, "name": "object"},))


def load_dataset(spec: DatasetSpec) -> Dataset:
    """Read the annotations (not the images) of one dataset."""
    if not Path(spec.images).is_dir():
        raise DatasetError("image folder not found", file=spec.images)
    ds = _load_sa1b(spec) if spec.format == "sa1b" else _load_coco(spec)
    log.info("dataset %s: %d images, %d objects", spec.name, len(ds.images),
             sum(len(i.objects) for i in ds.images))
    return ds


def select_images(ds: Dataset, limit: int | None, seed: int) -> tuple[ImageEntry, ...]:
    """A seeded subset of the images that have at least one object, in image-id order.

    The same (limit, seed) picks the same images whatever the machine or shard count.
    """
    usable = [im for im in ds.images if im.eval_objects() or im.detections]
    if limit is None or limit >= len(usable):
        return tuple(usable)
    if limit < 1:
        raise DatasetSpecError(f"--limit must be at least 1, got {limit}")
    rng = np.random.default_rng([int(seed), 0x5EED])
    pick = np.sort(rng.choice(len(usable), size=limit, replace=False))
    return tuple(usable[i] for i in pick)


def split_subsets(entries: Sequence[ImageEntry], n: int) -> list[tuple[ImageEntry, ...]]:
    """Split into at most ``n`` contiguous, non-empty subsets of near-equal size (one
    evaluation task each)."""
    n = max(1, min(int(n), len(entries)))
    bounds = np.linspace(0, len(entries), n + 1).round().astype(int)
    return [tuple(entries[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


# -- masks -------------------------------------------------------------------------
def object_rle(obj: ObjectAnn, height: int, width: int) -> dict:
    """The object's mask as one compressed RLE (pycocotools' annToRLE)."""
    from pycocotools import mask as mask_utils

    seg = obj.segmentation
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    if isinstance(seg.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(seg, height, width)
    counts = seg["counts"]
    return {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}


def decode_masks(entry: ImageEntry, objects: Iterable[ObjectAnn]) -> np.ndarray:
    """Boolean masks ``[N, H, W]`` of the given objects."""
    from pycocotools import mask as mask_utils

    objects = list(objects)
    out = np.zeros((len(objects), entry.height, entry.width), dtype=bool)
    for i, o in enumerate(objects):
        try:
            out[i] = mask_utils.decode(object_rle(o, entry.height, entry.width)).astype(bool)
        except Exception as exc:  # pycocotools raises bare Exceptions on corrupt RLE
            raise DatasetError(f"cannot decode the segmentation: {exc}", item=f"annotation {o.ann_id}") from exc
    return out


def load_image(entry: ImageEntry) -> np.ndarray:
    """The image as ``uint8 [H, W, 3]`` RGB; its size must match the annotation."""
    from PIL import Image

    try:
        with Image.open(entry.path) as im:
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError as exc:
        raise DatasetError("image file not found", file=entry.path, item=f"image {entry.image_id}") from exc
    except OSError as exc:
        raise DatasetError(f"unreadable image: {exc}", file=entry.path, item=f"image {entry.image_id}") from exc
    if arr.shape[:2] != (entry.height, entry.width):
        raise DatasetError(f"image is {arr.shape[1]}x{arr.shape[0]}, the annotation says "
                           f"{entry.width}x{entry.height}", file=entry.path, item=f"image {entry.image_id}")
    return arr
