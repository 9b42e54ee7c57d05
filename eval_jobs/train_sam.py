"""Train the project's own SAM: a small ``transformers`` ``SamModel`` on procedural shapes.

No SAM weights can be downloaded here, and a randomly initialised SAM segments
nothing, so every mIoU, mAP and fidelity figure measured on one is noise. This
script trains a small SAM (ViT encoder 256 px / patch 16, about 0.8M
parameters) from scratch, on the CPU, from a seed, until it segments for real:

- every training image is a fresh scene drawn from ``(seed, step)``, never
  twice; the held-out sets (``write_synthetic``, other seeds) are never trained on;
- every step trains the evaluation's three prompt shapes through its processor
  (a box, one point, two points; ``multimask_output=False``), the box loss weighted most;
- loss: BCE (class-balanced at first, fading into plain BCE) + Dice against the
  binarised target, plus the IoU head against the real IoU; PyTorch's default
  init and frozen N(0, 1) positional features, as the original SAM
  (docs/EVALUATION.md says why each choice, with the measurements).

It writes a Hugging Face directory (``model.safetensors``, ``config.json``, the
``SamProcessor``) and ``birkhoff_weights.json`` (provenance: config, seed, loss
curve, held-out metrics measured with ``eval_jobs.runner``), under a temporary
name renamed into place at the end.

    python -m eval_jobs.train_sam OUT_DIR [--steps N] [--threads T] [--eval-images N] [--arch sam_hq]

``--arch sam_hq`` trains a ``SamHQModel`` of the same shape the same way; none
is committed: transformers' SamHQ decoder (5.24.0) drops the two-way
transformer's image update (benchmarks/check_sam_hq_decoder.py, docs/EVALUATION.md).

The committed model ``eval_jobs/trained/sam-shapes`` is this script's output
with the default config at 2 torch threads (23 minutes on this project's 2-core
VM; a fresh clone regenerates it bit for bit there). Another CPU or thread count
rounds differently: tests check the result by held-out thresholds, not bits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.format.fsio import atomic_directory

log = logging.getLogger(__name__)

TRAIN_CONFIG_VERSION = 1
ARCHS = ("sam", "sam_hq")  # transformers' SamModel, SamHQModel
EVAL_SEED = 90210  # the held-out set of the script's own report (write_synthetic's stream, not training's)
# 256 images (757 objects): the mean box IoU of 48 images moved by +-0.02 with the draw
# (0.744 / 0.766 / 0.767 for one model on three sets), too much to read a 0.75 target from
EVAL_IMAGES = 256


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights."""

    version: int = TRAIN_CONFIG_VERSION
    seed: int = 14
    arch: str = "sam"            # "sam" or "sam_hq" (SAM-HQ: early ViT features fused into an HQ mask)
    steps: int = 1700
    batch_images: int = 8
    prompts_per_image: int = 4
    # model
    image_size: int = 256
    vision_hidden: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    embed_dim: int = 64          # image embedding = prompt encoder = mask decoder width
    decoder_heads: int = 2
    # data (the evaluation set's distribution)
    min_size: int = 64
    max_size: int = 160
    max_objects: int = 5
    box_jitter: float = 0.05     # std of a jittered box's corners, in box sides
    box_jitter_frac: float = 0.15  # share of the boxes that are jittered (the mIoU prompts are exact boxes)
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    iou_loss_weight: float = 1.0
    box_weight: float = 3.0      # loss weights of the three prompt kinds: box mIoU is the promised figure
    point1_weight: float = 1.0
    point2_weight: float = 1.0
    alternate_points: bool = False  # 1pt / 2pt on alternate steps (cheaper steps; measured: learns slower)
    balance_fade: float = 0.3    # balanced BCE fades linearly into plain BCE by this share of steps (0: never)
    hard_dice: bool = True       # Dice against the binarised target (a soft one pays masks to grow)

    def __post_init__(self) -> None:
        if self.version != TRAIN_CONFIG_VERSION:
            raise ValueError(f"unknown train config version {self.version}")
        if self.steps < 1 or self.batch_images < 1 or self.prompts_per_image < 1:
            raise ValueError("steps, batch_images and prompts_per_image must be at least 1")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; known: {', '.join(ARCHS)}")
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of the patch size 16, got {self.image_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config a provenance file records. A field added since it was written
        takes its default (the value every earlier run had); an unknown field is refused."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown train config fields {sorted(unknown)}")
        return cls(**d)


