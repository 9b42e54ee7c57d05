"""Demo SAM models, saved locally: the project's trained SAM and random-init architectures.

Used by ``infra/zoo/demo.yaml`` (``demo:NAME`` sources) so that the demo zoo,
the tests and the benchmark run with no network.

- ``sam-shapes`` is the SAM this project trained (``python -m eval_jobs.train_sam``)
  on procedural shapes, committed under ``eval_jobs/trained/``: the demo's
  mIoU, mAP and fidelity figures are measured on it. It is copied into the cache.
- The others are architectures with a seeded random init (the same bytes on
  every machine with the same torch), saved with ``save_pretrained``, for
  speed, memory and sharding figures. Their directories carry
  ``birkhoff_weights.json`` saying ``random-init``: evaluation and MLflow report
  their accuracy figures as not meaningful.

The small random-init SAM builders draw the vision encoder with std 0.02, like
trained ViT weights. transformers' SAM default (``initializer_range=1e-10``)
makes those weights numerically zero: a codec can only keep them raw (the
relative error limit does), and "compressing" them gives lattice noise millions
of times their size. ``sam-vit-b`` keeps the transformers defaults: it is the
paper anchor's exact checkpoint (HYPERCOMPRESSION.md section 8).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from compressor.format.fsio import atomic_directory
from eval_jobs import tiny_models as tiny

log = logging.getLogger(__name__)

SEED = 0
BUILD_VERSION = 4  # bump when a builder changes: cached builds are keyed by it
# trained models committed with the code: name -> folder under eval_jobs/trained
TRAINED = {"sam-shapes": "sam-shapes"}


# name -> a builder of eval_jobs.tiny_models (the one SAM builder), drawn from the seed
BUILDERS: dict[str, Callable] = {
    "sam-tiny": lambda: tiny.sam_model("sam", tiny.sam_parts(64, 2, 2, 128, 32, 32, initializer_range=0.02)),
    "sam-small": lambda: tiny.sam_model("sam", tiny.sam_parts(192, 4, 4, 256, 64, 64, initializer_range=0.02)),
    "sam-hq-tiny": lambda: tiny.sam_model("sam_hq", tiny.sam_parts(64, 2, 2, 128, 32, 32, initializer_range=0.02)),
    "sam-vit-b": tiny.sam_vit_b,
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("BIRKHOFF_CACHE", Path.home() / ".cache" / "birkhoff")) / "demo-models"


def build(name: str, cache_dir=None) -> Path:
    """Build (once) and return the directory of demo model ``name``.

    The directory is written under a temporary name and renamed, so concurrent
    workers on one node never see half a model.
    """
    import torch

    if name in TRAINED:
        return _copy_trained(name, Path(cache_dir) if cache_dir else default_cache_dir())
    if name not in BUILDERS:
        from .errors import ZooError

        raise ZooError(f"unknown demo model {name!r}; known: {sorted(set(BUILDERS) | set(TRAINED))}")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / f"{name}-v{BUILD_VERSION}-seed{SEED}-torch{torch.__version__.split('+')[0]}"
    # `out` only ever appears by renaming a complete build onto it (and BUILD_VERSION in
    # its name keeps older builds apart), so its existence means it is complete
    if (out / "model.safetensors").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    log.info("building demo model %s into %s", name, out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = BUILDERS[name]()
    # another worker building it at the same time writes the same bytes: the first rename wins
    with atomic_directory(str(root), out.name) as tmp:
        # the processor travels with the model: evaluation rebuilds both from the directory
        tiny.save_random_init(model, tiny.processor_for(model.config), tmp, builder=f"workflows.demo_models:{name}",
                              seed=SEED)
    return out


def trained_dir(name: str) -> Path:
    """The committed folder of trained demo model ``name``."""
    import eval_jobs

    return Path(eval_jobs.__file__).resolve().parent / "trained" / TRAINED[name]


def _copy_trained(name: str, root: Path) -> Path:
    """Copy the committed model into the cache, keyed by its weights' hash, so that a
    recorded source path outlives the checkout (Ray unpacks a job's working dir in a
    temporary place)."""
    import hashlib

    src = trained_dir(name)
    weights = src / "model.safetensors"
    if not weights.is_file():
        from .errors import ZooError

        raise ZooError(f"demo model {name!r}: {weights} is missing (regenerate it: python -m eval_jobs.train_sam "
                       f"{src})")
    h = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    out = root / f"{name}-trained-{h}"
    if (out / "model.safetensors").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with atomic_directory(str(root), out.name) as tmp:  # a concurrent copy is identical: the first wins
        shutil.copytree(src, tmp)
    return out
