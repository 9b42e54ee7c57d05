"""Encoding a float tensor into a :class:`~.container.V2Tensor`: quantize it on the
scale-adaptive A2 lattice (:mod:`.lattice`, per-row steps), then entropy-code the
coordinates in independently decodable blocks (:mod:`.symbols`)."""

from __future__ import annotations

import zlib

import numpy as np

from ..dtypes import FLOAT_NAMES, NAME_BY_TORCH
from ..errors import NonFiniteTensorError
from . import lattice
from . import symbols as sy
from .config import CodecV2Config
from .container import V2Tensor
from .kernels import V2Kernels, resolve
from .layout import MAX_ELEMENTS, ROLES

def _as_numpy(w) -> tuple[np.ndarray, str]:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(w, torch.Tensor):
        dt = NAME_BY_TORCH.get(w.dtype)
        if dt not in FLOAT_NAMES:
            raise TypeError(f"unsupported dtype {w.dtype}")
        t = w.detach().to("cpu")
        return (t.float() if dt in ("float16", "bfloat16") else t).numpy(), dt
    a = np.asarray(w)
    if a.dtype == np.float16:
        return a.astype(np.float32), "float16"
    if a.dtype not in (np.float32, np.float64):
        raise TypeError(f"unsupported dtype {a.dtype}")
    return a, str(a.dtype)


def role_of(name: str, cfg: CodecV2Config) -> str:
    return "embedding" if cfg.is_embedding(name) else "linear"


def step_for(role: str, cfg: CodecV2Config) -> float:
    return cfg.rel_step * (cfg.embedding_factor if role == "embedding" else 1.0)


def encode_tensor(w, cfg: CodecV2Config | None = None, *, name: str = "tensor", role: str | None = None,
                  q: float | None = None, kernels: V2Kernels | str = "auto") -> V2Tensor:
    """Encode one float tensor (NumPy or torch; never modified). ``role`` defaults to
    the config's embedding patterns; ``q`` (relative step) defaults to the config's
    knob for that role (:func:`compressor.codec_v2.rate.plan_tensors` passes its own).
    Raises NonFiniteTensorError for NaN/Inf, ValueError when the tensor cannot be
    coded (fewer than 2 elements, a dynamic range beyond the caps): keep it raw."""
    cfg = cfg or CodecV2Config()
    k = kernels if isinstance(kernels, V2Kernels) else resolve(kernels)
    a, dt = _as_numpy(w)
    if a.ndim == 0 or a.size < 2:
        raise ValueError(f"{name}: v2 codes tensors of at least 2 elements, got shape {a.shape}")
    if a.size > MAX_ELEMENTS:
        raise ValueError(f"{name}: {a.size} elements exceed the cap {MAX_ELEMENTS}")
    if not np.isfinite(a).all():
        raise NonFiniteTensorError("tensor holds NaN or Inf", tensor=name)
    role = role or role_of(name, cfg)
    if role not in ROLES:
        raise ValueError(f"{name}: unknown role {role!r}")
    q = float(q if q is not None else step_for(role, cfg))
    rows2d = lattice.as_rows(a)
    rows, cols = rows2d.shape
    base, rel = lattice.row_steps(k.row_sumsq(rows2d), cols, q)
    m, b = k.encode_rows(rows2d, lattice.steps_f64(base, rel))
    return _entropy_code(name, a.shape, dt, role, q, base, rel, m, b, cfg.block_pairs)


def _entropy_code(name, shape, dt, role, q, base, rel, m, b, block_pairs) -> V2Tensor:
    rows, pairs = m.shape
    model_m = sy.build_model(m)
    model_b = sy.build_model(b)
    m_sym, m_esc = sy.to_symbols(m.ravel(), model_m)
    b_sym, b_esc = sy.to_symbols(b.ravel(), model_b)
    esc_pos = np.sort(np.concatenate([2 * np.flatnonzero(m_esc), 2 * np.flatnonzero(b_esc) + 1]))
    comp_b = (esc_pos & 1).astype(bool)
    src = np.where(comp_b, b.ravel()[esc_pos // 2], m.ravel()[esc_pos // 2]) if esc_pos.size else \
        np.zeros(0, dtype=np.int64)
    block_rows = max(1, min(rows, block_pairs // max(pairs, 1)))
    nb = -(-rows // block_rows)
    cm_m, cm_b = model_m.constriction_model(), model_b.constriction_model()
    words, wcrc, ccrc, chunks = [], [], [], []
    for kb in range(nb):
        p0, p1 = kb * block_rows * pairs, min(rows, (kb + 1) * block_rows) * pairs
        bs, ms = b_sym[p0:p1], m_sym[p0:p1]
        enc = sy.encode_block(bs, ms, cm_b, cm_m)
        chunks.append(enc)
        words.append(enc.shape[0])
        wcrc.append(zlib.crc32(np.ascontiguousarray(enc, dtype="<u4").tobytes()))
        ccrc.append(sy.symbols_crc(bs, ms))
    t = V2Tensor(name=name, shape=tuple(int(d) for d in shape), dtype=dt, role=role, q=q, base=float(base),
                 rel=rel, model_m=model_m, model_b=model_b, block_rows=block_rows,
                 block_words=np.array(words, dtype=np.uint32), block_crc=np.array(wcrc, dtype=np.uint32),
                 code_crc=np.array(ccrc, dtype=np.uint32), esc_index=esc_pos.astype(np.int64),
                 esc_value=src.astype(np.int32), payload=np.concatenate(chunks).astype(np.uint32))
    t._cm.update(m=cm_m, b=cm_b)
    return t
