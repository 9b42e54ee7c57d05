"""The one dtype table: every dtype the format stores, by the name the manifest gives
it, with its torch dtype, safetensors code, item size, the numpy dtype of its stored
bytes and its same-width integer view. Everything else (the codec, the format, the
sources, HyperLinear, codec v2) reads its dtype facts from here."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    name: str  # the manifest's name ("float32", "bfloat16", ...)
    torch: torch.dtype
    st_code: str  # safetensors header code ("F32", "BF16", ...)
    itemsize: int
    stored_np: str  # little-endian numpy dtype of the stored bytes
    int_view: torch.dtype  # same-width integer view: the decode kernels move bit patterns
    is_float: bool


_TABLE = (
    DType("float32", torch.float32, "F32", 4, "<f4", torch.int32, True),
    DType("float16", torch.float16, "F16", 2, "<f2", torch.int16, True),
    # numpy has no bf16: carried as uint16, viewed in torch
    DType("bfloat16", torch.bfloat16, "BF16", 2, "<u2", torch.int16, True),
    DType("float64", torch.float64, "F64", 8, "<f8", torch.int64, True),
    DType("int8", torch.int8, "I8", 1, "i1", torch.int8, False),
    DType("int16", torch.int16, "I16", 2, "<i2", torch.int16, False),
    DType("int32", torch.int32, "I32", 4, "<i4", torch.int32, False),
    DType("int64", torch.int64, "I64", 8, "<i8", torch.int64, False),
    DType("uint8", torch.uint8, "U8", 1, "u1", torch.uint8, False),
    DType("bool", torch.bool, "BOOL", 1, "u1", torch.uint8, False),
)

#: manifest name -> its row
DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}
#: the float dtypes the codec compresses, in the table's order
FLOAT_NAMES: tuple[str, ...] = tuple(d.name for d in _TABLE if d.is_float)
FLOAT_TORCH: tuple[torch.dtype, ...] = tuple(DTYPES[n].torch for n in FLOAT_NAMES)
#: manifest name -> torch dtype, and back
TORCH_BY_NAME: dict[str, torch.dtype] = {d.name: d.torch for d in _TABLE}
NAME_BY_TORCH: dict[torch.dtype, str] = {d.torch: d.name for d in _TABLE}
#: safetensors code -> manifest name (the stored dtypes only)
NAME_BY_ST_CODE: dict[str, str] = {d.st_code: d.name for d in _TABLE}
#: every dtype the safetensors spec defines, with its item size (header sanity only)
SAFETENSORS_ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest name of a torch dtype; TypeError for one the format cannot store."""
    try:
        return NAME_BY_TORCH[dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {dtype}") from None
