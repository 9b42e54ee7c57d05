"""Whole-checkpoint compression with codec v2 (``compress(source, CodecV2Config(...))``).

The rate is decided over the whole checkpoint before any tensor is coded
(:func:`compressor.codec_v2.rate.plan_tensors`): raw or coded, each tensor's role
(a module's ``nn.Embedding`` weights, else the config's name patterns) and its
relative step, from the preset, ``rel_error`` or a ``bits_per_weight`` budget. The
result is a :class:`~compressor.checkpoint.CompressedCheckpoint` like the paper
codec's: ``save`` writes format version 2 through the same writer.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

import torch

from .checkpoint import CompressedCheckpoint, _progress, module_parts, state_dict_info
from .codec import RawTensor
from .codec_v2.config import CodecV2Config
from .codec_v2.entry import encode_entry
from .codec_v2.kernels import resolve
from .codec_v2.rate import TensorPlan, plan_tensors, roles_from_module
from .errors import ConfigError, NonFiniteTensorError
from .sources import open_source

log = logging.getLogger(__name__)


def _encode_all(tensors: Mapping[str, torch.Tensor], cfg: CodecV2Config, roles: Mapping[str, str],
                keep_raw: set[str], progress: bool, backend="auto") -> tuple[dict, float]:
    kernels = resolve(backend)
    t0 = time.perf_counter()
    coded = {n: t for n, t in tensors.items() if n not in keep_raw}
    plans = plan_tensors(coded, cfg, roles=roles, kernels=kernels)
    plans.update({n: TensorPlan(n, "raw", reason="buffer") for n in keep_raw if n in tensors})
    entries: dict = {}
    with _progress(sum(t.numel() for t in tensors.values()), progress, "compress v2") as bar:
        for name, t in tensors.items():
            p = plans[name]
            entries[name] = None
            if p.action == "v2":
                try:
                    entries[name] = encode_entry(name, t, cfg, role=p.role, q=p.q, kernels=kernels)
                except NonFiniteTensorError:
                    raise
                except ValueError as exc:  # a dynamic range the codec refuses: keep it exact
                    log.info("%s: kept raw (%s)", name, exc)
                    p = TensorPlan(name, "raw", reason=str(exc))
            if entries[name] is None:
                entries[name] = RawTensor(name, t.detach().to("cpu").clone(), p.reason or "raw")
            bar.update(t.numel())
    return entries, time.perf_counter() - t0


def encode_one(name: str, tensor: torch.Tensor, cfg: CodecV2Config, kernels, *, file: str | None = None):
    """One tensor with the config's own step for its role (a preset or ``rel_error``;
    a ``bits_per_weight`` budget needs every tensor: :func:`compress_v2`)."""
    from .codec_v2.encode import _as_numpy, role_of, step_for
    from .codec_v2.rate import raw_reason

    if cfg.bits_per_weight is not None:
        raise ConfigError("a bits_per_weight budget is solved over the whole checkpoint at once; shard by shard "
                          "use a preset or rel_error")
    try:
        a = _as_numpy(tensor)[0]
    except TypeError:  # integer / bool tensors
        a = None
    why = "non-float tensor" if a is None else raw_reason(a, cfg)
    if why is None:
        role = role_of(name, cfg)
        try:
            return encode_entry(name, tensor, cfg, role=role, q=step_for(role, cfg), kernels=kernels)
        except NonFiniteTensorError as exc:
            raise NonFiniteTensorError(exc.detail, file=file, tensor=name) from None
        except ValueError as exc:  # a dynamic range the codec refuses: keep it exact
            why = str(exc)
    return RawTensor(name, tensor.detach().to("cpu").clone(), why)


def compress_v2(source, cfg: CodecV2Config, *, progress: bool = False, backend="auto") -> CompressedCheckpoint:
    """See :func:`compressor.checkpoint.compress` (``backend``: which codec-v2 kernels
    code the rows, :func:`compressor.codec_v2.kernels.resolve`; same bits for each)."""
    if isinstance(source, torch.nn.Module):
        sd, extra, info, buffers = module_parts(source)
        entries, seconds = _encode_all(sd, cfg, roles_from_module(source), buffers, progress, backend)
        return CompressedCheckpoint(entries, cfg, info, extra, seconds)
    if isinstance(source, Mapping):
        info = state_dict_info(source)
        entries, seconds = _encode_all(source, cfg, {}, set(), progress, backend)
        return CompressedCheckpoint(entries, cfg, info, {}, seconds)
    src = open_source(source)
    # a bits budget is solved over every tensor at once, so the whole source is read
    tensors = dict(src.read(None))
    entries, seconds = _encode_all(tensors, cfg, {}, set(), progress, backend)
    info = src.describe()
    info["sha256"] = src.source_hash()
    return CompressedCheckpoint(entries, cfg, info, dict(src.extra_file_map()), seconds,
                                tuple(src.protected_paths()))
