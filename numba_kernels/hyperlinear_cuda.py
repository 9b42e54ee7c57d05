"""Numba-CUDA kernels of HyperLinear (``compressor/hyperlinear.py``).

* :func:`decode_pairs` (large token counts, even ``in``, fp32/fp16/bf16): one thread
  per index copies the pair ``(W[i, 2j], W[i, 2j+1])`` from a packed table (the two
  weights' bit patterns in one 32-bit word for 16-bit dtypes, one 64-bit word for
  fp32) into a workspace viewed as ``[out, in/2]`` words: one gather and one
  coalesced store per index. torch's matmul (tensor cores in fp16/bf16) then does
  the product. Bit patterns only: one kernel for every dtype (numba has no bf16
  type), and ``W`` equals the table cast to that dtype exactly.
* :func:`decode_rows`: the same decode from two tables, one weight per store, for
  what the packed form cannot hold (odd ``in``: the padded y is dropped; fp64).
* :func:`fused_linear` (small token counts, ``T <= MAX_TOKENS``): one warp per
  output row walks the row's indices, decodes each pair of weights in registers
  (tables read through the L1 cache) and accumulates every token at once; a
  shared-memory pass sums the 32 lane partials per token (a shuffle would do, but
  the CUDA simulator CI runs lacks ``shfl_down_sync``) and adds the bias. ``W`` never
  exists in memory. fp32 in, fp32 accumulate, fp32 out (the caller casts fp16/bf16
  around it; with ``T`` small that costs two tiny element-wise kernels).

Every array argument is anything numba accepts as a device array: numba device
arrays, torch CUDA tensors (``__cuda_array_interface__``), or NumPy arrays under
``NUMBA_ENABLE_CUDASIM=1`` (how CI tests these kernels). ``stream`` is a numba
stream (use ``cuda.external_stream(torch.cuda.current_stream().cuda_stream)`` so
the kernels order correctly against torch's work; :func:`stream_for` caches them) or 0.
Launch cost matters at small token counts, so callers convert what does not
change between calls (indices, tables, bias) once with :func:`kernel_arg` and keep
it: numba then skips re-reading ``__cuda_array_interface__`` for those arguments.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
from numba import float32, int64

from ._compat import import_cuda

cuda = import_cuda()

MAX_TOKENS = 16  # per-thread accumulators of the fused kernel
WARPS_PER_BLOCK = 4
DECODE_BLOCK = (64, 4)  # (index columns, rows) per block


@cuda.jit
def _decode_rows_kernel(theta, lut_x, lut_y, out):
    j, i = cuda.grid(2)
    rows = theta.shape[0]
    pairs = theta.shape[1]
    n_in = out.shape[1]
    if i < rows and j < pairs:
        t = int64(theta[i, j])
        c = 2 * j
        out[i, c] = lut_x[t]
        if c + 1 < n_in:  # an odd ``in`` drops the padded y
            out[i, c + 1] = lut_y[t]


@cuda.jit
def _decode_pairs_kernel(theta, lut_xy, out):
    j, i = cuda.grid(2)
    if i < theta.shape[0] and j < theta.shape[1]:
        out[i, j] = lut_xy[int64(theta[i, j])]


@cuda.jit
def _fused_linear_kernel(x, theta, lut_x, lut_y, bias, has_bias, out):
    lane = cuda.threadIdx.x % 32
    warp = cuda.threadIdx.x // 32
    row = cuda.blockIdx.x * WARPS_PER_BLOCK + warp
    rows = theta.shape[0]
    pairs = theta.shape[1]
    n_tok = x.shape[0]
    n_in = x.shape[1]
    # lane partial sums; stride 33 keeps the column reads below free of bank conflicts
    part = cuda.shared.array((WARPS_PER_BLOCK, MAX_TOKENS, 33), float32)
    acc = cuda.local.array(MAX_TOKENS, float32)
    for t in range(MAX_TOKENS):
        acc[t] = float32(0.0)
    if row < rows:
        for j in range(lane, pairs, 32):  # a warp reads 32 consecutive indices: coalesced
            th = int64(theta[row, j])
            wx = lut_x[th]
            c = 2 * j
            if c + 1 < n_in:
                wy = lut_y[th]
                for t in range(n_tok):
                    acc[t] += x[t, c] * wx + x[t, c + 1] * wy
            else:  # odd ``in``: the padded y is never used
                for t in range(n_tok):
                    acc[t] += x[t, c] * wx
    for t in range(n_tok):
        part[warp, t, lane] = acc[t]
    cuda.syncthreads()  # every thread reaches it: no early return above
    if row < rows and lane < n_tok:
        s = float32(0.0)
        for l in range(32):
            s += part[warp, lane, l]
        if has_bias:
            s += bias[row]
        out[lane, row] = s


class KernelCall(NamedTuple):
    """One launch of a kernel: what :meth:`launch` runs through numba's dispatcher
    and what :meth:`prepare` turns into a :class:`PreparedLaunch`. ``varying``:
    the array arguments whose data pointers change from call to call."""
    kernel: object
    args: tuple
    grid: tuple
    block: object
    varying: tuple

    def launch(self, stream=0) -> None:
        self.kernel[self.grid, self.block, stream](*self.args)

    def prepare(self, stream=0) -> "PreparedLaunch":
        return PreparedLaunch(self, stream)


def _decode_grid(theta) -> tuple:
    rows, pairs = theta.shape
    bx, by = DECODE_BLOCK
    return math.ceil(pairs / bx), math.ceil(rows / by)


def decode_call(theta, lut_x, lut_y, lut_xy, out) -> Optional[KernelCall]:
    """The decode of ``theta`` into the workspace view ``out``: :func:`decode_pairs`
    where a packed table ``lut_xy`` is given, else :func:`decode_rows`; ``None``
    for an empty layer. The workspace is the varying argument."""
    rows, pairs = theta.shape
    if rows == 0 or pairs == 0:
        return None
    if lut_xy is None:
        return KernelCall(_decode_rows_kernel, (theta, lut_x, lut_y, out), _decode_grid(theta), DECODE_BLOCK, (3,))
    if out.shape[0] != rows or out.shape[1] != pairs:
        raise ValueError(f"decode_pairs: out has shape {tuple(out.shape)}, indices {tuple(theta.shape)}")
    return KernelCall(_decode_pairs_kernel, (theta, lut_xy, out), _decode_grid(theta), DECODE_BLOCK, (2,))


def decode_rows(theta, lut_x, lut_y, out, stream=0) -> None:
    """``out[i, 2j] = lut_x[theta[i, j]]``, ``out[i, 2j+1] = lut_y[theta[i, j]]``
    (same-width integer views of the compute dtype; see the module docstring)."""
    call = decode_call(theta, lut_x, lut_y, None, out)
    if call is not None:
        call.launch(stream)


def decode_pairs(theta, lut_xy, out, stream=0) -> None:
    """``out[i, j] = lut_xy[theta[i, j]]``: ``out`` is the workspace ``W [out, in]``
    (even ``in``) viewed as ``[out, in/2]`` words of twice the dtype's width and
    ``lut_xy`` the packed table (:func:`pack_pairs`)."""
    call = decode_call(theta, None, None, lut_xy, out)
    if call is not None:
        call.launch(stream)


def pack_pairs(lx_bits: np.ndarray, ly_bits: np.ndarray) -> np.ndarray:
    """The packed table of :func:`decode_pairs`: the tables' bit patterns
    (``int16``/``int32`` views) as one little-endian word per point, x in the low
    half, so that storing the word writes ``x`` then ``y``."""
    if lx_bits.dtype != ly_bits.dtype or lx_bits.shape != ly_bits.shape or lx_bits.dtype.itemsize not in (2, 4):
        raise ValueError(f"pack_pairs takes two equal 16- or 32-bit tables, got {lx_bits.dtype} {lx_bits.shape} "
                         f"and {ly_bits.dtype} {ly_bits.shape}")
    width = lx_bits.dtype.itemsize
    unsigned = np.uint16 if width == 2 else np.uint32
    word = np.uint32 if width == 2 else np.uint64
    lo = lx_bits.view(unsigned).astype(word)
    hi = ly_bits.view(unsigned).astype(word)
    packed = lo | (hi << word(8 * width))
    return packed.view(np.int32 if width == 2 else np.int64)


def fused_linear_call(x, theta, lut_x, lut_y, out, bias=None) -> Optional[KernelCall]:
    """``out[t, i] = sum_c x[t, c] * W[i, c] (+ bias[i])`` for ``T <= MAX_TOKENS``
    tokens (``x``, tables, ``bias`` and ``out`` float32); ``None`` when there is
    nothing to compute. ``x`` and ``out`` are the varying arguments."""
    n_tok = x.shape[0]
    if n_tok > MAX_TOKENS:
        raise ValueError(f"fused_linear takes at most {MAX_TOKENS} tokens, got {n_tok}")
    rows = theta.shape[0]
    if rows == 0 or n_tok == 0:
        return None
    if bias is None:
        bias, has_bias = _no_bias(), 0
    else:
        if bias.shape[0] != rows:
            raise ValueError(f"fused_linear: bias has {bias.shape[0]} entries, the layer {rows} rows")
        has_bias = 1
    return KernelCall(_fused_linear_kernel, (x, theta, lut_x, lut_y, bias, has_bias, out),
                      (math.ceil(rows / WARPS_PER_BLOCK),), 32 * WARPS_PER_BLOCK, (0, 6))


def fused_linear(x, theta, lut_x, lut_y, out, stream=0, bias=None) -> None:
    """Runs :func:`fused_linear_call`."""
    call = fused_linear_call(x, theta, lut_x, lut_y, out, bias)
    if call is not None:
        call.launch(stream)


_NO_BIAS_HOST = np.zeros(1, np.float32)
_no_bias_dev: dict = {}


def _no_bias():
    """A one-element float32 array for the kernel's unread bias argument: host
    memory under the simulator, device memory (made once per GPU) on a GPU."""
    if is_simulator():
        return _NO_BIAS_HOST
    dev_id = cuda.get_current_device().id
    arr = _no_bias_dev.get(dev_id)
    if arr is None:
        arr = _no_bias_dev[dev_id] = cuda.to_device(_NO_BIAS_HOST)
    return arr


class FastLaunchUnavailable(RuntimeError):
    """A :class:`PreparedLaunch` cannot be made here (the reason says why); the
    caller launches through numba's dispatcher instead."""


