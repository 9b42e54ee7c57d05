"""PyTorch state dict files (``.pt/.pth/.bin``): loaded with ``weights_only=True``
only, so a file that needs code to unpickle is refused; keys must be strings."""


from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from .dtypes import NAME_BY_TORCH
from .errors import SourceError
from .source_files import ZIP, TensorInfo, opened, sniff

log = logging.getLogger(__name__)


# -- PyTorch state dicts ----------------------------------------------------------

def _torch_load(f: Path) -> dict[str, torch.Tensor]:
    kw = dict(map_location="cpu", weights_only=True)
    with opened(f) as (p, fd, st):
        is_zip = sniff(fd, st.st_size) == ZIP
        try:
            # mmap avoids reading every tensor up front; it needs the zip format
            obj = torch.load(p, mmap=is_zip, **kw)
        except pickle.UnpicklingError as exc:
            raise SourceError(
                "refused: the file needs code execution to unpickle (only weights_only=True loading is allowed); "
                f"convert it to safetensors. Detail: {str(exc).splitlines()[0] if str(exc) else ''}",
                file=str(f)) from exc
        except Exception as exc:
            raise SourceError(f"not a readable PyTorch checkpoint: {type(exc).__name__}: {str(exc)[:500]}",
                              file=str(f)) from exc
    return _as_state_dict(obj, f)


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _string_keys(d: dict, f: Path) -> dict[str, torch.Tensor]:
    """Keys as strings; two keys with one string form (``1`` and ``"1"``) would
    silently lose a tensor, so they are refused."""
    out: dict[str, torch.Tensor] = {}
    for k, v in d.items():
        if not isinstance(k, (str, int)) or isinstance(k, bool):
            raise SourceError(f"state dict key {k!r} is a {type(k).__name__}, not a string", file=str(f),
                              tensor=str(k))
        name = str(k)
        if name in out:
            raise SourceError(f"two state dict keys read as the same name {name!r} (e.g. 1 and '1')",
                              file=str(f), tensor=name)
        out[name] = v
    return out


def _as_state_dict(obj, f: Path) -> dict[str, torch.Tensor]:
    if _is_tensor_dict(obj):
        return _string_keys(obj, f)
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if _is_tensor_dict(inner):
                log.info("%s: using the nested %r state dict", f, key)
                return _string_keys(inner, f)
    if isinstance(obj, dict) and not obj:
        raise SourceError("the state dict holds no tensors", file=str(f))
    bad = None
    if isinstance(obj, dict):
        bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    raise SourceError("not a state dict of tensors" + (f" (entry {bad!r} is not a tensor)" if bad is not None else ""),
                      file=str(f), tensor=None if bad is None else str(bad))


def _torch_index(d: dict[str, torch.Tensor], f: Path) -> list[TensorInfo]:
    out = []
    for k, t in d.items():
        if t.is_meta:
            raise SourceError("tensor is on the meta device: it has a shape but no data", file=str(f), tensor=k)
        if t.layout != torch.strided or t.is_nested:
            raise SourceError(f"tensor is {'nested' if t.is_nested else t.layout}, not dense (strided); "
                              "convert it with .to_dense()", file=str(f), tensor=k)
        if t.is_quantized:
            raise SourceError(f"quantized tensor ({t.dtype}) is not supported", file=str(f), tensor=k)
        dt = NAME_BY_TORCH.get(t.dtype)
        if dt is None:
            raise SourceError(f"unsupported dtype {t.dtype}", file=str(f), tensor=k)
        out.append(TensorInfo(k, tuple(t.shape), dt, t.numel(), t.numel() * t.element_size(), str(f)))
    return out
