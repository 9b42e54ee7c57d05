"""Models with HyperLinear layers: put them into a model, or rebuild a model from a
compressed Hugging Face directory without ever decoding its compressed linears.

* :func:`apply_hyperlinear` swaps, in place, every ``nn.Linear`` whose weight the
  checkpoint compressed (matched by full dotted name) for a :class:`HyperLinear`
  built from the stored indices, and loads every other tensor of the checkpoint.
* :func:`load_model` builds the transformers model on the meta device (no
  allocation), then does the same. The float weights of compressed linears exist
  nowhere, at no point: the layers are built from the indices directly.
* ``from_pretrained`` gets the same model through :mod:`compressor.hf_quantizer`,
  which swaps the compressed linears for empty :class:`HyperLinearSlot` modules
  before transformers allocates anything, then fills them (:func:`fill_slots`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from . import quant_primitives as qp
from .backends import resolve_backend
from .codec import CompressedTensor, RawTensor, TensorEntry
from .errors import MissingTensorError, UnexpectedTensorError
from .hyperlinear import HyperLinear, HyperLinearError

log = logging.getLogger(__name__)

#: tried, in order, when ``config.architectures`` names no transformers model class
FALLBACK_MODEL_CLASSES = ("SamModel", "SamHQModel", "Sam2Model")


def _entries(checkpoint) -> Mapping[str, TensorEntry]:
    entries = getattr(checkpoint, "entries", checkpoint)
    if not isinstance(entries, Mapping):
        raise TypeError(f"checkpoint must be a CompressedCheckpoint or a mapping of entries, "
                        f"got {type(checkpoint).__name__}")
    return entries


def tied_names(model: nn.Module) -> set[str]:
    """Parameter names that share storage with another name (tied weights)."""
    seen: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(n)
    tied = {n for names in seen.values() if len(names) > 1 for n in names}
    for a, b in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        tied.update((a, b))
    return tied


class HyperLinearSlot(nn.Module):
    """Where a :class:`HyperLinear` goes once its indices are read: no tensors at all,
    so a loader that allocates and initializes every model tensor (transformers'
    ``from_pretrained``) never allocates the float weight of a compressed linear.
    :func:`apply_hyperlinear` fills it."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.has_bias = int(in_features), int(out_features), bool(bias)

    @classmethod
    def of(cls, linear: nn.Linear) -> "HyperLinearSlot":
        return cls(linear.in_features, linear.out_features, linear.bias is not None)

    def forward(self, x):
        raise HyperLinearError("this layer's compressed weight was never loaded (an empty HyperLinearSlot)")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"


def _has_bias(mod: nn.Module) -> bool:
    return mod.has_bias if isinstance(mod, HyperLinearSlot) else mod.bias is not None


def _is_target(compressed_rows: Mapping[str, tuple], name: str, mod: nn.Module) -> bool:
    return compressed_rows.get(f"{name}.weight") == (mod.out_features, mod.in_features)


def hyperlinear_targets(model: nn.Module, compressed_rows: Mapping[str, tuple]) -> list[str]:
    """Names of the modules that become :class:`HyperLinear`: ``nn.Linear`` (or
    :class:`HyperLinearSlot`) whose weight is a compressed tensor in the linear
    ``rows`` layout of the same shape (``compressed_rows``: ``tensor name ->
    shape``), not tied to another tensor, not read directly by a
    ``nn.MultiheadAttention`` parent."""
    tied = tied_names(model)
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, HyperLinearSlot)) or not name:
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention):  # it reads out_proj.weight directly
            continue
        if not _is_target(compressed_rows, name, mod):
            continue
        if f"{name}.weight" in tied:
            log.info("%s: weight is tied to another tensor; kept as nn.Linear", name)
            continue
        out.append(name)
    return out


def compressed_rows_of(entries: Mapping[str, TensorEntry]) -> dict[str, tuple]:
    """``tensor name -> shape`` of the compressed tensors in the linear rows layout."""
    return {n: tuple(e.shape) for n, e in entries.items()
            if (isinstance(e, CompressedTensor) and e.layout == qp.LAYOUT_ROWS) or (_is_v2(e) and len(e.shape) == 2)}


def _is_v2(entry) -> bool:
    from .codec_v2.entry import V2Entry

    return isinstance(entry, V2Entry)


def put_slots(model: nn.Module, names) -> None:
    """Swap the named ``nn.Linear`` modules for empty :class:`HyperLinearSlot` modules (in place)."""
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        mod = getattr(parent, attr)
        if isinstance(mod, nn.Linear):
            setattr(parent, attr, HyperLinearSlot.of(mod))


