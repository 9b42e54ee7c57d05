"""Source checkpoints: safetensors files, PyTorch state dicts, Hugging Face
directories and Hub models, behind one lazy interface.

``tensor_index()`` reads headers only, so a driver can plan work without the
data; ``read(names)`` reads just the named tensors. PyTorch files are loaded with
``weights_only=True`` and nothing else: there is no fallback to full pickle.

What a source may be, checked before any data is read:

* every file is opened only if it is a regular file, with ``O_NONBLOCK`` (a FIFO
  under a weight file's name is refused at once, never waited on), and then read
  through that same open file (``/proc/self/fd``), so it cannot be swapped after
  the check;
* a file's format comes from its first bytes, not its suffix (a ``.bin`` holding
  safetensors is read as safetensors);
* architecture files are taken only if they are regular files inside the source
  folder, or Hugging Face cache links into the cache's blob store;
* the Hub is reached only when asked: ``hf://org/name[@revision]``, or
  ``hub=True`` (the CLI's ``--hub``) for a bare ``org/name`` that is not a local
  path. A mistyped local path is "no such file", never a download.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .dtypes import DTYPES, NAME_BY_ST_CODE
from .errors import SourceError
from .source_files import PICKLE, SAFETENSORS, ZIP, TensorInfo, _read_small, _stat, describe_mode, opened, sniff
from .torch_files import _torch_index, _torch_load

log = logging.getLogger(__name__)

# Files that rebuild a Hugging Face architecture and its processor (copied next to
# the compressed shards)...
ARCHITECTURE_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "image_processor_config.json", "video_preprocessor_config.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# ...and its tokenizer, so that AutoTokenizer / AutoProcessor on the compressed
# directory give what they give on the source (WordPiece, BPE and SentencePiece files).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.json", "chat_template.jinja",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
HUB_SCHEME = "hf://"
#: a shard index (``*.index.json``) larger than this is not one
MAX_INDEX_BYTES = 64 << 20
_MAX_INDEX_NODES = 1_000_000  # one per tensor in a real index


# -- the source -----------------------------------------------------------------------

class CheckpointSource:
    """A checkpoint on local disk (Hub models are downloaded to the HF cache first)."""

    def __init__(self, uri: str, kind: str, weight_files: list[Path], extra_files: list[Path] | None = None,
                 *, root: Path | None = None, weight_map: dict[str, str] | None = None,
                 index_file: Path | None = None, extra_real: dict[str, Path] | None = None):
        self.uri = uri
        self.kind = kind
        self.weight_files = [Path(f) for f in weight_files]
        self.extra_files = [Path(f) for f in (extra_files or [])]
        self.root = Path(root) if root is not None else (self.weight_files[0] if len(self.weight_files) == 1
                                                         else None)
        self._weight_map = weight_map
        self._index_file = index_file
        self._extra_real = dict(extra_real or {})
        self._index: list[TensorInfo] | None = None
        self._torch_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self._formats: dict[Path, str] = {}

    # -- metadata -------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        return sum(_stat(f).st_size for f in self.weight_files)

    def protected_paths(self) -> list[str]:
        """The source's folder (or file) and every file it reads: a destination must
        not be, contain or lie inside any of them."""
        out = []
        for p in ([self.root] if self.root is not None else []) + self.weight_files + self.extra_files:
            out.append(os.path.abspath(p))
            out.append(os.path.realpath(p))
        return list(dict.fromkeys(out))

    def extra_file_map(self) -> dict[str, Path]:
        """Checkpoint name -> the checked file to copy (a cache link already resolved)."""
        return {f.name: self._extra_real.get(f.name, f) for f in self.extra_files}

    def _format(self, f: Path) -> str:
        if f not in self._formats:
            with opened(f) as (_, fd, st):
                found = sniff(fd, st.st_size)
            if f.suffix == ".safetensors" and found in (ZIP, PICKLE):
                raise SourceError("named .safetensors but it is a PyTorch checkpoint (zip/pickle); rename it to .pt "
                                  "to load it weights-only", file=str(f))
            if f.suffix != ".safetensors" and found == SAFETENSORS:
                log.info("%s holds safetensors data: read as safetensors", f)
            self._formats[f] = SAFETENSORS if (f.suffix == ".safetensors" or found == SAFETENSORS) else "torch"
        return self._formats[f]

    def tensor_index(self) -> list[TensorInfo]:
        if self._index is None:
            index: list[TensorInfo] = []
            seen: dict[str, str] = {}
            for f in self.weight_files:
                infos = _safetensors_index(f) if self._format(f) == SAFETENSORS else _torch_index(self._torch_dict(f), f)
                for info in infos:
                    if info.name in seen:
                        raise SourceError(f"tensor appears in two weight files (also in {seen[info.name]})",
                                          file=str(f), tensor=info.name)
                    seen[info.name] = str(f)
                    index.append(info)
            if not index:
                raise SourceError("the source holds no tensors", file=self.uri)
            if self._weight_map is not None:
                for name, fname in self._weight_map.items():
                    holder = seen.get(name)
                    if holder is None or Path(holder).name != fname:
                        raise SourceError(f"the shard index lists this tensor in {fname!r}, which does not hold it"
                                          + (f" (it is in {Path(holder).name})" if holder else ""),
                                          file=str(self._index_file), tensor=name)
            self._index = index
        return self._index

    def source_hash(self) -> str:
        """sha256 over the weight files' names and bytes (streamed)."""
        h = hashlib.sha256()
        for f in sorted(self.weight_files, key=lambda p: p.name):
            h.update(f.name.encode() + b"\0")
            with opened(f) as (_, fd, _st), os.fdopen(os.dup(fd), "rb") as fh:
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
            if self._format(f) == SAFETENSORS:
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
        with opened(f) as (p, _fd, _st), safe_open(p, framework="pt") as fh:
            out = []
            for k in fh.keys():
                sl = fh.get_slice(k)
                shape = tuple(int(d) for d in sl.get_shape())
                dt = NAME_BY_ST_CODE.get(sl.get_dtype())
                if dt is None:
                    raise SourceError(f"unsupported dtype {sl.get_dtype()}", file=str(f), tensor=k)
                numel = 1
                for d in shape:
                    numel *= d
                out.append(TensorInfo(k, shape, dt, numel, numel * DTYPES[dt].itemsize, str(f)))
            return out
    except SourceError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise SourceError(f"not a readable safetensors file: {exc}", file=str(f)) from exc


