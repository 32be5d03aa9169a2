"""How safetensors dtype strings map to NumPy and PyTorch element types.

NumPy has no bfloat16 or float8: those come back as their raw bits (uint16, uint8),
and the real dtype is named by ``get_dtype()``. Sub-byte dtypes (F4, F6) come back
as their packed bytes (uint8) in both frameworks.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np

#: NumPy element type per safetensors dtype; BF16 and F8 kinds as their raw bits.
NUMPY: Dict[str, Any] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "F8_E5M2": np.dtype("u1"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E8M0": np.dtype("u1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "C64": np.dtype("<c8"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}

#: Dtypes whose elements are not whole bytes: returned as packed bytes.
PACKED = frozenset({"F4", "F6_E2M3", "F6_E3M2"})



def packed_shape(shape: Sequence[int], nbytes: int) -> List[int]:
    """The shape of a sub-byte tensor's packed bytes: its own, with the last
    dimension counted in bytes, where each row of that dimension fills whole bytes
    (F4 ``[4, 8]`` is ``[4, 4]``); else flat."""
    if not shape:
        return [nbytes]
    rows = math.prod(shape[:-1])
    if rows > 0 and nbytes % rows == 0:
        return [*shape[:-1], nbytes // rows]
    return [nbytes]


#: torch dtype attribute names per safetensors dtype (newer kinds may be absent).
_TORCH_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}


def torch_dtypes(torch: Any) -> Dict[str, Any]:
    """The torch dtype per safetensors dtype, for the kinds this torch has."""
    found = {name: getattr(torch, attr, None) for name, attr in _TORCH_NAMES.items()}
    return {name: dtype for name, dtype in found.items() if dtype is not None}
