"""Where a dataset's files are on the node that runs an evaluation task.

The driver plans with its own copy of a dataset (it reads the annotations to pick
the images and, afterwards, to score mAP). A worker on another node cannot read
the driver's paths: the task carries a :data:`DatasetLocator`, a picklable
callable injected by the layer above (the workflow resolves the zoo's dataset
on the worker: it generates the synthetic set into that node's cache, or checks a
shared path is visible there). The task re-roots its images into the located
copy and refuses a copy whose annotations differ from those the driver planned
with (:class:`DatasetChangedError`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePath
from typing import Callable, Sequence

from .datasets import DatasetSpec, ImageEntry
from .errors import DatasetChangedError, DatasetError

# a dataset spec as the driver planned with -> the same dataset's spec on this node
DatasetLocator = Callable[[DatasetSpec], DatasetSpec]


def annotations_sha256(spec: DatasetSpec) -> str:
    """sha256 of the annotations (one file, or an SA-1B folder of per-image JSON
    files: their sorted names and bytes) and of the detections file, if any."""
    h = hashlib.sha256()
    paths = [Path(spec.annotations)] + ([Path(spec.detections)] if spec.detections else [])
    for root in paths:
        files = sorted(p for p in root.rglob("*.json") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            try:
                data = f.read_bytes()
            except OSError as exc:
                raise DatasetError(f"cannot read the annotations: {exc}", file=str(f)) from exc
            rel = f.relative_to(root).as_posix() if root.is_dir() else root.name
            h.update(f"{rel}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()


def rebase_entries(entries: Sequence[ImageEntry], old_images: str, new_images: str) -> tuple[ImageEntry, ...]:
    """The same images, under the located copy's image folder."""
    import dataclasses

    if os.path.normpath(old_images) == os.path.normpath(new_images):
        return tuple(entries)
    out = []
    for e in entries:
        try:
            rel = PurePath(e.path).relative_to(PurePath(old_images))
        except ValueError:
            raise DatasetError(f"image path is not under the dataset's image folder {old_images}",
                               file=e.path, item=f"image {e.image_id}") from None
        out.append(dataclasses.replace(e, path=str(PurePath(new_images) / rel)))
    return tuple(out)


def locate(spec: DatasetSpec, entries: Sequence[ImageEntry], locator: DatasetLocator | None,
           want_sha256: str | None) -> tuple[ImageEntry, ...]:
    """The task's entries on this node: unchanged without a locator; else re-rooted into
    the located copy, whose annotations must hash to ``want_sha256``."""
    if locator is None:
        return tuple(entries)
    local = locator(spec)
    if local.format != spec.format:
        raise DatasetError(f"the located copy of dataset {spec.name} is {local.format}, planned as {spec.format}",
                           file=local.annotations)
    if want_sha256 is not None:
        got = annotations_sha256(local)
        if got != want_sha256:
            raise DatasetChangedError(
                f"dataset {spec.name}: the annotations on this node hash to {got[:16]}..., the driver planned with "
                f"{want_sha256[:16]}...; they differ, so this node's scores would not be the planned ones",
                file=local.annotations)
    return rebase_entries(entries, spec.images, local.images)
