"""Birkhoff compressor: data-free Hyper-Compression of model checkpoints.

Pure NumPy/torch (plus Numba kernels loaded on first use); no Ray, boto3 or
MLflow here, so that any worker or notebook can import it cheaply.

``HyperLinear``, ``apply_hyperlinear`` and ``load_model`` load on first access
(PEP 562): ``hyperlinear.py`` marks its forward with ``torch.compiler.disable``,
which imports ``torch._dynamo`` (1-4 s), and a shard task that only compresses
never needs it.
"""

from .backends import Backend, resolve_backend
from .codec import CODEC_VERSION, CompressedTensor, RawTensor, compress_tensor
from .config import HyperCompressionConfig, TensorOverride
from .errors import *  # noqa: F401,F403  (the typed errors are part of the API)

__version__ = "0.1.0"

_LAZY = {
    "HyperLinear": "hyperlinear",
    "HyperLinearError": "hyperlinear",
    "apply_hyperlinear": "modeling",
    "load_model": "modeling",
}


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'compressor' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