def _safetensors_read(f: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with opened(f) as (p, _fd, _st), safe_open(p, framework="pt") as fh:
            for n in names:
                yield n, fh.get_tensor(n)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"cannot read safetensors data: {exc}", file=str(f)) from exc


# -- opening ----------------------------------------------------------------------

def _allowed_roots(d: Path) -> list[str]:
    """Where files of the folder ``d`` may really live: inside it, and for a
    Hugging Face cache snapshot (``.../snapshots/<rev>/``) the cache's blob store."""
    real = Path(os.path.realpath(d))
    roots = [str(real)]
    if real.parent.name == "snapshots":
        roots.append(str(real.parent.parent / "blobs"))
    return roots


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _member(d: Path, name: str, what: str) -> Path | None:
    """The real path of the file ``d/name`` if it is a regular file inside ``d``
    (or a cache link into the blob store); None if absent; else a SourceError."""
    p = d / name
    try:
        lst = os.lstat(p)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SourceError(f"cannot access the {what}: {exc.strerror}", file=str(p)) from None
    real = os.path.realpath(p)
    if stat.S_ISLNK(lst.st_mode) and not any(_inside(real, r) for r in _allowed_roots(d)):
        raise SourceError(f"the {what} is a symbolic link to {real}, outside the source folder: refused "
                          "(copy the file into the folder)", file=str(p))
    st = _stat(real)
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"the {what} is {describe_mode(st.st_mode)}, not a regular file", file=str(p))
    return Path(real)


def _weight_file(p: Path) -> Path:
    st = _stat(p)
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"weight file is {describe_mode(st.st_mode)}, not a regular file", file=str(p))
    return p


def _read_index(idx: Path) -> dict[str, str]:
    from .errors import ManifestError, SizeLimitError
    from .format.schema import _parse_json

    raw = _read_small(idx, MAX_INDEX_BYTES)
    try:
        obj, dups = _parse_json(raw, str(idx), ManifestError, _MAX_INDEX_NODES)
    except (ManifestError, SizeLimitError) as exc:
        raise SourceError(f"unreadable shard index: {exc.detail}", file=str(idx)) from None
    if dups:
        raise SourceError(f"shard index has the key {dups[0][0]!r} twice", file=str(idx), tensor=str(dups[0][0]))
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise SourceError("shard index has no 'weight_map' object naming each tensor's file", file=str(idx))
    for name, fname in wm.items():
        if not isinstance(fname, str):
            raise SourceError(f"weight_map value must be a file name (a string), got {type(fname).__name__}",
                              file=str(idx), tensor=name)
        if (not fname or "/" in fname or os.sep in fname or fname in (".", "..") or fname.startswith("..")
                or not fname.endswith(WEIGHT_SUFFIXES)):
            raise SourceError(f"weight_map names {fname[:200]!r}, not a weight file inside the folder",
                              file=str(idx), tensor=name)
    return wm


def _is_birkhoff_checkpoint(d: Path) -> bool:
    try:
        with opened(d / "manifest.json") as (_, fd, _st):
            head = os.pread(fd, 1 << 16, 0)
    except (SourceError, OSError):
        return False
    return b'"birkhoff.hyper-compressed"' in head


