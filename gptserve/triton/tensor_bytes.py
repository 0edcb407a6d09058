"""The raw wire form of tensors, shared by HTTP (binary tensor data) and gRPC (raw contents).

Raw tensors are little-endian and row-major; BOOL is one byte per element. A BYTES tensor travels as its
elements in row-major order, each a little-endian uint32 length followed by that many bytes. In memory
it is a numpy object array of `bytes` (`str` elements are sent as UTF-8).
"""

from __future__ import annotations

import math
import struct

import numpy as np

from gptserve.triton.types import DATATYPES, TritonError


def serialize_bytes(data: np.ndarray) -> bytes:
    """BYTES tensor (row-major) -> length-prefixed elements; `str` elements are sent as UTF-8."""
    parts = []
    for item in np.asarray(data, dtype=object).ravel(order="C"):
        b = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes(buf: bytes, count: int, name: str) -> np.ndarray:
    """Length-prefixed elements -> flat object array of `count` bytes values; raises `TritonError`
    naming input `name` when the data is truncated or holds another number of elements."""
    items: list[bytes] = []
    offset, size = 0, len(buf)
    while offset < size:
        if offset + 4 > size:
            raise TritonError(f"unexpected end of BYTES data for input '{name}': truncated length prefix")
        (length,) = struct.unpack_from("<I", buf, offset)
        offset += 4
        if offset + length > size:
            raise TritonError(
                f"unexpected end of BYTES data for input '{name}': element {len(items)} claims "
                f"{length} bytes, {size - offset} left"
            )
        items.append(bytes(buf[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise TritonError(
            f"unexpected number of string elements {len(items)} for input '{name}', expecting {count}"
        )
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def count_bytes_elements(buf: bytes, name: str) -> int:
    """How many length-prefixed elements `buf` holds (a BYTES tensor sent without its shape)."""
    count = offset = 0
    while offset < len(buf):
        if offset + 4 > len(buf):
            raise TritonError(f"input '{name}': BYTES data ends inside a length prefix")
        offset += 4 + int.from_bytes(buf[offset : offset + 4], "little")
        count += 1
    return count


def decode_raw_tensor(raw: bytes, datatype: str, shape: list[int], name: str) -> np.ndarray:
    """Raw bytes of input `name` -> a numpy array of `datatype` and `shape`; raises `TritonError` naming
    the input when a dimension is negative or the byte count disagrees with the shape."""
    if any(d < 0 for d in shape):
        raise TritonError(f"invalid shape {list(shape)} for input '{name}': dimensions must be >= 0")
    count = math.prod(shape)
    if datatype == "BYTES":
        return deserialize_bytes(raw, count, name).reshape(shape)
    dtype = DATATYPES[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise TritonError(
            f"input '{name}': binary data has {len(raw)} bytes, but {count} {datatype} elements of "
            f"shape {list(shape)} need {expected}"
        )
    if datatype == "BOOL":
        return (np.frombuffer(raw, dtype=np.uint8) != 0).reshape(shape)
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
