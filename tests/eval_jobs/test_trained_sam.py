"""The project's trained SAM: the committed model segments held-out images, and its script still trains.

The full regeneration is an acceptance command, not a CI test:
``python -m eval_jobs.train_sam OUT`` (the script reports the held-out box
mIoU). Here a short run of the same script, same model, same loss, checks that
training lowers the loss and writes a model directory the evaluation loads.

The thresholds below are the committed model's measured level less a small
margin (a regression guard). Issue 14 asks for held-out box mIoU >= 0.75; this
model reaches 0.758 on the script's own report set (256 images, seed 90210)
and 0.781 on the tests' set (24 images, seed 7): docs/EVALUATION.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval_jobs.datasets import DatasetSpec
from eval_jobs.fidelity import HELDOUT_IMAGES, HELDOUT_SEED
from eval_jobs.provenance import read_provenance
from eval_jobs.runner import EvalConfig, model_under_test, run_eval
from eval_jobs.synthetic import write_synthetic
from eval_jobs.train_sam import TrainConfig

REPO = Path(__file__).resolve().parents[2]
TRAINED = REPO / "eval_jobs" / "trained" / "sam-shapes"


def test_committed_model_is_the_scripts_output():
    from transformers import SamModel

    from eval_jobs.models import load_transformers_model

    prov = read_provenance(TRAINED)
    assert prov["weights"] == "trained" and prov["script"] == "python -m eval_jobs.train_sam"
    rep = prov["report"]
    # the default config (a field added since takes its default): regenerable by the plain command
    assert TrainConfig.from_dict(rep["config"]) == TrainConfig()
    # the script's own report: measured 0.758 and 0.528 on 256 images; issue 14's target is 0.75
    assert rep["heldout"]["images"] == 256 and rep["heldout"]["miou/box"] >= 0.75 and rep["heldout"]["map"] > 0.5
    assert rep["losses"][-1] < rep["losses"][0] / 2
    size = (TRAINED / "model.safetensors").stat().st_size
    assert size < 5 * 2**20, f"the committed fixture must stay small, got {size} bytes"
    model, proc = load_transformers_model(str(TRAINED))
    assert isinstance(model, SamModel) and model.config.vision_config.image_size == TrainConfig().image_size
    assert type(proc).__name__ == "SamProcessor"


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("heldout"), n_images=HELDOUT_IMAGES, seed=HELDOUT_SEED)


def test_committed_model_segments_heldout_images(heldout):
    """Every prompt type, COCO and LVIS layouts, on images the model never trained on (SA-1B holds
    the COCO set's objects: its path is covered by the pipeline tests)."""
    specs = [DatasetSpec.parse(heldout.spec("coco")), DatasetSpec.parse(heldout.spec("lvis"))]
    r = run_eval([model_under_test(str(TRAINED), specs, original=str(TRAINED))], EvalConfig(overlay_images=0))[0]
    m = r.metrics
    assert r.weights == "trained" and r.fidelity_meaningful
    # measured (coco): box 0.781; two points 0.68; one point 0.62-0.74; mask AP 0.57.
    # A random-init SAM scores about 0.09 and 0.
    for ds in ("coco", "lvis"):
        assert m[f"miou_original/{ds}/box"] >= 0.74, m
        assert m[f"miou_original/{ds}/mask_rand2"] >= 0.63, m
    for p in ("box_center", "mask_center", "mask_rand1"):  # one point is ambiguous: lower, far above chance
        assert m[f"miou_original/coco/{p}"] >= 0.55, m
    assert m["map_original/coco"] > 0.5 and m["map_original/lvis"] > 0.5, m
    assert r.counts["coco/box"] >= 2.5 * HELDOUT_IMAGES  # several objects per image


def test_training_script_short_run_lowers_the_loss_and_writes_a_model(tmp_path):
    from transformers import SamModel

    from eval_jobs.models import load_transformers_model

    out, report = tmp_path / "model", tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # 100 steps of 4 images: the loss leaves its initial plateau (measured 1.60 -> 1.50 over four windows)
    cmd = [sys.executable, "-m", "eval_jobs.train_sam", str(out), "--steps", "100", "--batch-images", "4",
           "--log-every", "25", "--eval-images", "2", "--threads", "1", "--report", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 100/100" in proc.stderr and "held-out (2 images" in proc.stderr  # progress is logged
    rep = json.loads(report.read_text())
    assert len(rep["losses"]) == 4 and rep["losses"][-1] < rep["losses"][0]
    assert rep["config"] == dict(TrainConfig().to_dict(), steps=100, batch_images=4)
    assert set(rep["heldout"]) >= {"miou/box", "map", "mar"}
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "processor_config.json",
                                              "birkhoff_weights.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written whole, then renamed
    assert read_provenance(out)["weights"] == "trained"
    model, _ = load_transformers_model(str(out))
    assert isinstance(model, SamModel)
    ref = json.loads((TRAINED / "config.json").read_text())
    got = json.loads((out / "config.json").read_text())
    assert got["vision_config"] == ref["vision_config"]  # the same architecture as the committed model
