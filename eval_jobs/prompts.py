"""The paper's prompt types, drawn from the ground truth with a seed.

Every random draw comes from a generator seeded by ``(seed, image_id, prompt
type)``, so an object gets the same prompt whichever subset, worker or model
handles it: the original and the compressed model always see identical prompts.

Coordinates are in the original image's pixels, ``(x, y)``, a pixel's centre
being ``(col + 0.5, row + 0.5)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import numpy as np

from .errors import DatasetSpecError


class PromptType(str, Enum):
    BOX = "box"
    BOX_CENTER = "box_center"
    MASK_CENTER = "mask_center"
    MASK_RAND1 = "mask_rand1"
    MASK_RAND2 = "mask_rand2"

    @property
    def index(self) -> int:
        return list(PromptType).index(self)


ALL_PROMPTS: tuple[PromptType, ...] = tuple(PromptType)
# The spellings of the paper's tables, accepted on the command line.
_ALIASES = {
    "box": PromptType.BOX, "box-center": PromptType.BOX_CENTER, "box_center": PromptType.BOX_CENTER,
    "mask-center": PromptType.MASK_CENTER, "mask_center": PromptType.MASK_CENTER,
    "mask-rand": PromptType.MASK_RAND1, "mask-rand-1": PromptType.MASK_RAND1, "mask-rand1": PromptType.MASK_RAND1,
    "mask_rand1": PromptType.MASK_RAND1, "mask-rand-1pt": PromptType.MASK_RAND1,
    "mask-rand-2": PromptType.MASK_RAND2, "mask-rand2": PromptType.MASK_RAND2, "mask_rand2": PromptType.MASK_RAND2,
    "mask-rand-2pt": PromptType.MASK_RAND2,
}


def parse_prompts(text: str | Sequence[str] | None) -> tuple[PromptType, ...]:
    """``"box,mask_center"`` (or a list) -> prompt types in canonical order; ``None`` -> all."""
    if text is None:
        return ALL_PROMPTS
    items = text.split(",") if isinstance(text, str) else list(text)
    out = set()
    for it in items:
        key = str(it.value if isinstance(it, PromptType) else it).strip().lower()
        if not key:
            continue
        if key == "all":
            out.update(ALL_PROMPTS)
            continue
        if key not in _ALIASES:
            raise DatasetSpecError(f"unknown prompt type {it!r}; known: {', '.join(p.value for p in ALL_PROMPTS)}")
        out.add(_ALIASES[key])
    if not out:
        raise DatasetSpecError("no prompt type given")
    return tuple(p for p in ALL_PROMPTS if p in out)


@dataclass(frozen=True)
class PromptBatch:
    """All prompts of one type for one image, one row per object.

    ``boxes``: ``[N, 4]`` (x1, y1, x2, y2); ``points``: ``[N, P, 2]`` (x, y) with
    ``labels`` ``[N, P]`` (1 = foreground).
    """

    kind: PromptType
    boxes: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes) if self.boxes is not None else len(self.points)

    def chunk(self, start: int, stop: int) -> "PromptBatch":
        cut = lambda a: None if a is None else a[start:stop]  # noqa: E731
        return PromptBatch(self.kind, cut(self.boxes), cut(self.points), cut(self.labels))


def xywh_to_xyxy(bboxes: np.ndarray) -> np.ndarray:
    b = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)


def _rng(seed: int, image_id: int, kind: PromptType) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(image_id) & 0xFFFFFFFFFFFF, kind.index])


def mask_center_point(mask: np.ndarray) -> np.ndarray:
    """The centroid of the mask's pixels; when it falls outside the mask (a ring,
    a crescent) the centre of the mask pixel nearest to it (first in raster order
    on ties), so that the prompt is always a foreground point."""
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    r, c = int(np.floor(cy)), int(np.floor(cx))
    if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c]:
        return np.array([cx, cy])
    d2 = (xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2
    i = int(np.argmin(d2))
    return np.array([xs[i] + 0.5, ys[i] + 0.5])


def random_mask_points(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct mask pixels' centres (with repeats only if the mask is smaller than ``k``)."""
    ys, xs = np.nonzero(mask)
    pick = rng.choice(len(xs), size=k, replace=len(xs) < k)
    return np.stack([xs[pick] + 0.5, ys[pick] + 0.5], axis=1)


def build_prompts(image_id: int, bboxes_xywh: np.ndarray, masks: np.ndarray,
                  kinds: Sequence[PromptType], seed: int) -> dict[PromptType, PromptBatch]:
    """Prompts of each type for the objects of one image (rows follow ``masks``).

    Objects with an empty mask must have been removed by the caller (they have
    no pixel to prompt and no IoU).
    """
    out: dict[PromptType, PromptBatch] = {}
    n = len(masks)
    boxes = xywh_to_xyxy(bboxes_xywh)
    for kind in kinds:
        if kind is PromptType.BOX:
            out[kind] = PromptBatch(kind, boxes=boxes)
            continue
        if kind is PromptType.BOX_CENTER:
            pts = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)[:, None, :]
        elif kind is PromptType.MASK_CENTER:
            pts = np.stack([mask_center_point(m) for m in masks])[:, None, :] if n else np.zeros((0, 1, 2))
        else:
            k = 1 if kind is PromptType.MASK_RAND1 else 2
            rng = _rng(seed, image_id, kind)
            pts = np.stack([random_mask_points(m, k, rng) for m in masks]) if n else np.zeros((0, k, 2))
        out[kind] = PromptBatch(kind, points=pts.astype(np.float64),
                                labels=np.ones(pts.shape[:2], dtype=np.int64))
    return out
