"""Where numba caches the compiled kernels: once per machine, whatever the checkout path.

numba's own locators key a cache by the absolute directory of the source file
(the in-tree ``__pycache__``, or a ``NUMBA_CACHE_DIR`` subfolder named after a
hash of that path). A Ray ``working_dir`` is unpacked under a new session path on
every job and a KubeRay pod starts from its image, so those caches never hit and
every fresh worker compiled every kernel again (issue 10: 30 s of wall time for
8.7 s of codec on MiniLM's first run).

:class:`KernelCacheLocator` keys this package's kernels by *content* instead:

    <root>/py<X.Y>-numba<V>-llvmlite<V>/<sha256 of numba_kernels/*.py>/<module>/

* ``<root>``: ``$NUMBA_CACHE_DIR/birkhoff`` when the user set ``NUMBA_CACHE_DIR``,
  else the user's cache directory (``platformdirs``: ``$XDG_CACHE_HOME`` or
  ``~/.cache``) ``/birkhoff/numba``. Every process of one user on one machine
  (the driver, local Ray workers, ``birkhoff warmup`` run at image build or node
  start) computes the same path, so they share one cache.
* the source hash covers every kernel module: a kernel compiled into a caller in
  another file (``bitpack``'s groups, ``threads.claim``) changes the caller's
  cache key too, which numba's per-file stamp misses.
* numba still keys each entry by signature and target CPU (name and features), so
  machines of different kinds may share a root.

:func:`install` registers the locator ahead of numba's own (only for files of this
package; everything else falls through to them). It runs from
``numba_kernels/__init__.py``, before any kernel module is compiled. A user's
``NUMBA_CACHE_LOCATOR_CLASSES`` takes precedence (numba then ignores the default
list), and an unwritable root falls back to numba's default locators.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def sources_hash() -> str:
    """sha256 over the package's kernel sources (names and contents), 16 hex digits."""
    h = hashlib.sha256()
    for p in sorted(PACKAGE_DIR.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_root() -> Path:
    """The root every process of this user shares (see the module docstring)."""
    user = os.environ.get("NUMBA_CACHE_DIR")
    if user:
        return Path(user).expanduser() / "birkhoff"
    import platformdirs

    return Path(platformdirs.user_cache_dir("birkhoff", appauthor=False)) / "numba"


def cache_dir() -> Path:
    """This build's folder: root / interpreter and compiler versions / kernel sources."""
    import llvmlite
    import numba

    versions = f"py{sys.version_info[0]}.{sys.version_info[1]}-numba{numba.__version__}-llvmlite{llvmlite.__version__}"
    return cache_root() / versions / sources_hash()


def _locator_base():
    from numba.core.caching import _CacheLocator

    return _CacheLocator


class KernelCacheLocator(_locator_base()):
    """A numba cache locator for the modules of this package (content-keyed)."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = str(cache_dir() / Path(py_file).stem)

    def get_cache_path(self):
        return self._cache_path

    def get_source_stamp(self):
        # the folder is already keyed by every kernel source; numba compares this too
        return sources_hash()

    def get_disambiguator(self):
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        try:
            if Path(py_file).resolve().parent != PACKAGE_DIR:
                return None
        except OSError:
            return None
        self = cls(py_func, py_file)
        try:
            self.ensure_cache_path()
        except OSError as exc:  # read-only home, full disk: numba's default locators take over
            log.warning("numba cache folder %s unusable (%s); using numba's default cache location",
                        self._cache_path, exc)
            return None
        return self


def _register(impl_class) -> bool:
    classes = getattr(impl_class, "_locator_classes", None)
    if not isinstance(classes, list):
        return False
    if KernelCacheLocator not in classes:
        classes.insert(0, KernelCacheLocator)
    return True


def install() -> None:
    """Put :class:`KernelCacheLocator` first in numba's CPU cache locators."""
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    if impl is None or not _register(impl):
        log.warning("numba %s has no cache locator list to extend; kernels cache in numba's default location",
                    getattr(sys.modules.get("numba"), "__version__", "?"))


def install_cuda() -> None:
    """The same for numba-cuda's kernel cache (its own copy of the machinery); call
    after ``numba.cuda`` is imported, before the kernels are defined."""
    try:
        from numba.cuda.core import caching
    except ImportError:  # older numba-cuda, or the simulator build: default locations
        return
    impl = getattr(caching, "CacheImpl", None)
    if impl is not None:
        _register(impl)
