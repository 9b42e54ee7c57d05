"""Configuration of codec v2 (entropy-coded, scale-adaptive lattice codec).

A frozen dataclass with a ``version`` (torchao style): a value that hashes
deterministically and is written verbatim next to every tensor it encoded.

Rate is set in the user's terms, one of:

* ``preset``: ``"faithful"`` (the default) or ``"small"``;
* ``rel_error``: the relative RMS error of every linear weight (error RMS / weight
  RMS, row by row), e.g. ``0.04``;
* ``bits_per_weight``: a mean bits-per-weight budget over the compressed tensors,
  met by :func:`compressor.codec_v2.rate.plan_tensors` (bisection on the relative
  step, then the real coded size is reported).

Whatever the knob, the codec works with the *relative step* ``q``: the lattice's
nearest-neighbour distance in units of the row's RMS. For the hexagonal lattice
the error RMS per weight is ``sqrt(5/72) * q = 0.2635 * q`` of the row RMS (high-rate
value, :data:`REL_ERROR_PER_STEP`), so ``rel_error`` converts to ``q`` exactly.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ConfigError

CONFIG_VERSION = 1

# Relative step q of each preset for linear weights (embedding tables get
# ``embedding_factor`` times it). Chosen on the DESIGN sentences of
# benchmarks/sentences.py (docs/BENCHMARKS.md, codec v2; benchmarks/bench_frontier.py):
# faithful ~ mean cosine 0.993, small ~ 0.985 on MiniLM, with margin over the
# acceptance floors (0.990 and 0.975) for sentences not seen.
PRESETS: dict[str, float] = {"faithful": 0.12, "small": 0.19}

# RMS quantization error of the A2 lattice with nearest-neighbour distance q, per
# coordinate: G(A2) * cell area = (5 / (36 sqrt 3)) * (sqrt 3 / 2) q^2 = 5/72 q^2.
REL_ERROR_PER_STEP = math.sqrt(5.0 / 72.0)

DEFAULT_EMBEDDING_PATTERNS = ("*embeddings.weight", "*embed_tokens.weight", "*wte.weight", "*wpe.weight",
                              "*word_embeddings*", "*position_embeddings*", "*token_type_embeddings*")

LATTICES = ("a2",)
MAX_BLOCK_PAIRS = 1 << 22


@dataclass(frozen=True)
class CodecV2Config:
    """Settings of codec v2.

    - ``preset`` / ``rel_error`` / ``bits_per_weight``: the rate knob (exactly one
      is used: ``bits_per_weight`` if set, else ``rel_error`` if set, else the preset).
    - ``embedding_factor``: embedding tables (gathered row by row: a token reads one
      row) take this many times the linear weights' relative step. Measured on
      MiniLM: 3 gives the best cosine per bit of 1, 2, 3, 4 (note i12).
    - ``embedding_patterns``: fnmatch globs naming embedding tables when the caller
      gives no role (a module source marks ``nn.Embedding`` weights itself).
    - ``block_pairs``: pairs of weights per entropy-coded block (whole rows; a row
      longer than this is a block of its own). Blocks decode independently.
    - ``min_elements``: smaller tensors (and 1-D tensors, integer tensors) stay raw.
    - ``lattice``: ``"a2"``, the hexagonal lattice (the only one this version writes;
      the design measurement of the others is in benchmarks/bench_codec_v2_design.py).
    """

    version: int = CONFIG_VERSION
    preset: str = "faithful"
    rel_error: float | None = None
    bits_per_weight: float | None = None
    embedding_factor: float = 3.0
    embedding_patterns: tuple[str, ...] = DEFAULT_EMBEDDING_PATTERNS
    block_pairs: int = 1 << 16
    min_elements: int = 1024
    lattice: str = "a2"

    def __post_init__(self) -> None:
        object.__setattr__(self, "embedding_patterns", tuple(self.embedding_patterns))
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"unknown codec v2 config version {self.version!r}; this build knows {CONFIG_VERSION}")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.rel_error is not None and not _pos(self.rel_error, 1e-5, 10.0):
            raise ConfigError(f"rel_error must be in [1e-5, 10], got {self.rel_error!r}")
        if self.bits_per_weight is not None and not _pos(self.bits_per_weight, 0.25, 16.0):
            raise ConfigError(f"bits_per_weight must be in [0.25, 16], got {self.bits_per_weight!r}")
        if not _pos(self.embedding_factor, 0.01, 100.0):
            raise ConfigError(f"embedding_factor must be in [0.01, 100], got {self.embedding_factor!r}")
        if not all(isinstance(p, str) and p for p in self.embedding_patterns):
            raise ConfigError("embedding_patterns must be non-empty strings")
        if not (isinstance(self.block_pairs, int) and 256 <= self.block_pairs <= MAX_BLOCK_PAIRS):
            raise ConfigError(f"block_pairs must be an int in [256, {MAX_BLOCK_PAIRS}], got {self.block_pairs!r}")
        if not (isinstance(self.min_elements, int) and self.min_elements >= 4):
            raise ConfigError(f"min_elements must be an int >= 4, got {self.min_elements!r}")
        if self.lattice not in LATTICES:
            raise ConfigError(f"unknown lattice {self.lattice!r}; this version writes {list(LATTICES)}")

    # -- the rate knob -------------------------------------------------------------
    @property
    def rel_step(self) -> float:
        """Relative step ``q`` of linear weights from ``rel_error`` or the preset
        (a ``bits_per_weight`` budget is solved over a whole checkpoint instead)."""
        if self.rel_error is not None:
            return float(self.rel_error) / REL_ERROR_PER_STEP
        return PRESETS[self.preset]

    def is_embedding(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.embedding_patterns)

    # -- serialization ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["embedding_patterns"] = list(self.embedding_patterns)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CodecV2Config":
        if not isinstance(d, Mapping):
            raise ConfigError(f"codec v2 config must be a mapping, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown codec v2 config keys: {sorted(unknown)}")
        try:
            return cls(**dict(d))
        except TypeError as exc:
            raise ConfigError(f"invalid codec v2 config: {exc}") from exc

    def replace(self, **changes: Any) -> "CodecV2Config":
        return dataclasses.replace(self, **changes)

    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _pos(v: Any, lo: float, hi: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi
