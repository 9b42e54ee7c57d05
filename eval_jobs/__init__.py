"""Birkhoff evaluation jobs: is a compressed SAM model still as accurate as its original?

mIoU per dataset and prompt type (the paper's Box, Box-Center, Mask-Center,
Mask-Rand 1/2 points), COCO mask mAP / mAR, fidelity (mIoU between the two
models' masks) and the drop, fanned out over Ray (one task per model and dataset
shard) and logged to MLflow. Ray and MLflow are imported only where used.
"""

from .datasets import DatasetSpec, load_dataset, select_images
from .errors import DatasetError, DatasetSpecError, EvalError, ModelLoadError
from .metrics import batch_iou, coco_mask_ap, mask_iou
from .models import ModelLoader, SamPredictor, default_loader, load_compressed_model, load_transformers_model
from .prompts import ALL_PROMPTS, PromptType, build_prompts, parse_prompts
from .runner import EvalConfig, EvalResults, ModelUnderTest, evaluate_compressed, model_under_test, run_eval


def log_eval_to_mlflow(results, parent_run_id=None, **kw):
    """See ``eval_jobs.reporting.log_eval_to_mlflow`` (imported lazily: it needs MLflow)."""
    from .reporting import log_eval_to_mlflow as _log

    return _log(results, parent_run_id, **kw)


__all__ = [
    "ALL_PROMPTS", "DatasetError", "DatasetSpec", "DatasetSpecError", "EvalConfig", "EvalError", "EvalResults",
    "ModelLoadError", "ModelLoader", "ModelUnderTest", "PromptType", "SamPredictor", "batch_iou", "build_prompts",
    "coco_mask_ap", "default_loader", "evaluate_compressed", "load_compressed_model", "load_dataset", "load_transformers_model",
    "log_eval_to_mlflow", "mask_iou", "model_under_test", "parse_prompts", "run_eval", "select_images",
]
