"""Threads of the codec's CPU kernels: how many, and a dynamic schedule over chunks.

A static ``prange`` gives each thread an equal share of the iterations fixed in
advance, so a call ends when its slowest thread does; on cores that other
processes share (Ray workers on one node, a second job on the machine) one
descheduled thread held MiniLM's compress at 8-11 s instead of 1.5 s (issue 10).
Here instead every thread runs the same serial, GIL-free kernel, which claims
small chunks of the work from one shared counter (:func:`claim`, an atomic
fetch-and-add) until none is left: a slow thread simply claims fewer chunks.
The threads are a small Python pool that waits on a lock, not a spinning
OpenMP team. (``numba.set_parallel_chunksize`` is no substitute here: with the
``omp`` threading layer this venv gets, numba's ``parallel_for`` runs the chunks
under ``#pragma omp for`` with no schedule clause, which GNU OpenMP splits
statically; only the ``tbb`` layer schedules them dynamically, and TBB is not
installed.) Every chunk's result depends only on its own points, so the
output is the same bits for any thread count and any schedule.

The thread count is process-wide: :func:`set_threads` (a Ray shard task sets it
to its CPU request), else ``NUMBA_NUM_THREADS`` (numba's default: the CPUs this
process may run on).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
from numba import types
from numba.core import config
from numba.extending import intrinsic

_threads: Optional[int] = None
_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


def get_threads() -> int:
    """Threads a kernel call uses: :func:`set_threads`'s value, else ``NUMBA_NUM_THREADS``."""
    return _threads if _threads is not None else max(1, int(config.NUMBA_NUM_THREADS))


def set_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) for every later kernel call in this process."""
    global _threads
    n = int(n)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    _threads = n


def _worker_pool(n: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="birkhoff-codec")
        return _pool


def run_chunks(kernel: Callable, n_chunks: int, *args) -> None:
    """``kernel(*args, counter)`` on up to :func:`get_threads` threads (the caller is
    one of them); the kernel claims chunk numbers from ``counter`` with
    :func:`claim` until they reach ``n_chunks``. Returns when every chunk is done;
    re-raises the first exception of any thread."""
    counter = np.zeros(1, dtype=np.int64)
    n = min(get_threads(), max(1, int(n_chunks)))
    if n == 1:
        kernel(*args, counter)
        return
    pool = _worker_pool(n - 1)
    futs = [pool.submit(kernel, *args, counter) for _ in range(n - 1)]
    try:
        kernel(*args, counter)
    finally:
        for f in futs:
            f.result()


@intrinsic
def claim(typingctx, counter):
    """``counter[0] += 1`` atomically, returning the old value: the next chunk number.

    An LLVM ``atomicrmw add`` (``lock xadd`` on x86-64) on the first element of a
    1-D int64 array; numba has no atomics for CPU code."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64 and counter.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        one = context.get_constant(types.int64, 1)
        return builder.atomic_rmw("add", arr.data, one, "seq_cst")

    return types.int64(counter), codegen
