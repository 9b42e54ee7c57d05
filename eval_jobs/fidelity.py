"""The codec's promise, measured: a compressed SAM segments within 1 % (absolute mIoU) of its original.

``fidelity_check(model_dir, config)`` compresses a trained SAM with ``config``
(the real codec, ``compressor.checkpoint.compress``), runs the original and the
compressed model on a held-out synthetic set with box prompts (the evaluation
runner, ``compressor.load_model`` for the compressed one) and reports the mIoU
drop, the fidelity (mIoU of the compressed masks against the original's) and
how much of the model the codec actually encoded: a check where every tensor
fell back to raw would pass without testing anything, so the caller can insist
on a compressed share.

The test suite runs it on ``eval_jobs/trained/sam-shapes`` with the default
codec (it must pass) and with a deliberately coarse one (it must fail).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_DROP = 0.01          # the promise: mIoU within 1 % absolute
HELDOUT_SEED = 7         # write_synthetic's stream; training draws from (seed, step) streams
HELDOUT_IMAGES = 24


@dataclass(frozen=True)
class FidelityReport:
    config: dict
    miou_original: float
    miou_compressed: float
    drop: float                 # original - compressed
    fidelity: float             # mIoU of compressed masks against the original's
    objects: int
    images: int
    compressed_fraction: float  # share of the model's elements the codec encoded (not kept raw)
    ratio: float                # bytes of the source weights / bytes of the compressed directory
    max_drop: float = MAX_DROP

    @property
    def passed(self) -> bool:
        return abs(self.drop) <= self.max_drop

    def describe(self) -> str:
        return (f"box mIoU {self.miou_original:.4f} -> {self.miou_compressed:.4f} (drop {self.drop:+.4f}, "
                f"limit {self.max_drop}), fidelity {self.fidelity:.4f}, {self.objects} objects on {self.images} "
                f"held-out images, {100 * self.compressed_fraction:.1f} % of elements encoded, ratio "
                f"{self.ratio:.2f}x, config {json.dumps(self.config, sort_keys=True)}")


def fidelity_check(model_dir: str | Path, config, *, n_images: int = HELDOUT_IMAGES, seed: int = HELDOUT_SEED,
                   work_dir: str | Path | None = None, max_drop: float = MAX_DROP) -> FidelityReport:
    """Compress ``model_dir`` with ``config`` (a ``HyperCompressionConfig`` or a
    ``CodecV2Config``) and measure the box-prompt drop."""
    from compressor.checkpoint import compress
    from compressor.codecs import config_to_dict

    from compressor.format import read_manifest

    from .datasets import DatasetSpec
    from .runner import EvalConfig, model_under_test, run_eval
    from .synthetic import write_synthetic

    with tempfile.TemporaryDirectory(prefix="birkhoff-fidelity-", dir=work_dir) as d:
        root = Path(d)
        syn = write_synthetic(root / "data", n_images=n_images, seed=seed)
        comp = root / "compressed"
        ckpt = compress(str(model_dir), config)
        ckpt.save(comp)
        manifest = read_manifest(comp)
        total = encoded = 0
        for t in manifest["tensors"].values():
            n = 1
            for s in t["shape"]:
                n *= int(s)
            total += n
            encoded += 0 if t.get("raw") else n
        src_bytes = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
        comp_bytes = sum(p.stat().st_size for p in comp.rglob("*") if p.is_file())
        m = model_under_test(str(comp), [DatasetSpec.parse("heldout=" + syn.spec("coco"))], original=str(model_dir))
        r = run_eval([m], EvalConfig(prompts="box", overlay_images=0))[0]
    met = r.metrics
    rep = FidelityReport(config_to_dict(config), met["miou_original/heldout/box"], met["miou/heldout/box"],
                         met["miou_drop/heldout/box"], met["fidelity_miou/heldout/box"], r.counts["heldout/box"],
                         n_images, encoded / max(total, 1), src_bytes / max(comp_bytes, 1), max_drop)
    log.info("fidelity check %s: %s", "passed" if rep.passed else "FAILED", rep.describe())
    return rep
