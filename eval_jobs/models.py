"""Loading SAM-family models and running them on prompts.

A ``ModelLoader`` is any function ``path -> (model, processor)``; the runner
only ever calls one, so the original (transformers) and the compressed model
(``compressor.load_model``) go through the same code. ``SamPredictor`` hides the
three architectures' differences: the image embedding is computed once per
image (``set_image``) and reused by every prompt batch (``predict``).

``Sam2ImageProcessor`` needs torchvision; where it is missing (the CPU image of
this project: PyPI's torchvision wheels are CUDA builds for another torch),
``Sam2ProcessorPil`` does the same steps (square bilinear resize, rescale,
ImageNet normalisation; the same coordinate scaling and mask upsampling as
``Sam2Processor``) with PIL. Both models of a comparison always share the
processor, so fidelity and drop are unaffected; absolute mIoU may differ by the
resize's antialiasing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ModelLoadError
from .prompts import PromptBatch

log = logging.getLogger(__name__)

ModelLoader = Callable[[str], "tuple[Any, Any]"]
# A recorded workflow source (package:, demo:, s3://...) -> a local path or Hub id: the
# zoo's resolver, injected by the layer above (evaluation never imports the workflow).
SourceResolver = Callable[[str], str]
SUPPORTED = ("sam", "sam_hq", "sam2")
MANIFEST = "manifest.json"


# -- paths -------------------------------------------------------------------------
def is_compressed_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def recorded_source(compressed_dir: str | Path, resolve: SourceResolver | None = None) -> str:
    """The original's location recorded by the compressor (``manifest["source"]["uri"]``).

    A workflow-made checkpoint records its zoo source (``package:``, ``demo:``,
    ``s3://``...): ``resolve`` (``workflows.zoo.resolve_source``, passed in by
    ``birkhoff eval`` and the workflow) turns it into a local directory or a Hub id.
    ``hf://`` and ``file://`` need no resolver."""
    from compressor import format as fmt
    from compressor.errors import FormatError

    p = Path(compressed_dir) / MANIFEST
    if not p.is_file():
        raise ModelLoadError(f"not a compressed checkpoint directory: no {MANIFEST} in {compressed_dir}")
    try:
        uri = fmt.read_manifest(compressed_dir)["source"].get("uri")  # the validated reader, as the loader
    except FormatError as exc:
        raise ModelLoadError(f"{p}: {type(exc).__name__}: {exc.detail}; pass --original") from exc
    if not isinstance(uri, str) or not uri:
        raise ModelLoadError(f"{p} records no source uri; pass --original")
    if uri.startswith("hf://"):  # transformers takes the bare Hub id (and revision)
        return uri[len("hf://"):].partition("@")[0]
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        return unquote(urlsplit(uri).path)
    if uri.startswith(_ZOO_SCHEMES):
        if resolve is None:
            raise ModelLoadError(f"{p} records the workflow source {uri!r} and no source resolver was given; "
                                 f"pass --original")
        try:
            resolved = resolve(uri)
        except Exception as exc:
            raise ModelLoadError(f"{p}: cannot resolve the recorded source {uri!r}: {exc}; pass --original") from exc
        if resolved.startswith("hf://"):
            resolved = resolved[len("hf://"):].partition("@")[0]
        return resolved
    return uri


_ZOO_SCHEMES = ("package:", "demo:", "s3://")


def _model_type(path: Path) -> str:
    cfg = path / "config.json"
    try:
        mt = json.loads(cfg.read_text()).get("model_type")
    except FileNotFoundError as exc:
        raise ModelLoadError(f"no config.json in {path}: not a transformers model directory") from exc
    except ValueError as exc:
        raise ModelLoadError(f"unreadable {cfg}: {exc}") from exc
    if mt not in SUPPORTED:
        raise ModelLoadError(f"{cfg}: model_type {mt!r} is not one of {', '.join(SUPPORTED)}")
    return mt


