"""The frames between the router and its replicas: a JSON header and one array's raw bytes.

A frame is ``<u32 header length><u32 payload length><header JSON><payload>``; the header
says what the payload is (``dtype``, ``shape``) besides the message's own fields (``id``,
``op``, ``ok`` ...). Arrays travel as their bytes, never pickled, and decode without a
copy (``np.frombuffer``). Written by hand because it is this small: Dask's own RPC costs
~1.3 ms per actor call here, more than the router's whole latency budget.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import numpy as np
import orjson

_LENGTHS = struct.Struct("<II")
#: A header or payload larger than this is refused (a corrupt or foreign stream).
MAX_PART_BYTES = 1 << 30
#: dtypes an array may have on the wire.
DTYPES = frozenset({"float32", "float64", "float16", "int64", "int32", "uint8", "bool"})


class WireError(ConnectionError):
    """The peer sent something that is not a frame of this protocol."""


def encode(header: dict[str, Any], array: np.ndarray | None = None) -> bytes:
    if array is not None:
        array = np.ascontiguousarray(array)
        header = {**header, "dtype": array.dtype.name, "shape": list(array.shape)}
        payload = array.data.cast("B") if array.size else b""
    else:
        payload = b""
    head = orjson.dumps(header, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    return b"".join((_LENGTHS.pack(len(head), len(payload)), head, payload))


async def read(reader: asyncio.StreamReader) -> tuple[dict[str, Any], np.ndarray | None]:
    """The next frame's header and array (None without a payload); ``IncompleteReadError`` at EOF."""
    head_len, payload_len = _LENGTHS.unpack(await reader.readexactly(_LENGTHS.size))
    if head_len > MAX_PART_BYTES or payload_len > MAX_PART_BYTES:
        raise WireError(f"a frame of {head_len} + {payload_len} bytes: not this protocol")
    header = orjson.loads(await reader.readexactly(head_len))
    if not isinstance(header, dict):
        raise WireError("a frame header that is not a JSON object")
    if "dtype" not in header:
        if payload_len:
            await reader.readexactly(payload_len)
        return header, None
    dtype, shape = header["dtype"], header.get("shape")
    if dtype not in DTYPES or not isinstance(shape, list):
        raise WireError(f"an array of dtype {dtype!r} and shape {shape!r}: not allowed")
    payload = await reader.readexactly(payload_len) if payload_len else b""
    array = np.frombuffer(payload, dtype=dtype)
    try:
        return header, array.reshape(shape)
    except ValueError:
        raise WireError(f"{payload_len} bytes do not make an array of shape {shape}") from None
