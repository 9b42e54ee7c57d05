"""Evaluation: one task per (model, dataset subset), then an exact aggregation.

A task loads the original and the compressed model (through ``ModelLoader``s),
and for each image of its subset computes the embedding once per model, runs
every prompt type batched, and returns per-object IoUs (against the ground truth
and between the two models), COCO results for mAP, a few overlay pictures and
timings. ``aggregate`` sorts every value by (prompt, image, object) and takes
``math.fsum`` means, so the metrics do not depend on how the images were split:
``run_eval(..., executor="ray")`` equals ``executor="local"`` bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .aggregation import DET_BOX, EvalResults, aggregate
from .dataset_locator import DatasetLocator, annotations_sha256, locate
from .datasets import Dataset, DatasetSpec, ImageEntry, decode_masks, load_dataset, load_image, select_images, split_subsets
from .errors import DatasetSpecError
from .metrics import batch_iou, segm_results
from .models import ModelLoader, SamPredictor, SourceResolver, default_loader, is_compressed_dir, recorded_source
from .prompts import ALL_PROMPTS, PromptBatch, PromptType, build_prompts, parse_prompts, xywh_to_xyxy

log = logging.getLogger(__name__)

EVAL_CONFIG_VERSION = 1


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation measures and how it is split.

    - ``limit``/``seed``: a seeded subset of each dataset's images (all when ``None``);
      the seed also draws the random prompt points.
    - ``shards``: shards per (model, dataset); ``None`` = 1 locally, the cluster's CPU
      count on Ray. The metrics never depend on it.
    - ``torch_threads``: intra-op threads of a task (``None``: torch's default locally,
      ``task_cpus`` on Ray).
    - ``overlay_images``: how many images per dataset get overlay pictures.
    """

    version: int = EVAL_CONFIG_VERSION
    prompts: tuple[PromptType, ...] = ALL_PROMPTS
    limit: int | None = None
    seed: int = 0
    shards: int | None = None
    max_prompts: int = 64
    device: str = "cpu"
    torch_threads: int | None = None
    task_cpus: float = 1.0
    overlay_images: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", parse_prompts(self.prompts))
        if self.version != EVAL_CONFIG_VERSION:
            raise DatasetSpecError(f"unknown eval config version {self.version}")
        if self.limit is not None and self.limit < 1:
            raise DatasetSpecError(f"limit must be at least 1, got {self.limit}")
        if self.shards is not None and self.shards < 1:
            raise DatasetSpecError(f"shards must be at least 1, got {self.shards}")
        if self.max_prompts < 1:
            raise DatasetSpecError(f"max_prompts must be at least 1, got {self.max_prompts}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["prompts"] = [p.value for p in self.prompts]
        return d


@dataclass(frozen=True)
class ModelUnderTest:
    """A compressed model, its original, and the datasets it is evaluated on.

    ``compressed`` and ``original`` are what the loaders are called with: local
    paths for the default loader, store and source URIs for the workflow's (which
    fetch and check them on the worker). ``weights`` is the original's provenance
    (``eval_jobs.provenance``) when ``original`` is not a local directory to read it from."""

    compressed: str
    original: str
    datasets: tuple[DatasetSpec, ...]
    name: str = ""
    weights: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", Path(self.compressed).name or str(self.compressed))
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise DatasetSpecError(f"dataset names must be unique per model, got {names}")
        if not self.datasets:
            raise DatasetSpecError(f"model {self.name}: no dataset to evaluate on")


def model_under_test(compressed: str, datasets: Sequence[DatasetSpec], original: str | None = None,
                     name: str = "", resolve_source: SourceResolver | None = None) -> ModelUnderTest:
    """The original defaults to the source recorded in the compressed directory
    (a workflow source through ``resolve_source``: see :func:`models.recorded_source`)."""
    if original is None:
        from compressor.uris import resolve_checkpoint

        # a URI (s3://, models:/) is fetched into the cache here to read its recorded source;
        # the tasks get the URI itself and fetch it on their node (models.default_loader)
        local = resolve_checkpoint(compressed)
        original = recorded_source(local, resolve_source) if is_compressed_dir(local) else compressed
    return ModelUnderTest(str(compressed), str(original), tuple(datasets), name)


@dataclass(frozen=True)
class SubsetTask:
    model: ModelUnderTest
    dataset: DatasetSpec
    subset_index: int
    entries: tuple[ImageEntry, ...]
    config: EvalConfig
    overlay_ids: tuple[int, ...] = ()
    load_original: ModelLoader = default_loader
    load_compressed: ModelLoader = default_loader
    with_map: bool = False
    # on another node: where this dataset is there, and the annotations' hash it must have
    locate_dataset: DatasetLocator | None = None
    annotations_sha256: str | None = None


@dataclass
class SubsetResult:
    model: str
    dataset: str
    subset_index: int
    # (prompt, image_id, ann_id, iou_original, iou_compressed, fidelity)
    scores: list[tuple[str, int, int, float, float, float]] = field(default_factory=list)
    # (image_id, row, fidelity) of detector-box prompts
    det_fidelity: list[tuple[int, int, float]] = field(default_factory=list)
    # ((image_id, row), COCO result) per model, for mask mAP
    segm_original: list[tuple[tuple[int, int], dict]] = field(default_factory=list)
    segm_compressed: list[tuple[tuple[int, int], dict]] = field(default_factory=list)
    overlays: list[dict] = field(default_factory=list)
    images: int = 0
    seconds_original: float = 0.0
    seconds_compressed: float = 0.0
    worker_pid: int = 0


# -- the task ------------------------------------------------------------------------
_PREDICTORS: "OrderedDict[tuple, SamPredictor]" = OrderedDict()
_CACHE_SIZE = 2  # the original and the compressed model of the task at hand


def _predictor(path: str, loader: ModelLoader, cfg: EvalConfig) -> SamPredictor:
    """Models stay loaded in a (Ray worker) process across the subsets it runs."""
    key = (path, getattr(loader, "__module__", ""), getattr(loader, "__qualname__", repr(loader)),
           cfg.device, cfg.max_prompts)
    if key in _PREDICTORS:
        _PREDICTORS.move_to_end(key)
        return _PREDICTORS[key]
    model, processor = loader(path)
    pred = SamPredictor(model, processor, device=cfg.device, max_prompts=cfg.max_prompts)
    _PREDICTORS[key] = pred
    while len(_PREDICTORS) > _CACHE_SIZE:
        _PREDICTORS.popitem(last=False)
    return pred


def _run(pred: SamPredictor, image: np.ndarray, batches: dict[Any, PromptBatch]) -> tuple[dict, float]:
    t0 = time.perf_counter()
    state = pred.set_image(image)
    out = {k: pred.predict(state, b) for k, b in batches.items() if len(b)}
    return out, time.perf_counter() - t0


def evaluate_subset(task: SubsetTask) -> SubsetResult:
    """Run both models on one subset of one dataset."""
    import torch

    cfg = task.config
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    entries = locate(task.dataset, task.entries, task.locate_dataset, task.annotations_sha256)
    orig = _predictor(task.model.original, task.load_original, cfg)
    comp = _predictor(task.model.compressed, task.load_compressed, cfg)
    res = SubsetResult(task.model.name, task.dataset.name, task.subset_index, worker_pid=os.getpid())
    for entry in entries:
        _evaluate_image(task, entry, orig, comp, res)
    return res


def _evaluate_image(task: SubsetTask, entry: ImageEntry, orig: SamPredictor, comp: SamPredictor,
                    res: SubsetResult) -> None:
    """One image: every prompt type through both models, scored into ``res``."""
    cfg = task.config
    image = load_image(entry)
    objs = list(entry.eval_objects())
    gt = decode_masks(entry, objs)
    keep = gt.reshape(len(gt), -1).any(axis=1) if len(gt) else np.zeros(0, dtype=bool)
    objs = [o for o, k in zip(objs, keep) if k]  # an empty mask has nothing to prompt
    gt = gt[keep]
    bboxes = np.array([o.bbox for o in objs], dtype=np.float64).reshape(-1, 4)
    batches: dict[Any, PromptBatch] = dict(build_prompts(entry.image_id, bboxes, gt, cfg.prompts, cfg.seed))
    map_key = _map_prompts(task, entry, bboxes, batches) if task.with_map else None
    out_o, t_o = _run(orig, image, batches)
    out_c, t_c = _run(comp, image, batches)
    res.seconds_original += t_o
    res.seconds_compressed += t_c
    res.images += 1
    for kind in cfg.prompts:
        if kind not in out_o:
            continue
        (m_o, _), (m_c, _) = out_o[kind], out_c[kind]
        iou_o, iou_c, fid = batch_iou(m_o, gt), batch_iou(m_c, gt), batch_iou(m_c, m_o)
        for j, o in enumerate(objs):
            res.scores.append((kind.value, entry.image_id, o.ann_id, float(iou_o[j]), float(iou_c[j]), float(fid[j])))
    if map_key is not None and map_key in out_o:
        _score_map(entry, objs, map_key, out_o, out_c, res)
    if entry.image_id in task.overlay_ids and any(k in out_o for k in cfg.prompts):
        from .reporting import overlay_panels

        kind = PromptType.BOX if PromptType.BOX in out_o else next(k for k in cfg.prompts if k in out_o)
        res.overlays.append({"dataset": task.dataset.name, "image_id": entry.image_id, "prompt": kind.value,
                             **overlay_panels(image, gt, out_o[kind][0], out_c[kind][0], batches[kind])})


def _map_prompts(task: SubsetTask, entry: ImageEntry, bboxes: np.ndarray, batches: dict) -> Any:
    """The prompts mask mAP is scored on (added to ``batches`` when new): a detector's
    boxes where the dataset has them, else the ground-truth boxes."""
    if entry.detections:
        batches[DET_BOX] = PromptBatch(PromptType.BOX, boxes=xywh_to_xyxy([d.bbox for d in entry.detections]))
        return DET_BOX
    if PromptType.BOX in batches:
        return PromptType.BOX
    batches["gt_box"] = PromptBatch(PromptType.BOX, boxes=xywh_to_xyxy(bboxes))
    return "gt_box"


def _score_map(entry: ImageEntry, objs: list, map_key: Any, out_o: dict, out_c: dict, res: SubsetResult) -> None:
    if map_key == DET_BOX:
        cats = [d.category_id for d in entry.detections]
        det_scores = [d.score for d in entry.detections]
        fid = batch_iou(out_c[DET_BOX][0], out_o[DET_BOX][0])
        res.det_fidelity.extend((entry.image_id, j, float(f)) for j, f in enumerate(fid))
    else:
        cats = [o.category_id for o in objs]
        det_scores = None
    for store, out in ((res.segm_original, out_o), (res.segm_compressed, out_c)):
        masks, iou_scores = out[map_key]
        # A detector's box carries its confidence; a ground-truth box only the model's IoU estimate.
        scores = det_scores if det_scores is not None else iou_scores
        for j, r in enumerate(segm_results(entry.image_id, cats, masks, scores)):
            store.append(((entry.image_id, j), r))


# -- planning and execution ------------------------------------------------------------
def plan(models: Sequence[ModelUnderTest], cfg: EvalConfig, shards_per_dataset: int, *,
         load_original: ModelLoader = default_loader, load_compressed: ModelLoader = default_loader,
         locate_dataset: DatasetLocator | None = None,
         ) -> tuple[list[SubsetTask], dict[str, dict[str, tuple[Dataset, tuple[ImageEntry, ...]]]]]:
    """The tasks, and per model the selected images of each dataset. With ``locate_dataset``
    each task finds its dataset on its own node, and checks it against the annotations'
    hash planned here."""
    loaded: dict[DatasetSpec, Dataset] = {}
    hashes: dict[DatasetSpec, str | None] = {}
    tasks: list[SubsetTask] = []
    selected: dict[str, dict] = {}
    for m in models:
        selected[m.name] = {}
        for spec in m.datasets:
            if spec not in loaded:
                loaded[spec] = load_dataset(spec)
                hashes[spec] = annotations_sha256(spec) if locate_dataset is not None else None
            ds = loaded[spec]
            entries = select_images(ds, cfg.limit, cfg.seed)
            selected[m.name][spec.name] = (ds, entries)
            overlay_ids = tuple(e.image_id for e in entries[:cfg.overlay_images])
            for i, part in enumerate(split_subsets(entries, shards_per_dataset)):
                tasks.append(SubsetTask(m, spec, i, part, cfg, overlay_ids, load_original, load_compressed,
                                        with_map=ds.has_map, locate_dataset=locate_dataset,
                                        annotations_sha256=hashes[spec]))
    return tasks, selected


def _run_local(tasks: Sequence[SubsetTask]) -> list[SubsetResult]:
    from tqdm.auto import tqdm

    return [evaluate_subset(t) for t in tqdm(tasks, desc="eval subsets", unit="subset", disable=len(tasks) < 2)]


def _run_ray(tasks: Sequence[SubsetTask]) -> list[SubsetResult]:
    import ray
    from tqdm.auto import tqdm

    remote = ray.remote(evaluate_subset)
    refs = [remote.options(num_cpus=t.config.task_cpus, name=f"eval:{t.model.name}:{t.dataset.name}:{t.subset_index}")
            .remote(_ray_task(t)) for t in tasks]
    index = {r: i for i, r in enumerate(refs)}
    out: list[SubsetResult | None] = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=len(refs), desc="eval subsets (ray)", unit="subset") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for r in done:
                out[index[r]] = ray.get(r)
                bar.update(1)
    return out  # type: ignore[return-value]


