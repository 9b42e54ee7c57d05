"""Configuration of the Hyper-Compression codec.

Frozen dataclasses with a ``version`` (torchao style): a config is a value, it
hashes deterministically (the workflow keys stored checkpoints by it) and it is
written verbatim into every compressed checkpoint's manifest.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .errors import ConfigError

CONFIG_VERSION = 1

#: entries of a tensor's decode tables, U*(K_max+1): bounded so that every
#: checkpoint a config can produce is one the loader accepts (format.LoadLimits)
MAX_DECODE_TABLE = 2**22
MAX_POINTS_CANDIDATES = 64  # each candidate U costs up to K_max encode passes
MAX_OVERRIDES = 4096
MAX_PATTERN_CHARS = 1024


@dataclass(frozen=True)
class TensorSettings:
    """The effective settings for one tensor (config defaults plus overrides)."""

    box_size: float
    points: tuple[int, ...]
    max_classes: int
    target_mae: float
    points_target_mae: float
    fallback_mae: float
    relative_fallback: float | None = None
    raw: bool = False


@dataclass(frozen=True)
class TensorOverride:
    """Settings for the tensors whose name matches ``pattern``.

    ``pattern`` is an fnmatch glob over the full dotted name (``*.attn.qkv.weight``,
    ``vision_encoder.*``). ``raw=True`` keeps matching tensors uncompressed. Any
    other field left as ``None`` inherits the config's value. The first matching
    override wins.
    """

    pattern: str
    raw: bool = False
    box_size: float | None = None
    points: tuple[int, ...] | None = None
    max_classes: int | None = None
    target_mae: float | None = None
    points_target_mae: float | None = None
    fallback_mae: float | None = None
    relative_fallback: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError(f"override pattern must be a non-empty string, got {_short(self.pattern)}")
        if len(self.pattern) > MAX_PATTERN_CHARS:
            raise ConfigError(f"override pattern is {len(self.pattern)} characters, above {MAX_PATTERN_CHARS}")
        if not isinstance(self.raw, bool):
            raise ConfigError(f"override {self.pattern!r}: raw must be true or false, got {_short(self.raw)}")
        if self.points is not None:
            object.__setattr__(self, "points", _int_tuple(f"override {self.pattern!r}: points", self.points))

    @classmethod
    def from_dict(cls, d: Any, where: str = "override") -> "TensorOverride":
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: an override is a mapping with a 'pattern', got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(d) - known))
        if unknown:
            raise ConfigError(f"{where}: unknown override keys {unknown[:8]} (known: {sorted(known)})")
        if "pattern" not in d:
            raise ConfigError(f"{where}: an override needs a 'pattern'")
        return cls(**d)

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclass(frozen=True)
class HyperCompressionConfig:
    """The paper's Algorithm 1 settings, with its defaults.

    - ``box_size`` (``l``): side of the square box the trajectory fills.
    - ``points``: candidate trajectory sizes ``U``, ascending; perfect squares
      make the lattice complete.
    - ``max_classes`` (``K_max``): outer classes searched, ``K = 1..K_max``.
    - ``target_mae``: stop the ``K`` loop (and by default the ``U`` loop) once a
      tensor's MAE is at or below it.
    - ``points_target_mae``: the ``U`` loop's own threshold when set apart
      (the paper's code has two; ``None`` means "same as target_mae").
    - ``fallback_mae``: a tensor whose best MAE is above it stays raw.
    - ``relative_fallback``: a tensor also stays raw when its best MAE is above
      this fraction of its spread (mean absolute deviation from its mean), so
      that near-zero and constant tensors, which the absolute limits would let
      through as lattice noise, are kept exactly. ``None`` turns the rule off.
    - ``min_elements``: smaller tensors stay raw.
    - ``nonfinite``: ``"error"`` rejects NaN/Inf in a source tensor; ``"raw"``
      keeps such tensors uncompressed.
    """

    version: int = CONFIG_VERSION
    box_size: float = 0.1
    points: tuple[int, ...] = (1225, 1600)
    max_classes: int = 3
    target_mae: float = 0.001
    points_target_mae: float | None = None
    fallback_mae: float = 0.006
    relative_fallback: float | None = 0.5
    min_elements: int = 10
    nonfinite: str = "error"
    overrides: tuple[TensorOverride, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not _is_int(self.version) or self.version != CONFIG_VERSION:
            raise ConfigError(f"unknown config version {_short(self.version)}; this build knows {CONFIG_VERSION}")
        object.__setattr__(self, "points", _int_tuple("config: points", self.points))
        if isinstance(self.overrides, (str, bytes, Mapping)) or not isinstance(self.overrides, Sequence):
            raise ConfigError(f"overrides must be a list of mappings, got {type(self.overrides).__name__}")
        if len(self.overrides) > MAX_OVERRIDES:
            raise ConfigError(f"{len(self.overrides)} overrides, above {MAX_OVERRIDES}")
        ovs = tuple(o if isinstance(o, TensorOverride) else TensorOverride.from_dict(o, f"overrides[{i}]")
                    for i, o in enumerate(self.overrides))
        object.__setattr__(self, "overrides", ovs)
        if self.nonfinite not in ("error", "raw"):
            raise ConfigError(f"nonfinite must be 'error' or 'raw', got {_short(self.nonfinite)}")
        if not _is_int(self.min_elements) or self.min_elements < 2:
            raise ConfigError(f"min_elements must be an integer >= 2, got {_short(self.min_elements)}")
        _check_settings("config", self.box_size, self.points, self.max_classes, self.target_mae,
                        self.points_target_mae, self.fallback_mae, self.relative_fallback)
        for o in ovs:
            where = f"override {o.pattern!r}"
            _check_settings(where, o.box_size, o.points, o.max_classes, o.target_mae, o.points_target_mae,
                            o.fallback_mae, o.relative_fallback)
        # the combinations each tensor can end up with
        _check_combination("config", self.settings_for(None))
        for o in ovs:
            _check_combination(f"override {o.pattern!r}", self.settings_for(None, o))

    # -- resolution ---------------------------------------------------------
    def settings_for(self, name: str | None, override: TensorOverride | None = None) -> TensorSettings:
        """Effective settings for tensor ``name`` (first matching override wins);
        ``override`` applies that one instead of matching."""
        base = dict(
            box_size=self.box_size,
            points=self.points,
            max_classes=self.max_classes,
            target_mae=self.target_mae,
            points_target_mae=self.points_target_mae,
            fallback_mae=self.fallback_mae,
            relative_fallback=self.relative_fallback,
            raw=False,
        )
        for o in ((override,) if override is not None else self.overrides if name is not None else ()):
            if override is not None or o.matches(name):
                for key in base:
                    val = getattr(o, key)
                    if key == "raw":
                        base["raw"] = bool(val)
                    elif val is not None:
                        base[key] = val
                break
        if base["points_target_mae"] is None:
            base["points_target_mae"] = base["target_mae"]
        return TensorSettings(**base)

    # -- serialization ------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["points"] = list(self.points)
        d["overrides"] = [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(o).items() if v is not None}
            for o in self.overrides
        ]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HyperCompressionConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(map(str, unknown))[:8]}")
        kw = dict(d)
        if "overrides" in kw:
            ovs = kw["overrides"]
            if isinstance(ovs, (str, bytes, Mapping)) or not isinstance(ovs, Sequence):
                raise ConfigError(f"overrides must be a list of mappings, got {type(ovs).__name__}")
            kw["overrides"] = tuple(TensorOverride.from_dict(o, f"overrides[{i}]") for i, o in enumerate(ovs))
        if isinstance(kw.get("points"), (str, bytes, Mapping)):
            raise ConfigError(f"points must be a list of integers, got {_short(kw['points'])}")
        try:
            return cls(**kw)
        except TypeError as exc:  # wrong types inside the mapping
            raise ConfigError(f"invalid config: {exc}") from exc

    def replace(self, **changes: Any) -> "HyperCompressionConfig":
        return dataclasses.replace(self, **changes)

    def config_hash(self) -> str:
        """Stable short hash of the config (keys stored checkpoints)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _short(v: Any, n: int = 80) -> str:
    """``repr`` cut short: an error message must not echo a 60 MB value."""
    try:
        text = repr(v)
    except ValueError:  # an int too long to print
        return f"<{type(v).__name__} too large to print>"
    return text if len(text) <= n else text[:n] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _finite(v: Any) -> float | None:
    """``v`` as a finite float, or None: a 400-digit integer, NaN, a string or a
    bool is not a number here (``float()`` of a huge int raises OverflowError)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    try:
        f = float(v)
    except (OverflowError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _int_tuple(where: str, values: Any) -> tuple[int, ...]:
    """A list of integers as a tuple; floats (even 1600.0), strings and bools are
    refused rather than truncated or parsed."""
    if isinstance(values, (str, bytes, Mapping)):
        raise ConfigError(f"{where} must be a list of integers, got {_short(values)}")
    try:
        values = tuple(values)
    except TypeError:
        raise ConfigError(f"{where} must be a list of integers, got {_short(values)}") from None
    if len(values) > MAX_POINTS_CANDIDATES:
        raise ConfigError(f"{where}: {len(values)} values, above {MAX_POINTS_CANDIDATES}")
    out = []
    for u in values:
        if not _is_int(u):
            raise ConfigError(f"{where} must hold integers, got {_short(u)}")
        out.append(int(u))
    return tuple(out)


def _check_settings(where, box_size, points, max_classes, target, points_target, fallback, relative=None) -> None:
    if box_size is not None and not (_finite(box_size) is not None and box_size > 0):
        raise ConfigError(f"{where}: box_size must be a positive finite number, got {_short(box_size)}")
    if points is not None:
        pts = tuple(points)
        if not pts:
            raise ConfigError(f"{where}: points must list at least one U")
        for u in pts:
            if u < 4 or u > MAX_DECODE_TABLE:
                raise ConfigError(f"{where}: each U must be in [4, {MAX_DECODE_TABLE}], got {u}")
        if list(pts) != sorted(set(pts)):
            raise ConfigError(f"{where}: points must be strictly ascending, got {list(pts)}")
    if max_classes is not None and not (_is_int(max_classes) and 1 <= max_classes <= 64):
        raise ConfigError(f"{where}: max_classes must be an integer in [1, 64], got {_short(max_classes)}")
    for label, v in (("target_mae", target), ("points_target_mae", points_target), ("fallback_mae", fallback),
                     ("relative_fallback", relative)):
        if v is not None and not (_finite(v) is not None and v >= 0):
            raise ConfigError(f"{where}: {label} must be a finite number >= 0, got {_short(v)}")


def _check_combination(where: str, s: TensorSettings) -> None:
    """Settings that are each valid but make no sense together."""
    if s.fallback_mae < s.target_mae or s.fallback_mae < s.points_target_mae:
        raise ConfigError(f"{where}: fallback_mae ({s.fallback_mae}) is below the target "
                          f"({max(s.target_mae, s.points_target_mae)}): every tensor that misses the target "
                          "would be kept raw; raise fallback_mae or lower target_mae")
    table = max(s.points) * (s.max_classes + 1)
    if table > MAX_DECODE_TABLE:
        raise ConfigError(f"{where}: the largest U ({max(s.points)}) times max_classes+1 ({s.max_classes + 1}) "
                          f"is {table} decode-table entries, above {MAX_DECODE_TABLE}")


def config_from_cli(box_size=None, points=None, max_classes=None, target_mae=None, fallback_mae=None,
                    base: HyperCompressionConfig | None = None) -> HyperCompressionConfig:
    base = base or HyperCompressionConfig()
    changes: dict[str, Any] = {}
    if box_size is not None:
        changes["box_size"] = box_size
    if points is not None:
        changes["points"] = tuple(points)
    if max_classes is not None:
        changes["max_classes"] = max_classes
    if target_mae is not None:
        changes["target_mae"] = target_mae
    if fallback_mae is not None:
        changes["fallback_mae"] = fallback_mae
    return base.replace(**changes) if changes else base


def parse_points(text: str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(text, str):
        parts = [t.strip() for t in text.split(",") if t.strip()]
        if not parts or not all(p.isdigit() and p.isascii() for p in parts):
            raise ConfigError(f"--points takes comma-separated integers, got {_short(text)}")
        if any(len(p) > 9 for p in parts):
            raise ConfigError(f"--points: each U must be at most {MAX_DECODE_TABLE}, got {_short(text)}")
        return tuple(int(p) for p in parts)
    return _int_tuple("points", text)
