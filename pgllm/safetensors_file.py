"""The safetensors format with the standard library and numpy (no torch, no safetensors package):
the header of a float32 file that `pgllm export` and `pgllm adapter export` write, and a reader for
the small files that `pgllm adapter import` reads.

A file is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}}, offsets relative to the data that follows, plus an optional "__metadata__"), then
the data, each tensor row-major and little-endian.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import PgllmError

# what numpy holds exactly in float32; BF16 has no numpy type: its 16 bits are float32's upper half
DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
HEADER_MAX = 100 << 20  # the safetensors library's own limit on a header


def header(tensors: Iterable[tuple[str, tuple[int, ...]]]) -> bytes:
    """The length and header of a file of float32 tensors written in this order, padded to 8 bytes
    (the format's alignment) with spaces, as the safetensors library pads it."""
    entries: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        size = 4 * int(np.prod(shape))
        entries[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def read(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the file as a float32 array (F32, F16 and BF16 convert exactly); a file that
    is not a well-formed safetensors file of those dtypes is a PgllmError naming it."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PgllmError(f"cannot read {path}: {e.strerror or e}") from None

    def bad(why: str) -> PgllmError:
        return PgllmError(f"{path} is not a safetensors file: {why}")

    if len(raw) < 8:
        raise bad("shorter than its 8-byte header length")
    n = struct.unpack("<Q", raw[:8])[0]
    if n > min(HEADER_MAX, len(raw) - 8):
        raise bad(f"a header of {n} bytes in a file of {len(raw)}")
    try:
        entries = json.loads(raw[8:8 + n])
    except (UnicodeDecodeError, ValueError):
        raise bad("its header is not JSON") from None
    if not isinstance(entries, dict):
        raise bad("its header is not a JSON object")
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, entry in entries.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(x, int) and x >= 0 for x in (*shape, start, end)) or not start <= end <= len(data):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has no valid dtype, shape and data offsets") from None
        if dtype not in DTYPES:
            raise PgllmError(f"tensor {name!r} of {path} is {dtype}; pgllm reads F32, F16 and BF16 tensors")
        if end - start != DTYPES[dtype].itemsize * math.prod(shape):  # Python's integers: no overflow
            raise bad(f"tensor {name!r} has {end - start} bytes for shape {list(shape)} of {dtype}")
        a = np.frombuffer(data[start:end], dtype=DTYPES[dtype]).reshape(shape)
        out[name] = (a.astype("<u4") << 16).view("<f4") if dtype == "BF16" else a.astype("<f4")
    return out
