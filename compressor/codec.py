"""Per-tensor Hyper-Compression: the paper's Algorithm 1 over ``U`` and ``K``.

The heavy per-point work (classify, scale, nearest lattice point, decode, error)
is one ``encode_trial`` call of the chosen backend; everything that must agree
bit for bit between backends (centroid, radius, class radii, the choice of
``U``/``K``, the final dtype-exact MAE) is computed here once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch

from . import quant_primitives as qp
from .backends import Kernels, resolve_backend
from .config import HyperCompressionConfig
from .dtypes import FLOAT_TORCH, TORCH_BY_NAME, dtype_name
from .errors import NonFiniteTensorError, OutOfRangeTensorError

log = logging.getLogger(__name__)

CODEC_VERSION = 1

#: largest |w| the codec takes: the float64 geometry squares differences of
#: values (radius, distances), which overflows to inf near 1.3e154
MAX_ABS_VALUE = 1e150

@dataclass
class CompressedTensor:
    """One compressed tensor: its indices and the constants that decode them."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    pad: bool
    cx: float
    cy: float
    radius: float
    box_size: float
    U: int
    K: int
    bits: int
    mae: float
    abs_error_sum: float
    theta: np.ndarray = field(repr=False)  # [n_points] uint16/uint32, row-major over the points

    raw = False

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def n_points(self) -> int:
        return int(self.theta.shape[0])

    @property
    def pad_cols(self) -> int:
        if not self.pad:
            return 0
        return (self.shape[1] + 1) // 2 if self.layout == qp.LAYOUT_ROWS else self.n_points

    def rho(self) -> np.ndarray:
        return qp.class_radii(self.radius, self.box_size, self.K)

    def lut(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 decode table over every ``theta`` (``U*(K+1)`` entries)."""
        return qp.decode_lut(self.U, self.K, self.box_size, self.cx, self.cy, self.rho())

    def decode(self, kernels: Kernels | None = None) -> torch.Tensor:
        """The decoded tensor in its original dtype and shape."""
        kernels = kernels or resolve_backend("auto").kernels
        lx, ly = self.lut()
        x, y = kernels.decode_points(self.theta, lx, ly)
        arr = qp.points_to_tensor(x, y, self.shape, self.layout)
        return torch.from_numpy(np.ascontiguousarray(arr)).to(TORCH_BY_NAME[self.dtype])

    def theta_matrix(self) -> np.ndarray:
        """Indices as ``[out, ceil(in/2)]`` (rows layout only): HyperLinear's buffer."""
        if self.layout != qp.LAYOUT_ROWS:
            raise ValueError(f"{self.name}: only rows-layout tensors form an index matrix")
        return self.theta.reshape(self.shape[0], (self.shape[1] + 1) // 2)

    def meta(self) -> dict:
        return {
            "raw": False,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "layout": self.layout,
            "pad": self.pad,
            "n_points": self.n_points,
            "centroid": [self.cx, self.cy],
            "radius": self.radius,
            "box_size": self.box_size,
            "U": self.U,
            "K": self.K,
            "bits": self.bits,
            "mae": self.mae,
            "abs_error_sum": self.abs_error_sum,
        }


@dataclass
class RawTensor:
    """A tensor kept as it was; ``reason`` says why."""

    name: str
    tensor: torch.Tensor = field(repr=False)
    reason: str

    raw = True
    mae = 0.0
    abs_error_sum = 0.0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> str:
        return dtype_name(self.tensor.dtype)

    @property
    def numel(self) -> int:
        return int(self.tensor.numel())

    def decode(self, kernels: Kernels | None = None) -> torch.Tensor:
        return self.tensor

    def meta(self) -> dict:
        return {"raw": True, "raw_reason": self.reason, "shape": list(self.shape), "dtype": self.dtype}


TensorEntry = Union[CompressedTensor, RawTensor]


def _raw(name: str, tensor: torch.Tensor, reason: str) -> RawTensor:
    # detach + contiguous copy: never alias (or later mutate) the caller's tensor
    return RawTensor(name, tensor.detach().to("cpu").contiguous().clone(), reason)


def _spread(w64: np.ndarray, chunk: int = 1 << 20) -> float:
    """Mean absolute deviation from the mean, in float64, in chunks (no temporary
    the size of the tensor)."""
    flat = w64.reshape(-1)
    if flat.size == 0:
        return 0.0
    mean = float(flat.mean())
    total = 0.0
    for i in range(0, flat.size, chunk):
        total += float(np.abs(flat[i:i + chunk] - mean).sum())
    return total / flat.size


def _compressible(name: str, tensor: torch.Tensor, config: HyperCompressionConfig, is_buffer: bool) -> str | None:
    """Why a tensor stays raw before any numeric work (None: try to compress it)."""
    if config.settings_for(name).raw:
        return "override"
    if is_buffer:
        return "buffer"
    if tensor.dtype not in FLOAT_TORCH:
        return "non-float"
    if tensor.numel() < config.min_elements:
        return "small"
    return None


def value_problem(name: str, tensor: torch.Tensor, config: HyperCompressionConfig | None = None, *,
                  file: str | None = None, is_buffer: bool = False) -> str | None:
    """Check a source tensor's values before compressing it: NaN/Inf, or values too
    large for the codec's float64 geometry. Raises the typed error (naming the
    file and the tensor) when ``config.nonfinite == "error"``; returns the raw
    reason (``"nonfinite"``) when such tensors are to be kept raw; None when the
    tensor is fine or stays raw anyway. Cheap: one pass, no encoding."""
    config = config or HyperCompressionConfig()
    if _compressible(name, tensor, config, is_buffer) is not None:
        return None
    t = tensor.detach()
    finite = bool(torch.isfinite(t).all())
    peak = float(t.abs().max()) if finite else float("inf")
    if finite and peak <= MAX_ABS_VALUE:
        return None
    if config.nonfinite == "raw":
        log.warning("%s holds %s: kept raw as configured", name, "NaN/Inf" if not finite else f"|w| up to {peak:.3g}")
        return "nonfinite"
    if not finite:
        raise NonFiniteTensorError(
            "tensor holds NaN or Inf (set nonfinite='raw' / --keep-nonfinite-raw to keep such tensors uncompressed)",
            file=file, tensor=name)
    raise OutOfRangeTensorError(
        f"tensor holds values up to |w| = {peak:.3g}, above the codec's limit of {MAX_ABS_VALUE:.0e} (its float64 "
        "geometry would overflow); set nonfinite='raw' / --keep-nonfinite-raw to keep such tensors uncompressed",
        file=file, tensor=name)


def compress_tensor(
    name: str,
    tensor: torch.Tensor,
    config: HyperCompressionConfig | None = None,
    backend: str | Kernels = "auto",
    *,
    file: str | None = None,
    is_buffer: bool = False,
) -> TensorEntry:
    """Compress one tensor by Algorithm 1, or keep it raw (and say why).

    Never modifies ``tensor``. ``file`` only names the source in errors.
    """
    config = config or HyperCompressionConfig()
    kernels = backend if isinstance(backend, Kernels) else resolve_backend(backend).kernels
    settings = config.settings_for(name)
    reason = _compressible(name, tensor, config, is_buffer)
    if reason is not None:
        return _raw(name, tensor, reason)
    reason = value_problem(name, tensor, config, file=file, is_buffer=is_buffer)
    if reason is not None:
        return _raw(name, tensor, reason)

    w64 = tensor.detach().to("cpu", torch.float64).numpy()
    # The lattice cannot hit a constant exactly, and its spacing (l/sqrt(U)) dwarfs a
    # near-zero tensor: both would decode to lattice noise however small the
    # absolute error. The spread (mean |w - mean w|) is the scale the error is
    # measured against (relative_fallback below); zero spread means constant.
    spread = None
    if settings.relative_fallback is not None:
        if w64.min() == w64.max():
            return _raw(name, tensor, "constant")
        spread = _spread(w64)

    shape = tuple(tensor.shape)
    layout = qp.choose_layout(shape)
    pts = qp.tensor_points(w64, layout)
    # one upload per tensor (identity on the CPU): every trial below reuses it
    dpx, dpy = kernels.to_device(pts.px), kernels.to_device(pts.py)
    box = float(settings.box_size)
    geo = qp.point_geometry(pts.px, pts.py, box, kernels.radius_and_inner)
    search_mae, U, K, theta = _search(kernels, dpx, dpy, pts, geo, box, settings)
    if search_mae > settings.fallback_mae:
        return _raw(name, tensor, "fallback")
    if spread is not None and search_mae > settings.relative_fallback * spread:
        log.debug("%s: MAE %.3g is above %.3g x its spread %.3g: kept raw", name, search_mae,
                  settings.relative_fallback, spread)
        return _raw(name, tensor, "relative")

    bits = qp.bits_for(int(theta.max()) if theta.size else 0)
    theta = theta.astype(np.uint16) if bits <= 16 else theta.astype(np.uint32)
    entry = CompressedTensor(
        name=name, shape=shape, dtype=dtype_name(tensor.dtype), layout=layout, pad=pts.pad,
        cx=geo.cx, cy=geo.cy, radius=geo.R, box_size=box, U=int(U), K=int(K), bits=bits,
        mae=0.0, abs_error_sum=0.0, theta=theta,
    )
    _set_dtype_exact_error(entry, kernels, pts)
    return entry


def _search(kernels: Kernels, dpx, dpy, pts, geo, box: float, settings) -> tuple:
    """Algorithm 1's search over ``U`` (the point counts) and ``K`` (the classes):
    ``(mae, U, K, theta)`` of the best trial. It stops early once a trial reaches the
    target MAE, and tries the next ``U`` only while no ``U`` so far met its target."""
    k_range = [0] if geo.all_inner else list(range(1, settings.max_classes + 1))
    best = None  # (mae, U, K, theta)
    for ui, U in enumerate(settings.points):
        for K in k_range:
            rho = qp.class_radii(geo.R, box, K)
            theta, err = kernels.encode_trial(dpx, dpy, geo.cx, geo.cy, box, U, rho, pts.pad_cols)
            mae = err / pts.numel
            if best is None or mae < best[0]:
                best = (mae, U, K, theta)
            if mae <= settings.target_mae:
                break
        if best[0] <= settings.points_target_mae or ui == len(settings.points) - 1:
            break
    return best


def _set_dtype_exact_error(entry: CompressedTensor, kernels: Kernels, pts) -> None:
    """The reported error is against the decoded tensor *in the source dtype*, so
    that decompressing and recomputing gives the same number. Rounding the
    U*(K+1)-entry table to that dtype is the same as rounding every decoded
    value, and one gather pass then replaces a full decode."""
    lx, ly = entry.lut()
    tdt = TORCH_BY_NAME[entry.dtype]
    lx = torch.from_numpy(lx).to(tdt).to(torch.float64).numpy()
    ly = torch.from_numpy(ly).to(tdt).to(torch.float64).numpy()
    err = float(kernels.error_sum(entry.theta, lx, ly, pts.px, pts.py, pts.pad_cols))
    entry.abs_error_sum = err
    entry.mae = err / pts.numel
