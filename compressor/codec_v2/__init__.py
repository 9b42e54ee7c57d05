"""Codec v2: entropy-coded, scale-adaptive Hyper-Compression (issue 12).

Pairs of weights go to the nearest point of an unbounded hexagonal (A2) lattice whose
step is set per row from the weights' own RMS; the integer coordinates are
entropy-coded (constriction's ANS) in independently decodable blocks with a stored,
validated symbol model. See :mod:`.lattice` (the NumPy reference), :mod:`.symbols`,
:mod:`.encode` (``encode_tensor``), :mod:`.container` (``V2Tensor``), :mod:`.layout`
(its stored form and checks), :mod:`.rate` (presets, the bits-per-weight knob,
allocation across tensors) and :mod:`.device` (the fixed-width on-device form and its
product).
"""

from .config import CONFIG_VERSION, PRESETS, CodecV2Config
from .container import V2Tensor
from .encode import encode_tensor
from .layout import FORMAT_NAME, FORMAT_VERSION

__all__ = ["CONFIG_VERSION", "PRESETS", "CodecV2Config", "FORMAT_NAME", "FORMAT_VERSION", "V2Tensor",
           "encode_tensor"]