def _ray_task(t: SubsetTask) -> SubsetTask:
    """A Ray task gets ``task_cpus`` cores: use that many torch threads unless told otherwise."""
    if t.config.torch_threads:
        return t
    cfg = dataclasses.replace(t.config, torch_threads=max(1, int(t.config.task_cpus)))
    return dataclasses.replace(t, config=cfg)


def ray_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def run_eval(models: Sequence[ModelUnderTest], cfg: EvalConfig = EvalConfig(), *, executor: str = "local",
             ray_address: str | None = None, load_original: ModelLoader = default_loader,
             load_compressed: ModelLoader = default_loader,
             locate_dataset: DatasetLocator | None = None) -> list[EvalResults]:
    """Evaluate every model on its datasets; one ``EvalResults`` per model, in order.

    ``executor="ray"`` fans out one Ray task per (model, dataset subset) on the cluster
    at ``ray_address`` (a local one when ``None`` and none is running).
    """
    if executor not in ("local", "ray"):
        raise DatasetSpecError(f"executor must be 'local' or 'ray', got {executor!r}")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise DatasetSpecError(f"model names must be unique, got {names}")
    if executor == "ray":
        from .ray_cluster import init_ray

        init_ray(ray_address, logging_level=logging.WARNING)  # private loopback Ray unless an address is given
        n_shards = cfg.shards or ray_cpus()
    else:
        n_shards = cfg.shards or 1
    tasks, selected = plan(models, cfg, n_shards, load_original=load_original, load_compressed=load_compressed,
                           locate_dataset=locate_dataset)
    log.info("evaluating %d model(s) in %d task(s) (%s)", len(models), len(tasks), executor)
    results = _run_ray(tasks) if executor == "ray" else _run_local(tasks)
    return [aggregate(m, cfg, selected[m.name], [r for r in results if r.model == m.name]) for m in models]