def _hf_directory(d: Path, uri: str) -> CheckpointSource:
    if os.path.lexists(d / "manifest.json") and _is_birkhoff_checkpoint(d):
        raise SourceError("this is a Birkhoff compressed checkpoint, not a source model: decompress it first",
                          file=str(d))
    extra, extra_real = [], {}
    for n in ARCHITECTURE_FILES + TOKENIZER_FILES:
        real = _member(d, n, "architecture file" if n in ARCHITECTURE_FILES else "tokenizer file")
        if real is not None:
            extra.append(d / n)
            extra_real[n] = real
    hf = any(f.name in ARCHITECTURE_FILES for f in extra)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        idx = d / index_name
        if os.path.lexists(idx):
            if _member(d, index_name, "shard index") is None:
                continue
            wm = _read_index(idx)
            paths = []
            for name in sorted(set(wm.values())):
                p = d / name
                if not os.path.lexists(p):
                    raise SourceError(f"shard {name!r} listed in the index is missing", file=str(idx))
                paths.append(_weight_file(p))
            return CheckpointSource(uri, "hf-dir", paths, extra, root=d, weight_map=wm, index_file=idx,
                                    extra_real=extra_real)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.lexists(d / single):
            return CheckpointSource(uri, "hf-dir", [_weight_file(d / single)], extra, root=d, extra_real=extra_real)
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError as exc:
        raise SourceError(f"cannot list the directory: {exc.strerror}", file=str(d)) from None
    sts = [Path(e.path) for e in entries if e.name.endswith(".safetensors") and not e.name.startswith(".")]
    if sts:
        return CheckpointSource(uri, "hf-dir" if hf else "dir", [_weight_file(p) for p in sts], extra, root=d,
                                extra_real=extra_real)
    pts = [Path(e.path) for e in entries if e.name.endswith((".pt", ".pth", ".bin")) and not e.name.startswith(".")]
    if pts:
        return CheckpointSource(uri, "hf-dir" if hf else "dir", [_weight_file(p) for p in pts], extra, root=d,
                                extra_real=extra_real)
    raise SourceError("no weight files (*.safetensors, *.bin, *.pt, *.pth) in the directory", file=str(d))


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def parse_hub_uri(text: str) -> tuple[str, str | None]:
    """``hf://org/name[@revision]`` -> ``(org/name, revision)``."""
    body = text[len(HUB_SCHEME):]
    repo, _, rev = body.partition("@")
    if not looks_like_hub_id(repo):
        raise SourceError("not a Hugging Face Hub id (expected hf://org/name[@revision])", file=text)
    return repo, (rev or None)


def open_source(spec: str | os.PathLike | CheckpointSource, *, revision: str | None = None,
                cache_dir: str | None = None, hub: bool = False) -> CheckpointSource:
    """Open a checkpoint: a file, a Hugging Face directory, or a Hub model.

    The Hub is used only for ``hf://org/name[@revision]``, or for a bare
    ``org/name`` that is no local path when ``hub=True``."""
    if isinstance(spec, CheckpointSource):
        return spec
    text = os.fspath(spec)
    if not text.strip():
        raise SourceError("no source given (an empty path)", file=repr(text))
    if text.startswith(HUB_SCHEME):
        repo, rev = parse_hub_uri(text)
        return _from_hub(repo, revision=revision or rev, cache_dir=cache_dir)
    p = Path(text).expanduser()
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if hub and looks_like_hub_id(text):
            return _from_hub(text, revision=revision, cache_dir=cache_dir)
        hint = (f"; to download the Hugging Face Hub model {text!r}, write {HUB_SCHEME}{text} or pass --hub"
                if looks_like_hub_id(text) else "")
        raise SourceError(f"no such file or directory{hint}", file=text) from None
    except OSError:
        _stat(p)  # raises the SourceError that says what went wrong
        raise
    if stat.S_ISREG(st.st_mode):
        if p.suffix in WEIGHT_SUFFIXES:
            return CheckpointSource(str(p), "safetensors" if p.suffix == ".safetensors" else "torch", [p], root=p)
        raise SourceError("unknown checkpoint file type (expected .safetensors, .pt, .pth or .bin)", file=str(p))
    if stat.S_ISDIR(st.st_mode):
        return _hf_directory(p, str(p))
    raise SourceError(f"is {describe_mode(st.st_mode)}, not a checkpoint file or directory", file=str(p))


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
                          file=f"{HUB_SCHEME}{repo_id}") from exc
    src = _hf_directory(d, f"{HUB_SCHEME}{repo_id}" + (f"@{revision}" if revision else ""))
    src.kind = "hub"
    return src