# -- processors --------------------------------------------------------------------
class Sam2ProcessorPil:
    """``Sam2Processor`` without torchvision, for the calls this package makes."""

    def __init__(self, size: dict, image_mean, image_std, rescale_factor: float = 1 / 255):
        self.size = (int(size["height"]), int(size["width"]))
        self.mean = np.asarray(image_mean, dtype=np.float32)
        self.std = np.asarray(image_std, dtype=np.float32)
        self.rescale_factor = float(rescale_factor)
        self.target_size = self.size[0]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Sam2ProcessorPil":
        cfg = json.loads((Path(path) / "preprocessor_config.json").read_text())
        return cls(cfg.get("size", {"height": 1024, "width": 1024}), cfg.get("image_mean", [0.485, 0.456, 0.406]),
                   cfg.get("image_std", [0.229, 0.224, 0.225]), cfg.get("rescale_factor", 1 / 255))

    def save_pretrained(self, path: str | Path) -> None:
        cfg = {"image_processor_type": "Sam2ImageProcessor", "processor_class": "Sam2Processor",
               "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "resample": 2,
               "size": {"height": self.size[0], "width": self.size[1]},
               "mask_size": {"height": self.size[0] // 4, "width": self.size[1] // 4},
               "image_mean": self.mean.tolist(), "image_std": self.std.tolist(),
               "rescale_factor": self.rescale_factor}
        Path(path, "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))

    def __call__(self, images=None, input_boxes=None, input_points=None, input_labels=None, return_tensors="pt"):
        from PIL import Image

        img = np.asarray(images)
        h, w = img.shape[:2]
        out: dict[str, Any] = {"original_sizes": torch.tensor([[h, w]])}
        resized = np.asarray(Image.fromarray(img).resize((self.size[1], self.size[0]), Image.BILINEAR),
                             dtype=np.float32)
        x = (resized * self.rescale_factor - self.mean) / self.std
        out["pixel_values"] = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
        sx, sy = self.target_size / w, self.target_size / h
        if input_boxes is not None:
            b = torch.tensor(input_boxes, dtype=torch.float32)
            b[..., 0::2] *= sx
            b[..., 1::2] *= sy
            out["input_boxes"] = b
        if input_points is not None:
            p = torch.tensor(input_points, dtype=torch.float32)
            p[..., 0] *= sx
            p[..., 1] *= sy
            out["input_points"] = p
            out["input_labels"] = torch.tensor(input_labels, dtype=torch.int64)
        return out

    def post_process_masks(self, masks, original_sizes, mask_threshold=0.0, binarize=True, **_):
        res = []
        for i, size in enumerate(original_sizes.tolist() if torch.is_tensor(original_sizes) else original_sizes):
            m = F.interpolate(masks[i], tuple(int(s) for s in size), mode="bilinear", align_corners=False)
            res.append(m > mask_threshold if binarize else m)
        return res


def load_processor(path: str | Path, model_type: str):
    """The processor saved with the model (``save_pretrained``)."""
    from transformers import SamHQProcessor, SamProcessor

    path = Path(path)
    try:
        if model_type == "sam":
            return SamProcessor.from_pretrained(str(path))
        if model_type == "sam_hq":
            return SamHQProcessor.from_pretrained(str(path))
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            from transformers import Sam2Processor

            return Sam2Processor.from_pretrained(str(path))
        log.info("Sam2ImageProcessor needs torchvision, which is missing; using Sam2ProcessorPil")
        return Sam2ProcessorPil.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the {model_type} processor from {path}: {exc}") from exc


# -- loaders -----------------------------------------------------------------------
def load_transformers_model(path: str) -> tuple[Any, Any]:
    """A ``ModelLoader`` for an uncompressed transformers SAM / SAM-HQ / SAM2 directory."""
    from transformers import Sam2Model, SamHQModel, SamModel

    p = Path(path)
    mt = _model_type(p)
    cls = {"sam": SamModel, "sam_hq": SamHQModel, "sam2": Sam2Model}[mt]
    try:
        model = cls.from_pretrained(str(p))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {mt} weights from {p}: {exc}") from exc
    return model.eval(), load_processor(p, mt)


def load_compressed_model(path: str) -> tuple[Any, Any]:
    """A ``ModelLoader`` for a compressed directory, through ``compressor.load_model``.

    The processor comes from the compressed directory (the compressor copies the
    architecture files) or else from the recorded source.
    """
    try:
        from compressor import load_model  # type: ignore[attr-defined]
    except ImportError:
        try:
            from compressor.modeling import load_model  # type: ignore[no-redef]
        except ImportError as exc:
            raise ModelLoadError(f"compressor.load_model is not available in this build ({exc}); "
                                 f"cannot load the compressed model {path}") from exc
    model = load_model(path)
    p = Path(path)
    has_proc = any((p / n).is_file() for n in ("preprocessor_config.json", "processor_config.json"))
    proc_dir = p if has_proc else Path(recorded_source(p))
    mt = getattr(getattr(model, "config", None), "model_type", None) or _model_type(proc_dir)
    if mt not in SUPPORTED:
        raise ModelLoadError(f"{path}: model_type {mt!r} is not one of {', '.join(SUPPORTED)}")
    return model.eval(), load_processor(proc_dir, mt)


def default_loader(path: str) -> tuple[Any, Any]:
    """Compressed directories through ``compressor.load_model``, the rest through transformers.
    A checkpoint URI (``s3://``, ``models:/``) is fetched into this node's verified cache
    first (:mod:`compressor.uris`): a Ray task gets the URI, never a driver path."""
    from compressor.uris import is_uri, resolve_checkpoint

    if is_uri(path):
        path = str(resolve_checkpoint(path))
    return load_compressed_model(path) if is_compressed_dir(path) else load_transformers_model(path)


# -- prediction ---------------------------------------------------------------------
@dataclass
class ImageState:
    embeddings: Any
    image: np.ndarray
    sizes: dict


class SamPredictor:
    """One SAM-family model and its processor, predicting one mask per prompt.

    ``multimask_output=False`` throughout: the paper scores the single mask SAM
    returns for a prompt. Prompts of one image are batched ``max_prompts`` at a time.
    """

    def __init__(self, model, processor, *, device: str = "cpu", max_prompts: int = 64):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = torch.device(device)
        self.max_prompts = int(max_prompts)
        self.kind = getattr(model.config, "model_type", None)
        if self.kind not in SUPPORTED:
            raise ModelLoadError(f"model_type {self.kind!r} is not one of {', '.join(SUPPORTED)}")

    def _inputs(self, image: np.ndarray, **prompts) -> dict:
        return self.processor(images=image, return_tensors="pt", **prompts)

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> ImageState:
        enc = self._inputs(image)
        pv = enc["pixel_values"].to(self.device)
        emb = self.model.get_image_embeddings(pv)
        sizes = {k: enc[k] for k in ("original_sizes", "reshaped_input_sizes") if k in enc}
        return ImageState(emb, image, sizes)

    @torch.inference_mode()
    def predict(self, state: ImageState, batch: PromptBatch) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks ``[N, H, W]`` at the image's size and the model's IoU scores ``[N]``."""
        h, w = state.image.shape[:2]
        n = len(batch)
        masks = np.zeros((n, h, w), dtype=bool)
        scores = np.zeros(n, dtype=np.float64)
        for start in range(0, n, self.max_prompts):
            part = batch.chunk(start, min(n, start + self.max_prompts))
            m, s = self._predict_chunk(state, part)
            masks[start:start + len(part)] = m
            scores[start:start + len(part)] = s
        return masks, scores

    def _predict_chunk(self, state: ImageState, part: PromptBatch) -> tuple[np.ndarray, np.ndarray]:
        kw: dict[str, Any] = {}
        if part.boxes is not None:
            kw["input_boxes"] = [part.boxes.tolist()]
        if part.points is not None:
            kw["input_points"] = [part.points.tolist()]
            kw["input_labels"] = [part.labels.tolist()]
        enc = self._inputs(state.image, **kw)
        fwd: dict[str, Any] = {"multimask_output": False}
        for k in ("input_boxes", "input_points", "input_labels"):
            if k in enc:
                fwd[k] = enc[k].to(self.device)
        if self.kind == "sam_hq":
            fwd["image_embeddings"], fwd["intermediate_embeddings"] = state.embeddings
        else:
            fwd["image_embeddings"] = state.embeddings
        out = self.model(**fwd)
        pred = out.pred_masks[0].float().cpu()  # [N, 1, h, w]
        if self.kind == "sam2":
            up = self.processor.post_process_masks([pred], state.sizes["original_sizes"])
        else:
            up = self.processor.post_process_masks([pred], state.sizes["original_sizes"],
                                                   state.sizes["reshaped_input_sizes"])
        return up[0][:, 0].numpy().astype(bool), out.iou_scores[0, :, 0].double().cpu().numpy()
