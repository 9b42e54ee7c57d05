"""Numba CPU and Numba-CUDA kernels of the codec and of HyperLinear.

Importing the package first points numba's cache for these kernels at a
per-machine folder keyed by their sources (:mod:`numba_kernels.cache`), before
any kernel module compiles: a fresh checkout, Ray ``working_dir`` or pod then
loads what ``birkhoff warmup`` (or any earlier run) compiled.
"""

from .cache import install as _install_cache

_install_cache()