def apply_hyperlinear(model: nn.Module, checkpoint, *, backend: str = "auto", device=None,
                      codec_backend: str = "auto", strict: bool = True) -> list[str]:
    """Replace compressed ``nn.Linear`` modules of ``model`` in place and load the
    checkpoint's other tensors; returns the replaced module names.

    ``checkpoint``: a ``CompressedCheckpoint`` or a mapping ``name -> entry``.
    ``device``: where the HyperLinear layers and loaded tensors go (default: where
    the model's tensors are; CPU for a meta model). ``strict``: a checkpoint tensor
    the model lacks raises :class:`UnexpectedTensorError`. Model tensors absent
    from the checkpoint keep their values (on a meta model they stay meta, which
    :func:`load_model` reports).
    """
    entries = _entries(checkpoint)
    kernels = resolve_backend(codec_backend).kernels
    target = torch.device(device) if device is not None else None

    def dev_of(t: torch.Tensor) -> torch.device:
        if target is not None:
            return target
        return torch.device("cpu") if t.is_meta else t.device

    replaced = fill_slots(model, entries, backend=backend, device=device, codec_backend=codec_backend)
    unexpected = _unexpected(model, entries, replaced)
    if unexpected and strict:
        raise UnexpectedTensorError(f"checkpoint tensors the model does not have: {unexpected[:8]}"
                                    f"{' ...' if len(unexpected) > 8 else ''}", tensor=unexpected[0])
    skip = _hyperlinear_keys(replaced)
    own = model.state_dict(keep_vars=True)
    assign = any(t.is_meta for t in own.values())
    sd: dict[str, torch.Tensor] = {}
    for key, cur in own.items():
        if key in skip or key not in entries:
            continue
        t = entries[key].decode(kernels)
        if tuple(t.shape) != tuple(cur.shape):
            raise HyperLinearError(f"{key}: checkpoint shape {tuple(t.shape)} != model shape {tuple(cur.shape)}")
        sd[key] = t.to(dev_of(cur))
    missing = [k for k in own if k not in skip and k not in sd]
    model.load_state_dict(sd, strict=False, assign=assign)
    if missing:
        log.info("model tensors not in the checkpoint (kept as they are, tied ones re-tied by the caller): %s",
                 missing[:8])
    log.info("apply_hyperlinear: %d linear layers replaced, %d other tensors loaded", len(replaced), len(sd))
    return replaced


def fill_slots(model: nn.Module, checkpoint, *, backend: str = "auto", device=None,
               codec_backend: str = "auto") -> list[str]:
    """Put a :class:`HyperLinear` built from the checkpoint's indices in place of every
    target linear (``nn.Linear`` or :class:`HyperLinearSlot`, see
    :func:`hyperlinear_targets`); returns their names. A slot left unfilled is an error."""
    entries = _entries(checkpoint)
    kernels = resolve_backend(codec_backend).kernels
    target = torch.device(device) if device is not None else None
    replaced: list[str] = []
    for name in hyperlinear_targets(model, compressed_rows_of(entries)):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        mod = getattr(parent, attr)
        bname = f"{name}.bias"
        bias = None
        if _has_bias(mod):
            if bname not in entries:
                raise MissingTensorError("linear bias missing from the checkpoint", tensor=bname)
            bias = entries[bname].decode(kernels)
        w = getattr(mod, "weight", None)
        dev = target or (w.device if w is not None and not w.is_meta else torch.device("cpu"))
        weight = entries[f"{name}.weight"]
        if _is_v2(weight):  # codec v2: the fixed-width lattice form, never float weights
            from .hyperlinear.lattice_module import LatticeLinear

            setattr(parent, attr, LatticeLinear.from_entry(weight, bias, device=dev, name=f"{name}.weight"))
        else:
            setattr(parent, attr, HyperLinear.from_compressed(weight, bias, backend=backend, device=dev))
        replaced.append(name)
    slots = [n for n, m in model.named_modules() if isinstance(m, HyperLinearSlot)]
    if slots:
        raise MissingTensorError(f"{len(slots)} layers expect a compressed linear weight the checkpoint does not "
                                 f"have: {slots[:8]}", tensor=f"{slots[0]}.weight")
    return replaced


def _hyperlinear_keys(replaced) -> set[str]:
    from .hyperlinear.lattice_module import BUFFERS

    return {f"{n}.{s}" for n in replaced for s in ("weight", "bias", "theta", "codec", *BUFFERS)}


