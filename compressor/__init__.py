"""Birkhoff compressor: data-free Hyper-Compression of model checkpoints.

Pure NumPy/torch (plus Numba kernels loaded on first use); no Ray, boto3 or
MLflow here, so that any worker or notebook can import it cheaply.

``HyperLinear``, ``apply_hyperlinear`` and ``load_model`` load on first access
(PEP 562): ``hyperlinear/module.py`` marks its forward with ``torch.compiler.disable``,
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


def _register_with_transformers(_module) -> None:
    """Teach transformers the ``birkhoff`` quantization method (``from_pretrained`` on
    a compressed directory). Runs when transformers loads its quantizer registry, or
    now if it already has: importing transformers costs nothing here until then."""
    import sys

    mod = sys.modules.get(f"{__name__}.hf_quantizer")
    if mod is not None and not getattr(mod, "_IMPORTED", False):
        return  # it is being imported (its transformers imports got us here): it registers at its end
    try:
        from .hf_quantizer import register

        register()
    except Exception as exc:  # never break transformers' own import; load_model still works
        import logging

        logging.getLogger(__name__).warning(
            "birkhoff: from_pretrained support not registered with transformers (%s: %s); "
            "use compressor.load_model(dir)", type(exc).__name__, exc)


def _install_transformers_hook() -> None:
    import wrapt  # its post-import hooks: the registry may be imported before or after us

    wrapt.register_post_import_hook(_register_with_transformers, "transformers.quantizers.auto")


_install_transformers_hook()
