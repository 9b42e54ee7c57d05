"""Where a model's weights come from: trained, or a seeded random init.

A model directory built by this project carries ``birkhoff_weights.json``
(``{"weights": "trained" | "random-init", ...}``). A random-init SAM segments
nothing: its mIoU is noise and its compressed twin's fidelity measures only how
many near-zero logits flip sign. The evaluation reads the marker of the original
model and says so (MLflow tags, CLI warning, ``fidelity_meaningful: false``).
A directory without the marker (a Hub checkpoint) is ``unknown``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from compressor.format.fsio import write_atomic

log = logging.getLogger(__name__)

FILENAME = "birkhoff_weights.json"
KINDS = ("trained", "random-init")
TAG_WEIGHTS = "birkhoff.weights"
TAG_MEANINGFUL = "birkhoff.fidelity_meaningful"
RANDOM_INIT_NOTE = ("random-init weights: mIoU, mAP and fidelity of this model are noise (its mask logits sit on "
                    "the threshold), not a measure of the codec")


def write_provenance(model_dir: str | Path, weights: str, **info) -> Path:
    """Write the marker (atomically) into ``model_dir``."""
    if weights not in KINDS:
        raise ValueError(f"weights must be one of {KINDS}, got {weights!r}")
    p = Path(model_dir) / FILENAME
    write_atomic(p, json.dumps({"weights": weights, **info}, indent=1, sort_keys=True))
    return p


def read_provenance(model_dir: str | Path | None) -> dict:
    """The marker of ``model_dir``; ``{"weights": "unknown"}`` without one (or for a non-directory)."""
    if model_dir is None:
        return {"weights": "unknown"}
    p = Path(model_dir) / FILENAME
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return {"weights": "unknown"}
    except (OSError, ValueError) as exc:
        log.warning("unreadable %s (%s): weights' provenance unknown", p, exc)
        return {"weights": "unknown"}
    if not isinstance(data, dict) or data.get("weights") not in KINDS:
        log.warning("%s names no known weights kind: provenance unknown", p)
        return {"weights": "unknown"}
    return data


def weights_kind(model_dir: str | Path | None) -> str:
    return str(read_provenance(model_dir)["weights"])


def provenance_tags(kind: str) -> dict[str, str]:
    """MLflow tags of a model whose weights are ``kind`` (``weights_kind``): whether its
    mIoU and fidelity figures mean anything."""
    tags = {TAG_WEIGHTS: kind}
    if kind == "random-init":
        tags[TAG_MEANINGFUL] = "false"
        tags["birkhoff.note"] = RANDOM_INIT_NOTE
    elif kind == "trained":
        tags[TAG_MEANINGFUL] = "true"
    return tags
