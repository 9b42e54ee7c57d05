"""Symbol models and entropy-coded blocks of codec v2.

Entropy coding is `constriction <https://pypi.org/project/constriction/>`_'s ANS
coder (``stream.stack.AnsCoder``, 32-bit words) with a categorical model per
coordinate stream, never our own coder. What this module owns is the part a file
must pin down exactly:

* **The symbol model** of a stream (the ``m`` or the ``b`` coordinates of one
  tensor) is an integer frequency table over ``[lo, lo + n - 2]`` plus one escape
  symbol (index ``n - 1``): ``n`` uint16 frequencies, each >= 1, summing to
  ``2**16``. Encoder and decoder build constriction's model from these integers
  only (``freq / 2**16``, exact in float64), so the file pins the model. The range
  is cut where a table entry (16 bits) costs more than the escapes it saves (an
  escape record: int64 position + int32 value).
* **Escapes**: a coordinate outside its model's range is coded as the escape
  symbol and stored exactly in the tensor's escape list (the lattice is unbounded:
  an outlier keeps its own lattice point).
* **Blocks**: whole rows; per block the ``b`` symbols, then the ``m`` symbols, in one
  ANS stream. A block decodes alone (parallel and streaming decode), must end with
  the coder empty, and carries a CRC-32 of its words and of its decoded symbols
  (little-endian int32), so a corrupted block or a lying model raises instead of
  returning wrong weights.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

MODEL_PRECISION = 16
MODEL_TOTAL = 1 << MODEL_PRECISION
MAX_MODEL_SYMBOLS = 4097  # 4096 coordinate values + the escape symbol
MAX_CORE = 2047  # coordinates beyond +-MAX_CORE are always escapes
TABLE_ENTRY_BITS = 16
ESCAPE_BITS = 96  # int64 position + int32 value
CODER = "constriction.ans32.categorical16"


class ModelError(ValueError):
    """An invalid symbol model (the container turns it into SymbolModelError)."""


@dataclass(frozen=True)
class SymbolModel:
    """Frequencies of symbols ``lo .. lo + n - 2`` and the escape (last)."""

    lo: int
    freqs: np.ndarray  # uint16 [n]

    @property
    def n(self) -> int:
        return int(self.freqs.shape[0])

    @property
    def hi(self) -> int:
        return self.lo + self.n - 2

    @property
    def escape(self) -> int:
        return self.n - 1

    def validate(self) -> None:
        f = self.freqs
        if not isinstance(f, np.ndarray) or f.dtype != np.uint16 or f.ndim != 1:
            raise ModelError("frequency table must be a 1-D uint16 array")
        if not 2 <= f.shape[0] <= MAX_MODEL_SYMBOLS:
            raise ModelError(f"frequency table has {f.shape[0]} entries, expected 2..{MAX_MODEL_SYMBOLS}")
        if int(f.min()) < 1:
            raise ModelError("a frequency is zero")
        total = int(f.astype(np.int64).sum())
        if total != MODEL_TOTAL:
            raise ModelError(f"frequencies sum to {total}, expected {MODEL_TOTAL}")
        if not (-MAX_CORE - 1 <= self.lo and self.hi <= MAX_CORE):
            raise ModelError(f"symbol range [{self.lo}, {self.hi}] outside [-{MAX_CORE + 1}, {MAX_CORE}]")

    def constriction_model(self):
        import constriction

        return constriction.stream.model.Categorical(self.freqs.astype(np.float64) / MODEL_TOTAL, perfect=False)

    def cost_bits(self, counts: np.ndarray) -> float:
        """Ideal code length of symbols with these per-index ``counts`` under the model."""
        p = self.freqs.astype(np.float64) / MODEL_TOTAL
        return float(-(counts * np.log2(p)).sum())


def _range_cut(counts: np.ndarray, center: int) -> tuple[int, int]:
    """``(lo_i, hi_i)`` indices into ``counts`` minimizing table bits + escape bits:
    keeping ``center..center+t`` costs ``16 t`` table bits plus ``96`` bits per count
    above it (likewise below)."""
    n = counts.shape[0]
    suffix = np.concatenate([np.cumsum(counts[::-1])[::-1], [0]])  # suffix[i] = sum(counts[i:])
    prefix = np.concatenate([[0], np.cumsum(counts)])  # prefix[i] = sum(counts[:i])
    t_up = np.arange(0, n - center, dtype=np.int64)
    hi = center + int(np.argmin(TABLE_ENTRY_BITS * t_up + ESCAPE_BITS * suffix[center + t_up + 1]))
    t_dn = np.arange(0, center + 1, dtype=np.int64)
    lo = center - int(np.argmin(TABLE_ENTRY_BITS * t_dn + ESCAPE_BITS * prefix[center - t_dn]))
    return lo, hi


def build_model(values: np.ndarray) -> SymbolModel:
    """The model of a stream of integer coordinates: range cut by cost, counts
    quantized to ``2**16`` (each symbol >= 1, the rest to the most frequent)."""
    v = np.asarray(values).ravel()
    if v.size == 0:
        return SymbolModel(0, np.array([MODEL_TOTAL - 1, 1], dtype=np.uint16))
    vmin, vmax = int(v.min()), int(v.max())
    if vmin < -MAX_CORE - 1 or vmax > MAX_CORE + 1:  # rare: far outliers beyond the core
        v = np.clip(v, -MAX_CORE - 1, MAX_CORE + 1)
        vmin, vmax = max(vmin, -MAX_CORE - 1), min(vmax, MAX_CORE + 1)
    counts = np.bincount(v - vmin if vmin else v, minlength=vmax - vmin + 1).astype(np.int64)
    if vmin == -MAX_CORE - 1:  # clipped: beyond the core is always an escape
        counts[0] = 0
    if vmax == MAX_CORE + 1:
        counts[-1] = 0
    center = int(np.argmax(counts))
    lo_i, hi_i = _range_cut(counts, center)
    lo_i = max(lo_i, 0 if vmin > -MAX_CORE - 1 else 1)
    hi_i = min(hi_i, counts.shape[0] - 1 if vmax < MAX_CORE + 1 else counts.shape[0] - 2)
    kept = counts[lo_i:hi_i + 1]
    esc = int(v.size - kept.sum())
    c = np.append(kept, esc).astype(np.int64)
    n = c.shape[0]
    total = int(c.sum())
    f = 1 + (c * (MODEL_TOTAL - n)) // total
    f[int(np.argmax(c))] += MODEL_TOTAL - int(f.sum())
    model = SymbolModel(vmin + lo_i, f.astype(np.uint16))
    model.validate()
    return model


def to_symbols(values: np.ndarray, model: SymbolModel) -> tuple[np.ndarray, np.ndarray]:
    """``(symbols int32, escaped mask)``: ``v - lo`` in range, the escape index outside."""
    v = np.asarray(values)
    if v.dtype != np.int32:
        v = v.astype(np.int64)
    out = v < model.lo
    out |= v > model.hi
    sym = (v - np.int32(model.lo)).astype(np.int32, copy=False)
    sym[out] = model.escape
    return sym, out


def symbols_crc(b_sym: np.ndarray, m_sym: np.ndarray) -> int:
    crc = zlib.crc32(np.ascontiguousarray(b_sym, dtype="<i4").tobytes())
    return zlib.crc32(np.ascontiguousarray(m_sym, dtype="<i4").tobytes(), crc)


def encode_block(b_sym: np.ndarray, m_sym: np.ndarray, model_b, model_m) -> np.ndarray:
    """One block's ANS words (uint32): decoding yields the ``b`` then the ``m`` symbols."""
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.ascontiguousarray(m_sym, dtype=np.int32), model_m)
    coder.encode_reverse(np.ascontiguousarray(b_sym, dtype=np.int32), model_b)
    return np.asarray(coder.get_compressed(), dtype=np.uint32)


class StreamError(ValueError):
    """A block's words do not decode to the declared symbols (the container turns it
    into EntropyStreamError)."""


def decode_block(words: np.ndarray, n_pairs: int, model_b, model_m) -> tuple[np.ndarray, np.ndarray]:
    """``(b_sym, m_sym)`` int32 of one block; raises :class:`StreamError` when the
    words are not a complete stream of exactly ``2 * n_pairs`` symbols."""
    import constriction

    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
        b_sym = coder.decode(model_b, n_pairs)
        m_sym = coder.decode(model_m, n_pairs)
        empty = coder.is_empty()
    except (ValueError, RuntimeError, AssertionError) as exc:  # constriction's own checks
        raise StreamError(f"ANS stream does not decode: {exc}") from None
    if not empty:
        raise StreamError("ANS stream has words left after the block's symbols")
    return np.asarray(b_sym, dtype=np.int32), np.asarray(m_sym, dtype=np.int32)