# -- the model -------------------------------------------------------------------------
def build_model(cfg: TrainConfig):
    """(SamModel or SamHQModel, processor) of ``cfg``'s shape, randomly initialised
    from torch's current seed."""
    import torch

    from .tiny_models import processor_for, sam_model

    s, e = cfg.image_size, cfg.embed_dim
    vision = dict(hidden_size=cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
                  num_attention_heads=cfg.vision_heads, mlp_dim=4 * cfg.vision_hidden, image_size=s,
                  patch_size=16, output_channels=e, num_pos_feats=e // 2,
                  # 16 x 16 tokens: global attention in every layer is cheap, no windows
                  window_size=0, global_attn_indexes=list(range(cfg.vision_layers)))
    prompt = dict(hidden_size=e, image_size=s, patch_size=16, mask_input_channels=4)
    decoder = dict(hidden_size=e, mlp_dim=4 * e, num_hidden_layers=2, num_attention_heads=cfg.decoder_heads,
                   iou_head_hidden_dim=e)
    # a SamModel, or a SamHQModel whose HQ mask also reads the first ViT layer's features
    model = sam_model(cfg.arch, (vision, prompt, decoder))
    # transformers' N(0, 0.02) init (meant to be overwritten by a checkpoint) starves the
    # mask head from scratch (gradient norm 0.01 at step 0, against 0.4): PyTorch's, as SAM
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Embedding)):
            mod.reset_parameters()
    # transformers draws the positional Fourier features with std hidden_size // 2: such
    # frequencies hash positions (box IoU stayed near 0 for 150 steps). SAM: std 1, frozen
    pe = model.shared_image_embedding.positional_embedding  # tied to the prompt encoder's
    with torch.no_grad():
        pe.normal_(0.0, 1.0)
    pe.requires_grad_(False)
    return model, processor_for(model.config)


# -- the data ------------------------------------------------------------------------------
@dataclass
class Batch:
    pixel_values: "object"       # [B, 3, S, S]
    boxes: "object"              # [B, P, 4] model-frame xyxy
    points1: "object"            # [B, P, 1, 2]
    points2: "object"            # [B, P, 2, 2]
    targets: "object"            # [B, P, S/2, S/2] soft masks in the model frame (padding = 0)


def _prompts_for(rng: np.random.Generator, mask: np.ndarray, box: np.ndarray, jitter: float, jitter_frac: float):
    """A box, one point and two points for one object, in image pixels (pixel centres at +0.5)."""
    from .prompts import mask_center_point, random_mask_points

    b = box.copy()
    if rng.random() < jitter_frac:
        side = np.array([b[2] - b[0], b[3] - b[1]] * 2)
        b = b + rng.normal(0, jitter, 4) * np.maximum(side, 1.0)
    u = rng.random()
    if u < 0.5:
        p1 = random_mask_points(mask, 1, rng)[0]
    elif u < 0.75:
        p1 = mask_center_point(mask)
    else:
        p1 = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    return b, p1, random_mask_points(mask, 2, rng)