def _as_int(v) -> int:
    if isinstance(v, int):
        return v
    return int(v.value) if hasattr(v, "value") else int(v)


def substitute(template: list, slots: tuple, values) -> list:
    """A copy of ``template`` with ``template[slots[i]]`` replaced by ``values[i]``,
    keeping each slot's type (a Python int, a ctypes pointer, a driver pointer)."""
    a = list(template)
    for pos, v in zip(slots, values):
        old = a[pos]
        a[pos] = v if isinstance(old, int) else type(old)(v)
    return a


def pointer_slots(spans: list, args: tuple, varying: tuple) -> tuple:
    """Where the data pointers of the ``varying`` arguments sit in numba's flat
    argument list (``spans[i]``: where argument ``i`` starts). numba flattens an
    array as (meminfo, parent, nitems, itemsize, data, shape..., strides...); the
    slot is checked against the array's real pointer, never assumed."""
    flat, starts = spans
    slots = []
    for i in varying:
        want = int(args[i].__cuda_array_interface__["data"][0])
        pos = starts[i] + 4
        if pos >= len(flat) or _as_int(flat[pos]) != want:
            raise FastLaunchUnavailable(f"numba's argument layout is not the expected one (argument {i}: "
                                        f"no data pointer at offset 4)")
        slots.append(pos)
    return tuple(slots)


