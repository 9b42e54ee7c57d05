"""The product's promise as a regression test: compressing the trained SAM costs at most 0.01 box mIoU.

Runs the real codec on ``eval_jobs/trained/sam-shapes`` and the evaluation on
held-out synthetic images (``eval_jobs.fidelity``). ``CODEC_SETTINGS`` holds the
default codec; a newer codec's presets belong there too, each must pass. A
deliberately coarse setting shows that the check fails when the codec loses
accuracy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.codec_v2 import CodecV2Config
from compressor.config import HyperCompressionConfig
from eval_jobs.fidelity import MAX_DROP, fidelity_check

TRAINED = Path(__file__).resolve().parents[2] / "eval_jobs" / "trained" / "sam-shapes"

# name -> config: the default codec (the paper's settings) and every preset that ships
CODEC_SETTINGS = {
    "default": HyperCompressionConfig(),
    "v2-faithful": CodecV2Config(preset="faithful"),
    "v2-small": CodecV2Config(preset="small"),
}
# A 4 x 4 lattice in a box 8x the default's, and no raw fallback (neither the absolute
# one nor the relative one, whose default 0.5 would keep nearly every tensor raw here):
# every weight lands on one of 16 points per class, about 40x the default's error.
COARSE = HyperCompressionConfig(box_size=0.8, points=(16,), max_classes=1, target_mae=1.0, fallback_mae=1.0,
                                relative_fallback=None)


@pytest.mark.parametrize("name", sorted(CODEC_SETTINGS))
def test_codec_keeps_box_miou_within_one_percent(name, tmp_path):
    rep = fidelity_check(TRAINED, CODEC_SETTINGS[name], work_dir=tmp_path)
    # a check where the codec kept everything raw would prove nothing
    assert rep.compressed_fraction >= 0.9, rep.describe()
    assert rep.miou_original >= 0.74, rep.describe()  # a trained model (measured 0.781): the figures mean something
    assert rep.passed, f"codec setting {name!r} breaks the 1 % promise: {rep.describe()}"
    assert rep.fidelity >= 0.9, rep.describe()


def test_a_coarse_codec_fails_the_check(tmp_path):
    rep = fidelity_check(TRAINED, COARSE, work_dir=tmp_path)
    assert rep.compressed_fraction >= 0.9, rep.describe()
    assert not rep.passed, f"the check cannot fail: {rep.describe()}"
    assert rep.drop > MAX_DROP