def evaluate_compressed(compressed_dir: str, datasets: Sequence[str | DatasetSpec], *, original: str | None = None,
                        config: EvalConfig = EvalConfig(), executor: str = "ray", ray_address: str | None = None,
                        parent_run_id: str | None = None, tracking_uri: str | None = None,
                        name: str = "", resolve_source: SourceResolver | None = None,
                        ) -> tuple[EvalResults, str | None]:
    """Evaluate one compressed model directory on datasets (``"FORMAT:ANNOTATIONS:IMAGES"``
    strings or specs) and, when ``parent_run_id`` or ``tracking_uri`` is given, log a
    nested MLflow run. Returns (results, run id or None)."""
    from .datasets import unique_names

    specs = unique_names([d if isinstance(d, DatasetSpec) else DatasetSpec.parse(d) for d in datasets])
    model = model_under_test(compressed_dir, specs, original=original, name=name, resolve_source=resolve_source)
    return evaluate_and_log(model, config, executor=executor, ray_address=ray_address, parent_run_id=parent_run_id,
                            tracking_uri=tracking_uri)


def evaluate_and_log(model: ModelUnderTest, config: EvalConfig = EvalConfig(), *, executor: str = "ray",
                     ray_address: str | None = None, parent_run_id: str | None = None,
                     tracking_uri: str | None = None, load_original: ModelLoader = default_loader,
                     load_compressed: ModelLoader = default_loader, locate_dataset: DatasetLocator | None = None,
                     ) -> tuple[EvalResults, str | None]:
    """The workflow's entry point: one model, its loaders (which may fetch it on the worker)
    and, when ``parent_run_id`` or ``tracking_uri`` is given, a nested MLflow run."""
    results = run_eval([model], config, executor=executor, ray_address=ray_address, load_original=load_original,
                       load_compressed=load_compressed, locate_dataset=locate_dataset)[0]
    run_id = None
    if parent_run_id or tracking_uri:
        from .reporting import log_eval_to_mlflow

        run_id = log_eval_to_mlflow(results, parent_run_id, tracking_uri=tracking_uri)
    return results, run_id