class PreparedLaunch:
    """One kernel launch with its arguments marshalled once, by numba itself
    (``_Kernel._prepare_args``); each call then replaces only the data pointers of
    the arguments named ``varying`` (same shapes and strides) and launches through
    ``cuda.core.launch``, as numba's own ``_Kernel.launch`` does. This skips
    numba's per-call typing and marshalling, tens of microseconds that decide
    the speed of a layer at a few tokens. Raises :class:`FastLaunchUnavailable`
    where that cannot be done safely (the simulator, a debug or cooperative
    kernel, an argument numba would copy, an unexpected argument layout)."""

    def __init__(self, call: "KernelCall", stream):
        dispatcher, args, griddim, blockdim, varying = call
        if is_simulator():
            raise FastLaunchUnavailable("the CUDA simulator launches through numba's dispatcher only")
        try:
            from cuda.core import LaunchConfig, launch
            from numba.cuda._compat import CUDA_CORE_GE_1_0
        except ImportError as exc:
            raise FastLaunchUnavailable(f"cuda.core launch API not importable ({exc})") from None
        argtypes = tuple(dispatcher.typeof_pyval(a) for a in args)
        kernel = dispatcher.compile(argtypes)
        if getattr(kernel, "debug", False) or getattr(kernel, "cooperative", False) \
                or getattr(kernel, "launch_config_sensitive", False) or getattr(kernel, "extensions", None):
            raise FastLaunchUnavailable("kernel compiled with debug, cooperative, launch-config-sensitive "
                                        "or extension options")
        flat: list = []
        starts = []
        retr: list = []
        for ty, val in zip(kernel.argument_types, args):
            starts.append(len(flat))
            kernel._prepare_args(ty, val, stream, retr, flat)
        if retr:
            raise FastLaunchUnavailable("an argument is host memory that numba would copy on every call")
        self._slots = pointer_slots((flat, starts), args, varying)
        self._flat = flat
        self._launch = launch
        self._kernel = kernel._codelibrary.get_cufunc().kernel
        self._stream = stream
        gd = griddim if isinstance(griddim, tuple) else (griddim,)
        bd = blockdim if isinstance(blockdim, tuple) else (blockdim,)
        gd, bd = gd + (1,) * (3 - len(gd)), bd + (1,) * (3 - len(bd))  # as numba normalizes them
        if CUDA_CORE_GE_1_0:
            self._config = LaunchConfig(grid=gd, block=bd, shmem_size=0, is_cooperative=False)
        else:
            self._config = LaunchConfig(grid=gd, block=bd, shmem_size=0, cooperative_launch=False)

    def __call__(self, *pointers: int) -> None:
        self._launch(self._stream, self._config, self._kernel, *substitute(self._flat, self._slots, pointers))


def kernel_arg(t):
    """What to pass a kernel for ``t`` (a torch tensor or any array): a numba
    device-array view of a CUDA tensor, made once and reusable for as long as
    ``t`` lives; under the simulator, the host array itself."""
    if hasattr(t, "__cuda_array_interface__"):
        return cuda.as_cuda_array(t)
    return np.asarray(t)


_streams: dict = {}


def stream_for(handle: int, device_index: int = 0):
    """The numba stream for a raw CUDA stream handle (torch's
    ``current_stream(device).cuda_stream``), made once per (device, handle).
    Handle 0 is the legacy default stream for torch and numba alike."""
    if not handle:
        return 0
    key = (device_index, handle)
    s = _streams.get(key)
    if s is None:
        s = _streams[key] = cuda.external_stream(handle)
    return s


def is_simulator() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)
