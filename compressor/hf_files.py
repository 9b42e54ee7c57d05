"""The Hugging Face files of a compressed checkpoint.

A compressed Hugging Face source keeps its architecture, tokenizer and processor
files next to the shards, with two changes so that ``from_pretrained`` on the
directory does the right thing:

* ``config.json`` carries a ``quantization_config`` block (``quant_method``
  ``"birkhoff"``, the format name and version, the codec version, and the files a
  loader needs). With Birkhoff imported, transformers hands the load to
  :mod:`compressor.hf_quantizer`; without it, transformers warns that it does not
  know the method and the load fails on the packed tensors (never silently random).
* ``config.original.json`` is the source's ``config.json``, byte for byte:
  ``birkhoff decompress`` writes it back as ``config.json`` next to the decoded
  weights, so the original layout loads as a plain float model again.
* ``model.safetensors.index.json`` maps every stored tensor to its shard, the
  weights index transformers looks for. The names are the source's own.

Every one of these is an extra file of the manifest: the manifest records the
sha256 of the rewritten ``config.json``, not of the source's. Pure JSON, no
transformers import: the workflow driver uses it too.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Mapping, Union

from .errors import SourceError

QUANT_METHOD = "birkhoff"
CONFIG_NAME = "config.json"
ORIGINAL_CONFIG_NAME = "config.original.json"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
#: files this module writes; a checkpoint saved again regenerates them from the original config
GENERATED_NAMES = (CONFIG_NAME, ORIGINAL_CONFIG_NAME, WEIGHTS_INDEX_NAME)
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a config.json is kilobytes; refuse to slurp anything huge

Content = Union[Path, bytes]


def quantization_config(format_version: int | None = None) -> dict:
    """The ``quantization_config`` block written into ``config.json`` (the paper
    codec's format unless ``format_version`` names another)."""
    from . import format as fmt

    version = fmt.FORMAT_VERSION if format_version is None else format_version
    return {
        "quant_method": QUANT_METHOD,
        "format": fmt.FORMAT_NAME,
        "format_version": version,
        "codec_version": fmt.CODEC_OF_FORMAT[version],
        "manifest": fmt.MANIFEST_NAME,
        "original_config": ORIGINAL_CONFIG_NAME,
    }


def _read_config(content: Content, name: str) -> bytes:
    if isinstance(content, (bytes, bytearray)):
        raw = bytes(content)
    else:
        path = os.fspath(content)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise SourceError(f"cannot open {name}: {exc.strerror}", file=path) from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SourceError(f"{name} is not a regular file", file=path)
            raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise SourceError(f"{name} is larger than {MAX_CONFIG_BYTES} bytes",
                          file=name if isinstance(content, (bytes, bytearray)) else os.fspath(content))
    return raw


def _parse_config(raw: bytes, where: str) -> dict:
    try:
        cfg = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SourceError(f"config is not valid JSON: {exc}", file=where) from None
    if not isinstance(cfg, dict):
        raise SourceError(f"config is a JSON {type(cfg).__name__}, not an object", file=where)
    return cfg


def config_with_quantization(original: bytes, where: str = CONFIG_NAME, format_version: int | None = None) -> bytes:
    """``config.json`` bytes: the original config plus the Birkhoff ``quantization_config``.

    A source whose config already names another quantization method holds
    quantized weights this codec does not read: refused.
    """
    cfg = _parse_config(original, where)
    qc = cfg.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise SourceError(f"the source is already quantized (quantization_config method {method!r}); "
                          "Birkhoff compresses float checkpoints", file=where)
    cfg["quantization_config"] = quantization_config(format_version)
    # transformers writes its configs this way (indent 2, sorted keys)
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def weights_index(tensor_shards: Mapping[str, str]) -> bytes:
    """``model.safetensors.index.json``: every stored tensor and its shard."""
    from . import format as fmt

    index = {"metadata": {"format": fmt.FORMAT_NAME, "quant_method": QUANT_METHOD},
             "weight_map": {n: tensor_shards[n] for n in sorted(tensor_shards)}}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


def checkpoint_files(extra: Mapping[str, Content], tensor_shards: Mapping[str, str],
                     format_version: int | None = None) -> dict[str, Content]:
    """The extra files a checkpoint stores, given the source's (``name -> path or
    bytes``) and where each tensor went (``tensor -> shard file``).

    Without a ``config.json`` (a bare state dict) the files are kept as they are.
    With one, ``config.json`` is rewritten, the original kept as
    ``config.original.json`` and the weights index added. Idempotent: the extra
    files of a loaded checkpoint (which already hold the generated ones) give the
    same result, rebuilt from ``config.original.json``.
    """
    files = {n: c for n, c in extra.items() if n not in GENERATED_NAMES}
    if ORIGINAL_CONFIG_NAME in extra:
        source_name, content = ORIGINAL_CONFIG_NAME, extra[ORIGINAL_CONFIG_NAME]
    elif CONFIG_NAME in extra:
        source_name, content = CONFIG_NAME, extra[CONFIG_NAME]
    else:
        return files
    where = source_name if isinstance(content, (bytes, bytearray)) else os.fspath(content)
    original = _read_config(content, source_name)  # read once: both files come from the same bytes
    files[CONFIG_NAME] = config_with_quantization(original, where, format_version)
    files[ORIGINAL_CONFIG_NAME] = original
    files[WEIGHTS_INDEX_NAME] = weights_index(tensor_shards)
    return files


def original_layout_files(directory, manifest: Mapping) -> dict[str, Path]:
    """The extra files of a decompressed, original-layout model directory: the
    source's config back as ``config.json``, the tokenizer and processor files as
    they are; the quantization config and the weights index dropped."""
    directory = Path(directory)
    names = list(manifest.get("extra_files", {}))
    out: dict[str, Path] = {}
    for name in names:
        if name in GENERATED_NAMES:
            continue
        out[name] = directory / name
    if ORIGINAL_CONFIG_NAME in names:
        out[CONFIG_NAME] = directory / ORIGINAL_CONFIG_NAME
    elif CONFIG_NAME in names:  # written before config.json carried a quantization_config
        out[CONFIG_NAME] = directory / CONFIG_NAME
    return out


def write_original_layout(directory, out, *, backend: str = "auto", protected=()) -> Path:
    """Decode a compressed checkpoint into a plain Hugging Face model directory:
    ``model.safetensors`` (every tensor under its original name, shape and dtype),
    the source's ``config.json``, and the tokenizer and processor files. Built in an
    owner-tagged temporary sibling and published without replacing anything:
    ``out`` must not exist or be an empty directory, and must not overlap the
    checkpoint or ``protected`` (the recorded source)."""
    import shutil

    from safetensors.torch import save_file

    from . import destination as dest
    from . import format as fmt
    from .checkpoint import CompressedCheckpoint

    directory = Path(directory)
    never = lambda path: "a decompressed model directory is never replaced"  # noqa: E731
    missing = dest.check_directory_destination(out, overwrite=False, protected=[str(directory), *protected],
                                               replaceable=never)
    manifest = fmt.read_manifest(directory)
    ckpt = CompressedCheckpoint.load(directory)  # checks every shard and extra file against the manifest
    made = dest.make_parents(missing)
    out = Path(os.path.abspath(os.fspath(out)))
    dest.clean_stale_temps(out.parent, out.name)
    tmp = out.parent / dest.temp_name(out.name)
    tmp.mkdir()
    try:
        sd = {k: v.contiguous() for k, v in ckpt.state_dict(backend).items()}
        # "format": "pt" is what transformers expects of a safetensors weights file
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "birkhoff decompress"})
        for name, path in original_layout_files(directory, manifest).items():
            shutil.copyfile(path, tmp / name)
        dest.publish_directory(tmp, out, overwrite=False, replaceable=never)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        dest.remove_created(made)
        raise
    return out