def make_batch(cfg: TrainConfig, step: int, processor) -> Batch:
    """The training batch of ``step``: fresh scenes drawn from ``(seed, step)``, run
    through the evaluation's processor."""
    import torch
    import torch.nn.functional as F

    from .prompts import xywh_to_xyxy
    from .synthetic import _bbox, render_scene

    rng = np.random.default_rng([cfg.seed, step])
    s, p = cfg.image_size, cfg.prompts_per_image
    pv, boxes, pts1, pts2, targets = [], [], [], [], []
    for _ in range(cfg.batch_images):
        objs: list = []
        while not objs:
            h, w = (int(v) for v in rng.integers(cfg.min_size, cfg.max_size + 1, size=2))
            img, objs = render_scene(rng, h, w, cfg.max_objects)
        pick = rng.permutation(len(objs))[:p] if len(objs) >= p else \
            np.concatenate([np.arange(len(objs)), rng.integers(0, len(objs), p - len(objs))])
        chosen = [objs[i] for i in pick]
        b, q1, q2 = zip(*(_prompts_for(rng, o.mask, xywh_to_xyxy(_bbox(o.mask))[0], cfg.box_jitter,
                                          cfg.box_jitter_frac)
                          for o in chosen))
        enc = processor(images=img, return_tensors="pt")
        nh, nw = (int(v) for v in enc["reshaped_input_sizes"][0])
        scale = np.array([nw / w, nh / h])  # SamProcessor's coordinate scaling
        pv.append(enc["pixel_values"][0])
        boxes.append(np.stack(b) * np.tile(scale, 2))
        pts1.append(np.stack(q1)[:, None] * scale)
        pts2.append(np.stack(q2) * scale)
        m = torch.from_numpy(np.stack([o.mask for o in chosen])).float()[:, None]
        m = F.interpolate(m, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        m = F.avg_pool2d(F.pad(m, (0, s - nw, 0, s - nh)), 2)  # soft target at half the model frame
        targets.append(m[:, 0])
    f32 = lambda a: torch.as_tensor(np.stack(a), dtype=torch.float32)  # noqa: E731
    return Batch(torch.stack(pv), f32(boxes), f32(pts1), f32(pts2), torch.stack(targets))


# -- the loss -----------------------------------------------------------------------------
def _loss(out, target, iou_weight: float, balance: float, hard_dice: bool):
    """BCE (class-balanced to the share ``balance``, plain for the rest) + Dice of the
    upsampled logits, and the IoU head's squared error; also the batch's mean IoU."""
    import torch
    import torch.nn.functional as F

    logits = out.pred_masks[:, :, 0]  # [B, P, h, w]
    b, p = logits.shape[:2]
    up = F.interpolate(logits.reshape(b * p, 1, *logits.shape[-2:]), size=target.shape[-2:], mode="bilinear",
                       align_corners=False).reshape(b, p, -1)
    t = target.reshape(b, p, -1)
    # ``balance`` = 1: foreground and background pixels weigh the same. Plain BCE first
    # collapses every mask to empty (objects cover a few % of the frame) and stalls
    # there (measured), but the balance makes masks grow past their boundary
    # (measured: predicted areas 1.2x the truth), so training fades it out.
    el = F.binary_cross_entropy_with_logits(up, t, reduction="none")
    bce = el.mean(-1)
    if balance > 0:
        bal = 0.5 * ((el * t).sum(-1) / t.sum(-1).clamp(min=1) + (el * (1 - t)).sum(-1) / (1 - t).sum(-1).clamp(min=1))
        bce = balance * bal + (1 - balance) * bce
    bce = bce.mean()
    prob = up.sigmoid()
    # Against a soft target, Dice gains from covering any pixel whose target exceeds
    # half the current Dice: where the overlap is poor it pays to grow the mask over
    # the boundary. The binarised target is the IoU's own (measured: held-out box
    # mIoU 0.735 -> 0.740 at equal steps, docs/EVALUATION.md).
    td = (t > 0.5).float() if hard_dice else t
    dice = 1 - (2 * (prob * td).sum(-1) + 1) / (prob.sum(-1) + td.sum(-1) + 1)
    with torch.no_grad():
        pred, gt = up > 0, t > 0.5
        iou = (pred & gt).sum(-1).float() / (pred | gt).sum(-1).clamp(min=1).float()
    iou_loss = F.mse_loss(out.iou_scores[:, :, 0], iou)
    return bce + dice.mean() + iou_weight * iou_loss, float(iou.mean())


# -- training -------------------------------------------------------------------------------
@dataclass
class TrainReport:
    config: dict
    steps: int
    seconds: float
    losses: list[float]            # mean loss per logging window
    train_box_iou: list[float]     # mean box-prompt IoU per logging window
    parameters: int
    heldout: dict | None = None    # metrics of eval_jobs.runner on a held-out synthetic set

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _optimizer(model, cfg: TrainConfig):
    """AdamW (no weight decay on biases, norms and positional tables) and its schedule:
    linear warm-up, then cosine decay."""
    import torch

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "pos" not in n]
    keep = [p for n, p in params if not (p.ndim >= 2 and "pos" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": keep, "weight_decay": 0.0}], lr=cfg.lr)
    warm = min(cfg.warmup, max(1, cfg.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warm if k < warm else 0.5 * (1 + math.cos(math.pi * (k - warm) / max(1, cfg.steps - warm))))
    return opt, sched


def _step_loss(model, batch, cfg: TrainConfig, step: int):
    """The step's loss (box prompts, then one- and two-point prompts, weighted) and
    the train box IoU."""
    import torch

    vis = model.vision_encoder(batch.pixel_values)
    # the image's embeddings, given to each prompt kind's decoder pass (SAM-HQ also takes
    # the ViT's intermediate features; its mask is the SAM and HQ masks' sum, as the
    # evaluation's predictor runs it: hq_token_only=False)
    emb = dict(image_embeddings=vis.last_hidden_state, multimask_output=False)
    if cfg.arch == "sam_hq":
        emb["intermediate_embeddings"] = vis.intermediate_embeddings
    ones = lambda n: torch.ones(batch.boxes.shape[0], batch.boxes.shape[1], n, dtype=torch.long)  # noqa: E731
    bal = 1.0 if cfg.balance_fade <= 0 else max(0.0, 1.0 - step / (cfg.balance_fade * cfg.steps))
    loss_box, iou_box = _loss(model(**emb, input_boxes=batch.boxes),
                              batch.targets, cfg.iou_loss_weight, bal, cfg.hard_dice)
    loss, wsum = cfg.box_weight * loss_box, cfg.box_weight
    if not cfg.alternate_points or step % 2 == 0:
        loss_p1, _ = _loss(model(**emb, input_points=batch.points1, input_labels=ones(1)), batch.targets,
                           cfg.iou_loss_weight, bal, cfg.hard_dice)
        loss, wsum = loss + cfg.point1_weight * loss_p1, wsum + cfg.point1_weight
    if not cfg.alternate_points or step % 2 == 1:
        loss_p2, _ = _loss(model(**emb, input_points=batch.points2, input_labels=ones(2)), batch.targets,
                           cfg.iou_loss_weight, bal, cfg.hard_dice)
        loss, wsum = loss + cfg.point2_weight * loss_p2, wsum + cfg.point2_weight
    return loss / wsum, iou_box


def _train_step(model, opt, sched, batch: Batch, cfg: TrainConfig, step: int) -> tuple[float, float]:
    """One optimiser step; returns its loss and train box IoU."""
    import torch

    loss, iou_box = _step_loss(model, batch, cfg, step)
    value = float(loss.detach())
    if not math.isfinite(value):  # before the update: a diverged step must not move the weights
        raise FloatingPointError(f"training diverged at step {step}: loss {value}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return value, iou_box


def train(cfg: TrainConfig, out_dir: str | Path, *, threads: int | None = None, eval_images: int = EVAL_IMAGES,
          log_every: int = 25) -> TrainReport:
    """Train, write the model directory ``out_dir`` (atomically), and return the report."""
    import torch

    from .provenance import write_provenance

    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, processor = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("training a %s of %.2fM parameters for %d steps (%d images x %d prompts x 3 prompt kinds, "
             "%d torch threads)", type(model).__name__, n_params / 1e6, cfg.steps, cfg.batch_images,
             cfg.prompts_per_image, torch.get_num_threads())
    opt, sched = _optimizer(model, cfg)
    model.train()
    losses, ious, win_l, win_i = [], [], [], []
    t0 = time.perf_counter()
    # The next step's scenes are rendered on a second thread while this step computes
    # (rendering and the processor are about 15 % of a step, mostly outside torch's
    # threads); a batch depends only on (seed, step), so the result is the same as in order.
    with ThreadPoolExecutor(1, thread_name_prefix="train-data") as pool:
        nxt = pool.submit(make_batch, cfg, 0, processor)
        for step in range(cfg.steps):
            batch = nxt.result()
            if step + 1 < cfg.steps:
                nxt = pool.submit(make_batch, cfg, step + 1, processor)
            loss, iou_box = _train_step(model, opt, sched, batch, cfg, step)
            win_l.append(loss)
            win_i.append(iou_box)
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                losses.append(float(np.mean(win_l)))
                ious.append(float(np.mean(win_i)))
                win_l, win_i = [], []
                el = time.perf_counter() - t0
                log.info("step %d/%d  loss %.4f  train box IoU %.3f  lr %.2e  %.1f img/s  ETA %.0f s", step + 1,
                         cfg.steps, losses[-1], ious[-1], sched.get_last_lr()[0],
                         (step + 1) * cfg.batch_images / el, el / (step + 1) * (cfg.steps - step - 1))
    seconds = time.perf_counter() - t0
    model.eval()
    report = TrainReport(cfg.to_dict(), cfg.steps, seconds, losses, ious, n_params)
    with atomic_directory(str(out.parent), out.name, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if eval_images:
            report.heldout = heldout_metrics(tmp, n_images=eval_images)
            log.info("held-out (%d images, seed %d): box mIoU %.4f, mask mAP %.4f", eval_images, EVAL_SEED,
                     report.heldout["miou/box"], report.heldout["map"])
        write_provenance(tmp, "trained", script="python -m eval_jobs.train_sam", torch=torch.__version__,
                         report=report.to_dict())
    return report


def heldout_metrics(model_dir: str | Path, *, n_images: int = EVAL_IMAGES, seed: int = EVAL_SEED) -> dict:
    """mIoU per prompt and mask mAP of ``model_dir`` on a held-out synthetic set,
    through the evaluation runner (the model against itself: the drop is 0)."""
    import tempfile

    from .datasets import DatasetSpec
    from .runner import EvalConfig, model_under_test, run_eval
    from .synthetic import write_synthetic

    with tempfile.TemporaryDirectory(prefix="birkhoff-heldout-") as d:
        syn = write_synthetic(Path(d) / "data", n_images=n_images, seed=seed)
        m = model_under_test(str(model_dir), [DatasetSpec.parse("heldout=" + syn.spec("coco"))],
                             original=str(model_dir))
        r = run_eval([m], EvalConfig(overlay_images=0))[0]
    out = {k.replace("miou_original/heldout/", "miou/"): v for k, v in r.metrics.items()
           if k.startswith("miou_original/heldout/")}
    out["map"] = r.metrics["map_original/heldout"]
    out["mar"] = r.metrics["mar_original/heldout"]
    out.update(images=n_images, seed=seed, objects=r.counts.get("heldout/box", 0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval_jobs.train_sam", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the model directory to write (replaced at the end)")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch-images", type=int, default=TrainConfig.batch_images)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--arch", choices=ARCHS, default=TrainConfig.arch,
                    help="sam: SamModel (the committed sam-shapes); "
                         "sam_hq: SamHQModel (none committed: docs/EVALUATION.md)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="torch intra-op threads (default: min(2, CPUs))")
    ap.add_argument("--eval-images", type=int, default=EVAL_IMAGES,
                    help="held-out images measured at the end (0: none)")
    ap.add_argument("--report", metavar="FILE", help="also write the training report as JSON here")
    ap.add_argument("--log-every", type=int, default=25, help="steps per progress line and loss-curve point")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    cfg = TrainConfig(steps=a.steps, batch_images=a.batch_images, seed=a.seed, arch=a.arch)
    rep = train(cfg, a.out, threads=a.threads, eval_images=a.eval_images, log_every=a.log_every)
    if a.report:
        Path(a.report).write_text(json.dumps(rep.to_dict(), indent=1))
    log.info("wrote %s in %.0f s of training", a.out, rep.seconds)
    return 0


if __name__ == "__main__":
    # Spinning OpenMP workers stall badly when the cores are shared (measured: 10x
    # slower steps with 2 threads on a busy 2-core machine); libgomp reads this once,
    # at load, so a run that has not set it restarts itself with it.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "eval_jobs.train_sam", *sys.argv[1:]])
    raise SystemExit(main())
