"""``from_pretrained`` on a compressed directory, through transformers' extension
point for third-party quantization methods (``register_quantization_config`` /
``register_quantizer`` of ``transformers.quantizers.auto``).

``config.json`` of a compressed Hugging Face source names ``quant_method:
"birkhoff"`` (:mod:`compressor.hf_files`). With the method registered,
``AutoModel.from_pretrained(dir)`` and ``SamModel.from_pretrained(dir)`` build
the model with :class:`~compressor.hyperlinear.HyperLinear` layers: the
compressed linears stay compressed. Registration: importing this module does it,
and ``import compressor`` installs a post-import hook that imports it as soon as
transformers loads its quantizer registry, so importing Birkhoff (before or
after transformers) is all a user does; :func:`register` is idempotent.

How the load goes (transformers' weight-conversion loader):

1. before transformers reads any weight, the quantizer loads the checkpoint with
   every check Birkhoff's loader makes (manifest caps, sha256 of every shard,
   tensor and extra file, index ranges), and swaps each linear whose weight is
   compressed for an empty :class:`~compressor.modeling.HyperLinearSlot` (no
   tensor, so no float weight is ever allocated for it);
2. in transformers' loop, every stored tensor goes through one conversion op that
   hands over the tensor decoded from that checked checkpoint (the shard holds
   packed indices, not weights transformers could read); transformers places them
   (dtype, device, tied weights) as for any checkpoint, and reports what the
   checkpoint lacks;
3. after it, the slots become HyperLinear layers built from the stored indices,
   tied weights are re-tied, and a model tensor the checkpoint does not hold (it
   would be random) or a stored tensor the model has no place for is an error.

``save_pretrained`` on such a model (or on one from
:func:`compressor.load_model`) raises: transformers would write the
HyperLinear buffers under names no loader maps back. The compressed directory is
the checkpoint; ``model.dequantize()`` turns the model back into float layers
that save normally. Needs a transformers with the weight-conversion loader
(``transformers.core_model_loading``, transformers 5); one device (no
``device_map`` spread over several). For a Hub repository, download all of it
first (``huggingface_hub.snapshot_download``) and load the local directory:
transformers fetches the weights index and the shards, not the manifest, and the
load refuses, naming the missing manifest.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import format as fmt
from .codec import CODEC_VERSION
from .errors import ConfigError, MissingFileError, MissingTensorError, UnknownFormatError
from .hf_files import CONFIG_NAME, ORIGINAL_CONFIG_NAME, QUANT_METHOD

log = logging.getLogger(__name__)


class BirkhoffConfig(QuantizationConfigMixin):
    """The ``quantization_config`` block of a compressed directory's ``config.json``.

    Refuses a format, format version or codec version this build does not read.
    """

    def __init__(self, format: str = fmt.FORMAT_NAME, format_version: int = fmt.FORMAT_VERSION,
                 codec_version: int = CODEC_VERSION, manifest: str = fmt.MANIFEST_NAME,
                 original_config: str = ORIGINAL_CONFIG_NAME, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.format_version = format_version
        self.codec_version = codec_version
        self.manifest = manifest
        self.original_config = original_config
        where = f"{CONFIG_NAME} (quantization_config)"
        if format != fmt.FORMAT_NAME:
            raise UnknownFormatError(f"format {format!r} is not {fmt.FORMAT_NAME!r}", file=where)
        if format_version not in fmt.CODEC_OF_FORMAT:
            raise UnknownFormatError(f"format_version {format_version!r} is unknown; this build reads versions "
                                     f"{sorted(fmt.CODEC_OF_FORMAT)}", file=where)
        if codec_version != fmt.CODEC_OF_FORMAT[format_version]:
            raise UnknownFormatError(f"codec_version {codec_version!r} is unknown in format version "
                                     f"{format_version}; this build decodes version "
                                     f"{fmt.CODEC_OF_FORMAT[format_version]} there", file=where)
        if manifest != fmt.MANIFEST_NAME:
            raise UnknownFormatError(f"manifest {manifest!r} is not {fmt.MANIFEST_NAME!r}", file=where)
        kwargs.pop("quant_method", None)
        if kwargs:
            log.debug("birkhoff quantization_config: ignoring unknown keys %s", sorted(kwargs))


_SAVE_MESSAGE = ("save_pretrained cannot write a Birkhoff model: transformers would store the HyperLinear "
                 "buffers under names no loader maps back. The compressed directory is the checkpoint (copy "
                 "it, or compress the original again with `birkhoff compress`); call model.dequantize() "
                 "first to save float weights.")


class BirkhoffHfQuantizer(HfQuantizer):
    """Loads a compressed directory into a transformers model (see the module docs)."""

    requires_calibration = True  # only pre-compressed checkpoints: there is no on-the-fly path
    quantization_config: BirkhoffConfig

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.directory: Path | None = None
        self.checkpoint = None  # the CompressedCheckpoint, held from before the load to after it
        self.slots: list[str] = []
        self._saved_ignore = _UNSET

    # -- checks before anything is built --------------------------------------------
    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict):
            devices = set(device_map.values())
            if len(devices) > 1 or devices & {"disk"}:
                raise ConfigError(f"a Birkhoff model loads on one device; got device_map {device_map!r} "
                                  "(pass device_map=None or one device)")
        try:  # the loader this quantizer plugs into
            from transformers.core_model_loading import ConversionOps, WeightConverter  # noqa: F401
        except ImportError as exc:
            raise ConfigError("this transformers has no weight-conversion loader (transformers.core_model_loading);"
                              " load with compressor.load_model(dir) instead") from exc

    # -- before transformers reads weights ------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .checkpoint import CompressedCheckpoint
        from .modeling import compressed_rows_of, hyperlinear_targets, put_slots

        if not checkpoint_files:
            raise MissingFileError("from_pretrained gave the birkhoff quantizer no checkpoint files")
        self.directory = Path(checkpoint_files[0]).parent
        if not (self.directory / fmt.MANIFEST_NAME).is_file():
            raise MissingFileError(f"no {fmt.MANIFEST_NAME} next to the weights transformers resolved (a Hub "
                                   "repository: download all of it, e.g. huggingface_hub.snapshot_download, and "
                                   "load the local directory)", file=str(self.directory / fmt.MANIFEST_NAME))
        # every check Birkhoff's loader makes: manifest caps, sha256 of each shard, tensor and extra file
        self.checkpoint = CompressedCheckpoint.load(self.directory)
        self.slots = hyperlinear_targets(model, compressed_rows_of(self.checkpoint.entries))
        put_slots(model, self.slots)
        # a slot has no tensors: its stored weight and bias are not keys of the model for transformers
        self._saved_ignore = model.__dict__.get(_IGNORE_UNEXPECTED, _UNSET)
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
            rf"^{re.escape(n)}\.(weight|bias)$" for n in self.slots}
        log.info("birkhoff: %s: %d linear layers become HyperLinear", self.directory, len(self.slots))
        return model

    def update_weight_conversions(self, weight_conversions, model):
        # Every stored tensor goes through one op that hands transformers the tensor decoded
        # from the checked checkpoint (the packed indices in the shard are not weights it could
        # load). The stored names are the model's own: no other conversion applies.
        from transformers.core_model_loading import WeightConverter

        return [WeightConverter(source_patterns=r"^(.+)$", target_patterns=r"\1", operations=[_load_op()(self)])]

    def stored_tensor_for(self, name: str, like: torch.Tensor | None, device) -> torch.Tensor:
        """The decoded checkpoint tensor ``name``, in the dtype of the model tensor it fills."""
        entry = self.checkpoint.entries.get(name) if self.checkpoint is not None else None
        if entry is None:
            raise MissingTensorError("tensor is not in the checkpoint", file=str(self.directory), tensor=name)
        t = entry.decode()
        if like is not None and t.is_floating_point() and like.is_floating_point():
            t = t.to(like.dtype)
        return t.to(device) if device is not None else t

    # -- after transformers' loop ------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        from .modeling import check_covered, fill_slots

        try:
            if self._saved_ignore is _UNSET:
                model.__dict__.pop(_IGNORE_UNEXPECTED, None)
            else:
                setattr(model, _IGNORE_UNEXPECTED, self._saved_ignore)
            replaced = fill_slots(model, self.checkpoint.entries, device=_model_device(model))
            if hasattr(model, "tie_weights"):
                model.tie_weights()
            check_covered(model, self.checkpoint.entries, replaced, where=str(self.directory / fmt.MANIFEST_NAME))
            log.info("birkhoff: loaded %s: %d HyperLinear layers, %d tensors", self.directory, len(replaced),
                     len(self.checkpoint.entries))
        finally:
            self.checkpoint = None  # the layers own their indices now
        return model

    # -- what transformers asks about the result ---------------------------------------------
    def is_serializable(self, *args, **kwargs) -> bool:
        log.warning(_SAVE_MESSAGE)
        return False

    @property
    def is_trainable(self) -> bool:
        return False

    def _dequantize(self, model, dtype=None):
        """HyperLinear layers back to ``nn.Linear`` with decoded float weights (``model.dequantize()``)."""
        from .hyperlinear import HyperLinear
        from .hyperlinear.lattice_module import LatticeLinear

        for name, mod in list(model.named_modules()):
            if not isinstance(mod, (HyperLinear, LatticeLinear)):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            w = mod.dequantize(dtype=dtype or torch.float32) if isinstance(mod, LatticeLinear) else \
                mod.dequantize(dtype=dtype)
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=w.device,
                            dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias.to(w.dtype))
            setattr(parent, attr, lin)
        return model


_UNSET = object()
_IGNORE_UNEXPECTED = "_keys_to_ignore_on_load_unexpected"
_OP_CLASS = None


def _load_op():
    """The conversion op class (defined on first use: transformers' loader module is
    imported only when a model loads, never while transformers imports its registry)."""
    global _OP_CLASS
    if _OP_CLASS is None:
        from transformers.core_model_loading import ConversionOps

        class BirkhoffLoad(ConversionOps):
            """Replaces a stored tensor by its decoded, checked value."""

            def __init__(self, hf_quantizer: BirkhoffHfQuantizer):
                self.hf_quantizer = hf_quantizer  # also tells transformers not to cast the packed input

            def __deepcopy__(self, memo):
                # transformers deep-copies the converter once per tensor: share the quantizer
                # (and the checkpoint it holds) instead of copying it each time
                return self

            def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None,
                        model=None, **kwargs):
                stored = next(iter(input_dict.values()))
                stored = stored[0] if isinstance(stored, list) else stored
                like = model.get_parameter_or_buffer(full_layer_name) if model is not None else None
                return {full_layer_name: self.hf_quantizer.stored_tensor_for(full_layer_name, like,
                                                                             getattr(stored, "device", None))}

        _OP_CLASS = BirkhoffLoad
    return _OP_CLASS


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def register() -> None:
    """Make ``quant_method: "birkhoff"`` known to transformers (idempotent)."""
    from transformers.quantizers import auto

    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is BirkhoffConfig and \
            auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is BirkhoffHfQuantizer:
        return
    # a stale registration (a reloaded module) is replaced, not an error
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
    auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
    auto.register_quantization_config(QUANT_METHOD)(BirkhoffConfig)
    auto.register_quantizer(QUANT_METHOD)(BirkhoffHfQuantizer)
    log.debug("registered the %r quantization method with transformers", QUANT_METHOD)


def mark_quantized(model: nn.Module, quantization_config: dict | None) -> None:
    """Give a model built by :func:`compressor.load_model` what ``from_pretrained``
    gives it: ``config.quantization_config`` and ``hf_quantizer`` (so that
    ``save_pretrained`` refuses and ``dequantize()`` works the same way)."""
    qc = BirkhoffConfig(**(quantization_config or {}))
    model.hf_quantizer = BirkhoffHfQuantizer(qc, pre_quantized=True)
    model.quantization_method = QUANT_METHOD
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = qc


# importing this module makes the method known (whichever of it and transformers comes first)
register()
_IMPORTED = True
