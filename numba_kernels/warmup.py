"""Compile (or load from the cache) every kernel signature the project runs: ``birkhoff warmup``.

An image build or a node start-up runs it once; later processes on that machine
(Ray workers, ``birkhoff compress``, a fresh checkout's tests) then load the
machine code from :mod:`numba_kernels.cache` instead of compiling it. Each kernel
is called on a tiny input with exactly the array types its callers pass, so
lazily typed kernels compile the same signatures they will meet.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np

log = logging.getLogger(__name__)


def _dispatchers(*modules) -> list:
    seen: dict[int, object] = {}
    for mod in modules:
        for obj in vars(mod).values():
            if hasattr(obj, "stats") and hasattr(obj, "signatures") and hasattr(obj, "py_func"):
                seen[id(obj)] = obj
    return list(seen.values())


def compile_counts(modules=None) -> dict:
    """Kernel signatures this process has so far compiled, and loaded from the cache,
    over the given kernel modules (default: those already imported)."""
    if modules is None:
        names = ("numba_kernels.cpu", "numba_kernels.hyperlinear_cpu", "numba_kernels.cuda",
                 "numba_kernels.lattice_v2_cpu", "numba_kernels.lattice_linear_cpu")
        modules = [sys.modules[n] for n in names if n in sys.modules]
    compiled = loaded = sigs = 0
    for d in _dispatchers(*modules):
        stats = d.stats
        loaded += sum(getattr(stats, "cache_hits", {}).values())
        compiled += sum(getattr(stats, "cache_misses", {}).values())
        sigs += len(d.signatures)
    return {"signatures": sigs, "compiled": compiled, "loaded_from_cache": loaded}


def _codec_calls(k, trial_tables) -> None:
    """The codec kernels on every index dtype they are called with. ``trial_tables``
    builds ``(k, lut_x, lut_y)`` (``compressor.quant_primitives.trial_tables``): the
    kernels take their tables as arguments."""
    rng = np.random.default_rng(0)
    px = 0.02 * rng.standard_normal(300)
    py = 0.02 * rng.standard_normal(300)
    rho = np.array([0.05, 0.065, 0.08])  # K = 2 class radii of a 0.1 box
    side, lx, ly = trial_tables(1600, 0.1, 0.0, 0.0, rho)
    to_device = getattr(k, "to_device", None) or (lambda a: a)
    theta, _ = k.encode_trial(to_device(px), to_device(py), 0.0, 0.0, 0.1, 1600, rho, 7, side, lx, ly)
    for dt in (np.uint16, np.uint32, np.int64):
        k.decode_points(theta.astype(dt), lx, ly)
    for dt in (np.uint16, np.uint32):
        if hasattr(k, "error_sum"):
            k.error_sum(theta.astype(dt), lx, ly, px, py, 7)
        packed = k.pack_bits(theta.astype(dt), 13)
        k.unpack_bits(packed, theta.size, 13)
    if hasattr(k, "radius_and_inner"):
        k.radius_and_inner(px, py, 0.0, 0.0, 0.1)
    if hasattr(k, "nearest"):
        # the decode table's first U x's and first k y's are the lattice coordinates
        k.nearest(px, py, 1600, 0.1, 0.0, 0.0, side, lx[:1600], ly[:side])


def _hyperlinear_cpu_calls(k) -> None:
    """``decode_rows`` for each (index dtype, weight dtype) HyperLinear uses; ``fused_rows``
    has explicit signatures (compiled at import) but runs once too."""
    theta16 = np.zeros((4, 3), dtype=np.uint16)
    for theta in (theta16, theta16.astype(np.int32)):
        for ivt in (np.int16, np.int32, np.int64):  # fp16/bf16, fp32, fp64 as same-width integers
            lut = np.zeros(8, dtype=ivt)
            out = np.empty((4, 5), dtype=ivt)
            k.decode_rows(theta, lut, lut, out)
        table = k.pair_table(np.zeros(8, np.float32), np.zeros(8, np.float32))
        x = np.zeros((2, 5), np.float32)
        k.fused_rows(x, theta, table, np.zeros(4, np.float32), np.empty((2, 4), np.float32), 0, 4)


def _lattice_v2_calls(k, lin) -> None:
    """Codec v2's kernels with the array types its callers pass: float32 and float64
    weights, int32 coordinates from the encoder and int64 from a checkpoint's decoded
    stream, float32 and float64 outputs; the linear layer's kernels have explicit
    signatures (compiled or loaded at import)."""
    for dt in (np.float32, np.float64):
        w = np.zeros((2, 5), dt)
        k.row_sumsq(w, np.empty(2, np.float64))
        k.encode_rows(w, np.ones(2), np.empty((2, 3), np.int32), np.empty((2, 3), np.int32))
    for it in (np.int32, np.int64):
        for out in (np.float32, np.float64):
            k.decode_rows(np.zeros((2, 3), it), np.zeros((2, 3), it), np.ones(2), np.empty((2, 5), out))
    del lin  # imported: its signatures are compiled or loaded


def warm_up(cuda: bool | None = None, *, trial_tables) -> dict:
    """Compile or load every CPU kernel (and the CUDA codec kernels when ``cuda`` is
    True, or None and a real GPU is usable). ``trial_tables``: the codec's table
    builder (see :func:`_codec_calls`; ``compressor.backends.warm_up`` passes the
    reference's). Returns what happened: seconds, cache folder, signatures compiled
    and loaded from the cache."""
    t0 = time.perf_counter()
    from . import cache, cpu, hyperlinear_cpu, lattice_linear_cpu, lattice_v2_cpu

    _codec_calls(cpu, trial_tables)
    _hyperlinear_cpu_calls(hyperlinear_cpu)
    _lattice_v2_calls(lattice_v2_cpu, lattice_linear_cpu)
    mods = [cpu, hyperlinear_cpu, lattice_v2_cpu, lattice_linear_cpu]
    result: dict = {"cache_dir": str(cache.cache_dir()), "cuda": "skipped"}
    if cuda is not False:
        try:
            from . import cuda as cuda_kernels

            ok, why = cuda_kernels.is_available()
        except ImportError as exc:
            ok, why = False, f"numba-cuda not importable ({exc})"
        if ok:
            # the codec's kernels (cache=True); HyperLinear's CUDA kernels are not cached
            # by numba-cuda here and compile in each process on first use
            _codec_calls(cuda_kernels, trial_tables)
            mods.append(cuda_kernels)
            result["cuda"] = "compiled"
        elif cuda:
            raise RuntimeError(f"CUDA warm-up requested but no usable GPU: {why}")
        else:
            result["cuda"] = f"skipped ({why})"
    result.update(compile_counts(mods))
    result["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("kernels warm: %s", result)
    return result
