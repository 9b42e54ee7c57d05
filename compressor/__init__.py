"""Birkhoff compressor: data-free Hyper-Compression of model checkpoints.

Pure NumPy/torch (plus Numba kernels loaded on first use); no Ray, boto3 or
MLflow here, so that any worker or notebook can import it cheaply.
"""

from .backends import Backend, resolve_backend
from .codec import CODEC_VERSION, CompressedTensor, RawTensor, compress_tensor
from .config import HyperCompressionConfig, TensorOverride
from .errors import *  # noqa: F401,F403  (the typed errors are part of the API)
from .hyperlinear import HyperLinear, HyperLinearError
from .modeling import apply_hyperlinear, load_model

__version__ = "0.1.0"
