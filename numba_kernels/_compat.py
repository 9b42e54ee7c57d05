"""Import shims for the Numba kernels.

Every import of ``numba.cuda`` in this project goes through :func:`import_cuda`.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np


def import_cuda() -> ModuleType:
    """Return the ``numba.cuda`` module (real driver or simulator).

    numba-cuda 0.30.4 registers ``overload(np.row_stack)`` at import time, without
    checking that the attribute exists; NumPy 2.5 removed ``np.row_stack`` (it was
    an alias of ``np.vstack``), so the import dies with AttributeError. Restoring
    the alias before the import is harmless on older NumPy, where it already exists.
    """
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack
    from numba import cuda

    from .cache import install_cuda

    install_cuda()  # CUDA kernels cache beside the CPU ones (numba_kernels/cache.py)
    return cuda