def _unexpected(model: nn.Module, entries: Mapping, replaced) -> list[str]:
    known = set(model.state_dict()) | {n for n, _ in model.named_buffers()} | _hyperlinear_keys(replaced)
    # older checkpoints store buffers that are now non-persistent (position ids): the model computes them
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    return [k for k in entries if k not in known and not any(p.search(k) for p in ignore)]


def check_covered(model: nn.Module, checkpoint, replaced, *, where: str | None = None) -> None:
    """Refuse a loaded model that holds a tensor the checkpoint did not give it (it
    would be random), or a checkpoint holding tensors the model has no place for."""
    entries = _entries(checkpoint)
    unexpected = _unexpected(model, entries, replaced)
    if unexpected:
        raise UnexpectedTensorError(f"checkpoint tensors the model does not have: {unexpected[:8]}"
                                    f"{' ...' if len(unexpected) > 8 else ''}", file=where, tensor=unexpected[0])
    tied = tied_names(model)
    hl = _hyperlinear_keys(replaced)
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    missing = [k for k in model.state_dict() if k not in entries and k not in hl and k not in tied
               and not any(p.search(k) for p in ignore)]
    if missing:
        raise MissingTensorError(f"{len(missing)} model tensors are not in the checkpoint (they would be random): "
                                 f"{missing[:8]}", file=where, tensor=missing[0])


def _model_builder(config, model_class) -> Callable:
    import transformers

    if model_class is not None:
        return model_class
    for arch in (getattr(config, "architectures", None) or []):
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    for name in FALLBACK_MODEL_CLASSES:
        cls = getattr(transformers, name, None)
        if cls is not None and getattr(cls, "config_class", None) is type(config):
            return cls
    return transformers.AutoModel.from_config


def _materialize_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (position ids, rotary tables) are in no checkpoint:
    give them real storage and let the model's own initializer compute them. The
    parameters are still on the meta device here, so initializing them costs nothing."""
    named = list(model.named_non_persistent_buffers()) if hasattr(model, "named_non_persistent_buffers") else []
    if not named:
        return
    for key, buf in named:
        mod_name, _, bname = key.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        mod._buffers[bname] = torch.empty_like(buf, device=device)
    for m in model.modules():  # built once on meta: clear the "done" marks so the buffers get computed
        m.__dict__.pop("_is_hf_initialized", None)
    if hasattr(model, "initialize_weights"):
        model.initialize_weights()


def load_model(path, device=None, backend: str = "auto", *, model_class=None, codec_backend: str = "auto"):
    """Rebuild a transformers model from a compressed Hugging Face directory.

    The model class comes from ``config.json`` (``architectures``), else SamModel /
    SamHQModel / Sam2Model by config type, else ``AutoModel``; ``model_class``
    overrides. Compressed linears become :class:`HyperLinear` (``backend``), every
    other tensor is decoded and loaded, tied weights are re-tied. Returns the model
    in eval mode on ``device`` (default CPU), marked quantized like a
    ``from_pretrained`` one (``config.quantization_config``, ``hf_quantizer``: so
    ``save_pretrained`` refuses instead of writing weights that load as random).
    """
    from transformers import AutoConfig

    from .checkpoint import CompressedCheckpoint
    from .uris import resolve_checkpoint

    path = resolve_checkpoint(path)  # a local directory, or s3:// / models:/ fetched into the cache
    device = torch.device(device) if device is not None else torch.device("cpu")
    if not (path / "config.json").is_file():
        raise MissingTensorError("compressed directory has no config.json (needed to build the model)",
                                 file=str(path / "config.json"))
    ckpt = CompressedCheckpoint.load(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    # the block from config.json (None for checkpoints written before it existed); the model
    # is built without it: the HyperLinear layers are put in below, not by transformers
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        del config.quantization_config
    build = _model_builder(config, model_class)
    with torch.device("meta"):
        model = build(config)
    _materialize_non_persistent_buffers(model, device)
    apply_hyperlinear(model, ckpt, backend=backend, device=device, codec_backend=codec_backend)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise MissingTensorError(f"{len(left)} model tensors are in neither the checkpoint nor the model's "
                                 f"initializer: {left[:8]}", file=str(path), tensor=left[0])
    if _is_transformers_model(model):
        from .hf_quantizer import mark_quantized

        mark_quantized(model, quantization if isinstance(quantization, dict) else None)
    model.eval()
    return model


def _is_transformers_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)
