"""Tensor datatypes of the Open Inference Protocol and their numpy forms; BYTES packing.

Pure functions, no I/O. BYTES tensors are numpy object arrays of `bytes`; on the wire (binary
extension and worker channel) each element is a 4-byte little-endian length then its bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

DATATYPE_TO_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
DTYPE_TO_DATATYPE: dict[str, str] = {dt.str: name for name, dt in DATATYPE_TO_DTYPE.items() if name != "BYTES"}


class ProtocolError(ValueError):
    """A request the client got wrong: answered 400 with this message."""


@dataclass(slots=True)
class NamedTensor:
    name: str
    array: np.ndarray

    @property
    def datatype(self) -> str:
        return datatype_of(self.array)


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    try:
        return DTYPE_TO_DATATYPE[array.dtype.str]
    except KeyError:
        raise ProtocolError(f"unsupported tensor dtype {array.dtype}") from None


def dtype_of(datatype: str) -> np.dtype:
    try:
        return DATATYPE_TO_DTYPE[datatype]
    except KeyError:
        raise ProtocolError(
            f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPE_TO_DTYPE)}"
        ) from None


def element_count(shape: list[int] | tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def pack_bytes(array: np.ndarray) -> bytes:
    """Serialize a BYTES tensor (row-major) as length-prefixed elements."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def unpack_bytes(buffer: bytes | memoryview, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of pack_bytes; a length that runs past the buffer is the client's error."""
    view = memoryview(buffer)
    items: list[bytes] = []
    offset = 0
    for _ in range(count):
        if offset + 4 > len(view):
            raise ProtocolError(f"BYTES tensor data ended after {len(items)} of {count} elements")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise ProtocolError(
                f"BYTES element {len(items)} claims {length} bytes but only {len(view) - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise ProtocolError(f"BYTES tensor data has {len(view) - offset} bytes beyond its {count} elements")
    out = np.empty(count, dtype=object)
    out[:] = items
    return out.reshape(shape)
