"""Source checkpoints: safetensors files, PyTorch state dicts, Hugging Face
directories and Hub ids, behind one lazy interface.

``tensor_index()`` reads headers only, so a driver can plan work without the
data; ``read(names)`` reads just the named tensors. PyTorch files are loaded with
``weights_only=True`` and nothing else: there is no fallback to full pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import SourceError

log = logging.getLogger(__name__)

_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
_ST_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
                "int16": 2, "int8": 1, "uint8": 1, "bool": 1}
# Files that rebuild a Hugging Face architecture and its processor (copied next to
# the compressed shards)...
ARCHITECTURE_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "image_processor_config.json", "video_preprocessor_config.json",
)
# ...and its tokenizer, so that AutoTokenizer / AutoProcessor on the compressed
# directory give what they give on the source (WordPiece, BPE and SentencePiece files).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.json", "chat_template.jinja",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    nbytes: int
    file: str


class CheckpointSource:
    """A checkpoint on local disk (Hub ids are downloaded to the HF cache first)."""

    def __init__(self, uri: str, kind: str, weight_files: list[Path], extra_files: list[Path] | None = None):
        self.uri = uri
        self.kind = kind
        self.weight_files = [Path(f) for f in weight_files]
        self.extra_files = [Path(f) for f in (extra_files or [])]
        self._index: list[TensorInfo] | None = None
        self._torch_cache: dict[Path, dict[str, torch.Tensor]] = {}

    # -- metadata -------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    def tensor_index(self) -> list[TensorInfo]:
        if self._index is None:
            index: list[TensorInfo] = []
            seen: dict[str, str] = {}
            for f in self.weight_files:
                infos = _safetensors_index(f) if f.suffix == ".safetensors" else _torch_index(self._torch_dict(f), f)
                for info in infos:
                    if info.name in seen:
                        raise SourceError(f"tensor appears in two weight files (also in {seen[info.name]})",
                                          file=str(f), tensor=info.name)
                    seen[info.name] = str(f)
                    index.append(info)
            self._index = index
        return self._index

    def source_hash(self) -> str:
        """sha256 over the weight files' names and bytes (streamed)."""
        h = hashlib.sha256()
        for f in sorted(self.weight_files, key=lambda p: p.name):
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "uri": self.uri,
            "weight_files": [f.name for f in self.weight_files],
            "weight_bytes": self.weight_bytes,
        }

    # -- data -------------------------------------------------------------------
    def read(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for the requested tensors, file by file."""
        index = self.tensor_index()
        wanted = None if names is None else set(names)
        if wanted is not None:
            known = {i.name for i in index}
            missing = sorted(wanted - known)
            if missing:
                raise SourceError(f"tensors not in the source: {missing[:5]}", file=self.uri, tensor=missing[0])
        by_file: dict[str, list[str]] = {}
        for info in index:
            if wanted is None or info.name in wanted:
                by_file.setdefault(info.file, []).append(info.name)
        for fname, tnames in by_file.items():
            f = Path(fname)
            if f.suffix == ".safetensors":
                yield from _safetensors_read(f, tnames)
            else:
                d = self._torch_dict(f)
                for n in tnames:
                    yield n, d[n]

    def _torch_dict(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._torch_cache:
            self._torch_cache[f] = _torch_load(f)
        return self._torch_cache[f]


# -- safetensors ----------------------------------------------------------------

def _safetensors_index(f: Path) -> list[TensorInfo]:
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as fh:
            out = []
            for k in fh.keys():
                sl = fh.get_slice(k)
                shape = tuple(int(d) for d in sl.get_shape())
                dt = _ST_DTYPES.get(sl.get_dtype())
                if dt is None:
                    raise SourceError(f"unsupported dtype {sl.get_dtype()}", file=str(f), tensor=k)
                numel = 1
                for d in shape:
                    numel *= d
                out.append(TensorInfo(k, shape, dt, numel, numel * _ST_ITEMSIZE[dt], str(f)))
            return out
    except SourceError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise SourceError(f"not a readable safetensors file: {exc}", file=str(f)) from exc


def _safetensors_read(f: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as fh:
            for n in names:
                yield n, fh.get_tensor(n)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"cannot read safetensors data: {exc}", file=str(f)) from exc


# -- PyTorch state dicts ----------------------------------------------------------

def _torch_load(f: Path) -> dict[str, torch.Tensor]:
    kw = dict(map_location="cpu", weights_only=True)
    try:
        # mmap avoids reading every tensor up front; it needs the zip format
        obj = torch.load(str(f), mmap=zipfile.is_zipfile(f), **kw)
    except pickle.UnpicklingError as exc:
        raise SourceError(
            "refused: the file needs code execution to unpickle (only weights_only=True loading is allowed); "
            f"convert it to safetensors. Detail: {str(exc).splitlines()[0]}", file=str(f)) from exc
    except Exception as exc:
        raise SourceError(f"not a readable PyTorch checkpoint: {exc}", file=str(f)) from exc
    return _as_state_dict(obj, f)


def _as_state_dict(obj, f: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                log.info("%s: using the nested %r state dict", f, key)
                return {str(k): v for k, v in inner.items()}
    bad = None
    if isinstance(obj, dict):
        bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    raise SourceError("not a state dict of tensors" + (f" (entry {bad!r} is not a tensor)" if bad else ""),
                      file=str(f), tensor=None if bad is None else str(bad))


def _torch_index(d: dict[str, torch.Tensor], f: Path) -> list[TensorInfo]:
    from .codec import TORCH_TO_NAME

    out = []
    for k, t in d.items():
        dt = TORCH_TO_NAME.get(t.dtype)
        if dt is None:
            raise SourceError(f"unsupported dtype {t.dtype}", file=str(f), tensor=k)
        out.append(TensorInfo(k, tuple(t.shape), dt, t.numel(), t.numel() * t.element_size(), str(f)))
    return out


# -- opening ----------------------------------------------------------------------

def _hf_directory(d: Path, uri: str) -> CheckpointSource:
    extra = [d / n for n in ARCHITECTURE_FILES + TOKENIZER_FILES if (d / n).is_file()]
    hf = any(f.name in ARCHITECTURE_FILES for f in extra)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        idx = d / index_name
        if idx.is_file():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except Exception as exc:
                raise SourceError(f"unreadable shard index: {exc}", file=str(idx)) from exc
            paths = []
            for name in files:
                p = (d / name)
                if os.sep in name or name.startswith("..") or not p.is_file():
                    raise SourceError(f"shard {name!r} listed in the index is missing or outside the directory",
                                      file=str(idx))
                paths.append(p)
            return CheckpointSource(uri, "hf-dir", paths, extra)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            return CheckpointSource(uri, "hf-dir", [d / single], extra)
    sts = sorted(d.glob("*.safetensors"))
    if sts:
        return CheckpointSource(uri, "hf-dir" if hf else "dir", sts, extra)
    pts = sorted(p for p in d.iterdir() if p.suffix in (".pt", ".pth", ".bin"))
    if pts:
        return CheckpointSource(uri, "hf-dir" if hf else "dir", pts, extra)
    raise SourceError("no weight files (*.safetensors, *.bin, *.pt, *.pth) in the directory", file=str(d))


def open_source(spec: str | os.PathLike | CheckpointSource, *, revision: str | None = None,
                cache_dir: str | None = None) -> CheckpointSource:
    """Open a checkpoint: a file, a Hugging Face directory, or a Hub id."""
    if isinstance(spec, CheckpointSource):
        return spec
    text = os.fspath(spec)
    p = Path(text).expanduser()
    if p.is_file():
        if p.suffix == ".safetensors":
            return CheckpointSource(str(p), "safetensors", [p])
        if p.suffix in (".pt", ".pth", ".bin"):
            return CheckpointSource(str(p), "torch", [p])
        raise SourceError("unknown checkpoint file type (expected .safetensors, .pt, .pth or .bin)", file=str(p))
    if p.is_dir():
        return _hf_directory(p, str(p))
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        return _from_hub(text, revision=revision, cache_dir=cache_dir)
    raise SourceError("no such file or directory, and not a Hugging Face Hub id", file=text)


def _from_hub(repo_id: str, *, revision: str | None, cache_dir: str | None) -> CheckpointSource:
    """Download (or reuse from the HF cache) a Hub model's weights and configs."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", *(n for n in TOKENIZER_FILES if not n.endswith(".json"))]
    try:
        local = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
        d = Path(local)
        if not any(d.glob("*.safetensors")):
            # older repos only ship pickled .bin weights; still loaded with weights_only=True
            local = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=patterns + ["*.bin"])
            d = Path(local)
    except Exception as exc:
        raise SourceError(f"cannot fetch from the Hugging Face Hub: {type(exc).__name__}: {exc}",
                          file=f"hf://{repo_id}") from exc
    src = _hf_directory(d, f"hf://{repo_id}" + (f"@{revision}" if revision else ""))
    src.kind = "hub"
    return src
