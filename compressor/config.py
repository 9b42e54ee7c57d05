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
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .errors import ConfigError

CONFIG_VERSION = 1


@dataclass(frozen=True)
class TensorSettings:
    """The effective settings for one tensor (config defaults plus overrides)."""

    box_size: float
    points: tuple[int, ...]
    max_classes: int
    target_mae: float
    points_target_mae: float
    fallback_mae: float
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

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError("override pattern must be a non-empty string")
        if self.points is not None:
            object.__setattr__(self, "points", tuple(int(u) for u in self.points))

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
    min_elements: int = 10
    nonfinite: str = "error"
    overrides: tuple[TensorOverride, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", tuple(int(u) for u in self.points))
        ovs = tuple(o if isinstance(o, TensorOverride) else TensorOverride(**o) for o in self.overrides)
        object.__setattr__(self, "overrides", ovs)
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"unknown config version {self.version!r}; this build knows {CONFIG_VERSION}")
        if self.nonfinite not in ("error", "raw"):
            raise ConfigError(f"nonfinite must be 'error' or 'raw', got {self.nonfinite!r}")
        if self.min_elements < 2:
            raise ConfigError("min_elements must be at least 2")
        _check_settings("config", self.box_size, self.points, self.max_classes, self.target_mae,
                        self.points_target_mae, self.fallback_mae)
        for o in ovs:
            _check_settings(f"override {o.pattern!r}", o.box_size, o.points, o.max_classes,
                            o.target_mae, o.points_target_mae, o.fallback_mae)

    # -- resolution ---------------------------------------------------------
    def settings_for(self, name: str) -> TensorSettings:
        """Effective settings for tensor ``name`` (first matching override wins)."""
        base = dict(
            box_size=self.box_size,
            points=self.points,
            max_classes=self.max_classes,
            target_mae=self.target_mae,
            points_target_mae=self.points_target_mae,
            fallback_mae=self.fallback_mae,
            raw=False,
        )
        for o in self.overrides:
            if o.matches(name):
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
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        kw = dict(d)
        if "overrides" in kw:
            kw["overrides"] = tuple(TensorOverride(**o) if isinstance(o, Mapping) else o for o in kw["overrides"])
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


def _check_settings(where, box_size, points, max_classes, target, points_target, fallback) -> None:
    if box_size is not None and not (isinstance(box_size, (int, float)) and math.isfinite(box_size) and box_size > 0):
        raise ConfigError(f"{where}: box_size must be a positive finite number, got {box_size!r}")
    if points is not None:
        pts = tuple(points)
        if not pts:
            raise ConfigError(f"{where}: points must list at least one U")
        for u in pts:
            if u < 4 or u > 2**24:
                raise ConfigError(f"{where}: each U must be in [4, 2**24], got {u}")
        if list(pts) != sorted(set(pts)):
            raise ConfigError(f"{where}: points must be strictly ascending, got {list(pts)}")
    if max_classes is not None and not (1 <= int(max_classes) <= 64):
        raise ConfigError(f"{where}: max_classes must be in [1, 64], got {max_classes}")
    for label, v in (("target_mae", target), ("points_target_mae", points_target), ("fallback_mae", fallback)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ConfigError(f"{where}: {label} must be a finite number >= 0, got {v!r}")


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
        try:
            return tuple(int(t) for t in text.split(",") if t.strip())
        except ValueError as exc:
            raise ConfigError(f"--points takes comma-separated integers, got {text!r}") from exc
    return tuple(int(t) for t in text)
