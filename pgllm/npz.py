"""pgllm's checkpoint file: a gzip stream of named .npy records (the format of pg_llm_import_npz).

    [uint16 LE name length][UTF-8 name][.npy v1.0 array]   repeated

The format is described once, in the extension's sources, which pgllm carries: ext/src/npz.h (the
record names, the version, the limits) and ext/src/tensors.def (every tensor's name and shape).
This module reads both, so that the files it writes and the server's reader agree by construction,
also where no server is at hand (`pgllm convert`).

The writer emits 4 MB blocks as separate gzip members (a gzip stream may be several members back
to back), made on all cores. float32 weights barely compress (about 7%), so by default the blocks
are stored, not compressed: the server then imports them about twice as fast. With
compress=True they are Huffman-coded (float data has almost no repeated strings to look for).
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

from .errors import PgllmError
from .extension import source_dir


def _definitions() -> dict[str, str | int]:
    """The NPZ_ definitions of npz.h: each a plain string or a decimal number."""
    text = (source_dir() / "src" / "npz.h").read_text()
    return {name: value.strip('"') if value.startswith('"') else int(value)
            for name, value in re.findall(r'^#define (NPZ_\w+)\s+("[^"\\]*"|\d+)', text, re.M)}


@functools.lru_cache(maxsize=1)
def _tensor_table() -> list[tuple[str, str, str, str]]:
    """(name, scope, rows, cols) of every kind in tensors.def, in its order."""
    text = (source_dir() / "src" / "tensors.def").read_text()
    return re.findall(r'^LLM_TENSOR\(\w+, "([^"]+)", (MODEL|LAYER), ([^,]+), ([^)]+)\)', text, re.M)


_NPZ = _definitions()
FORMAT_NAME: str = _NPZ["NPZ_FORMAT_NAME"]
FORMAT_VERSION: int = _NPZ["NPZ_FORMAT_VERSION"]
CONFIG_NAME: str = _NPZ["NPZ_CONFIG_NAME"]
VOCAB_NAME: str = _NPZ["NPZ_VOCAB_NAME"]
MERGES_NAME: str = _NPZ["NPZ_MERGES_NAME"]
BLOCK: int = _NPZ["NPZ_GZIP_BLOCK"]
CONFIG_FIELDS = ("n_layer", "n_head", "d_model", "n_positions", "vocab")


def _dim(expr: str, sizes: dict[str, int]) -> int:
    """A dimension of tensors.def: V, P, C, k * C or 0."""
    m = re.fullmatch(r"\s*(?:(\d+)\s*\*\s*)?([VPC]|\d+)\s*", expr)
    if m is None:
        raise ValueError(f"tensors.def: cannot read the dimension {expr!r}")
    factor, term = m.groups()
    return int(factor or 1) * (sizes[term] if term in sizes else int(term))


class FormatError(PgllmError, ValueError):
    """The file is not a valid checkpoint file."""


@dataclass(frozen=True)
class Config:
    n_layer: int
    n_head: int
    d_model: int
    n_positions: int
    vocab: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in state-dict order (as the server lists them)."""
        sizes = {"V": self.vocab, "P": self.n_positions, "C": self.d_model}
        before, layer, after = [], [], []
        for name, scope, rows, cols in _tensor_table():
            shape = (_dim(rows, sizes),) + ((_dim(cols, sizes),) if _dim(cols, sizes) else ())
            (layer if scope == "LAYER" else after if layer else before).append((name, shape))
        return before + [(f"h.{i}.{name}", shape) for i in range(self.n_layer) for name, shape in layer] + after

    def num_params(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.tensors())

    def as_array(self) -> np.ndarray:
        return np.array([getattr(self, f) for f in CONFIG_FIELDS], dtype="<i8")


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """A .npy v1.0 header, padded to a multiple of 64 bytes as numpy writes it."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(int(d) for d in shape)!r}, }}"
    total = 10 + len(text) + 1
    text += " " * (-total % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def record_header(name: str, descr: str, shape: tuple[int, ...]) -> bytes:
    raw = name.encode("utf-8")
    return len(raw).to_bytes(2, "little") + raw + npy_header(descr, shape)


GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, mtime 0, unknown OS
STORED_MAX = 65535


def _stored_member(block) -> list:
    """A gzip member of stored deflate blocks, as pieces that reference `block` (no copy)."""
    view = memoryview(block).cast("B")
    parts: list = [GZIP_HEADER]
    for start in range(0, max(len(view), 1), STORED_MAX):
        piece = view[start:start + STORED_MAX]
        final = start + STORED_MAX >= len(view)
        parts += [struct.pack("<BHH", final, len(piece), len(piece) ^ 0xFFFF), piece]
    return parts + [struct.pack("<II", zlib.crc32(view), len(view) & 0xFFFFFFFF)]


def _huffman_member(block) -> list:
    c = zlib.compressobj(1, zlib.DEFLATED, 31, 8, zlib.Z_HUFFMAN_ONLY)
    return [c.compress(block) + c.flush()]


class ParallelGzipWriter:
    """A file-like writer whose output is gzip members of BLOCK bytes each, made in threads.

    zlib releases the GIL (for crc32 too), so the blocks of one batch are done on all cores at once.
    """

    def __init__(self, raw: BinaryIO, compress: bool = False, threads: int | None = None):
        self.raw = raw
        self.member = _huffman_member if compress else _stored_member
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self.pending = bytearray()     # the block being filled
        self.batch: list = []           # full blocks waiting to be compressed
        self.written = 0                # compressed bytes

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if self.pending:
            take = min(BLOCK - len(self.pending), len(view))
            self.pending += view[:take]
            view = view[take:]
            if len(self.pending) == BLOCK:
                self._push(bytes(self.pending))
                self.pending = bytearray()
        while len(view) >= BLOCK:
            self._push(view[:BLOCK])
            view = view[BLOCK:]
        self.pending += view
        return n

    def _push(self, block) -> None:
        self.batch.append(block)
        if len(self.batch) >= 2 * self.threads:
            self._drain()

    def _drain(self) -> None:
        members = self.pool.map(self.member, self.batch) if self.pool else map(self.member, self.batch)
        for member in members:
            for part in member:
                self.raw.write(part)
                self.written += len(part)
        self.batch = []

    def close(self) -> None:
        if self.pending:
            self.batch.append(bytes(self.pending))
            self.pending = bytearray()
        self._drain()
        if self.pool:
            self.pool.shutdown()


class Writer:
    """Writes a checkpoint file: the format and configuration records, the tokenizer's when given
    (vocab.json and merges.txt bytes), then tensors (float32, C order)."""

    def __init__(self, raw: BinaryIO, config: Config, compress: bool = False, threads: int | None = None,
                 tokenizer: tuple[bytes, bytes] | None = None):
        self.gz = ParallelGzipWriter(raw, compress, threads)
        self.config = config
        self.gz.write(record_header(FORMAT_NAME, "<i8", (1,)))
        self.gz.write(np.array([FORMAT_VERSION], dtype="<i8").tobytes())
        self.gz.write(record_header(CONFIG_NAME, "<i8", (5,)))
        self.gz.write(config.as_array().tobytes())
        for name, data in zip((VOCAB_NAME, MERGES_NAME), tokenizer or ()):
            self.gz.write(record_header(name, "|u1", (len(data),)))
            self.gz.write(data)

    def write_tensor(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype="<f4")
        self.write_raw(name, array.shape, array)

    def write_raw(self, name: str, shape: tuple[int, ...], data) -> None:
        """A tensor given as float32 little-endian bytes (e.g. straight from llm_param)."""
        if len(memoryview(data).cast("B")) != 4 * int(np.prod(shape)):
            raise FormatError(f"tensor {name!r}: {len(data)} bytes do not match shape {shape}")
        self.gz.write(record_header(name, "<f4", tuple(shape)))
        self.gz.write(data)

    def close(self) -> int:
        """Finish the stream; returns the compressed size."""
        self.gz.close()
        return self.gz.written


def write_file(path: str | os.PathLike, config: Config, tensors: dict[str, np.ndarray],
               compress: bool = False) -> int:
    """Write a whole checkpoint file from a dict of arrays (in state-dict order)."""
    with open(path, "wb") as f:
        w = Writer(f, config, compress)
        for name, _ in config.tensors():
            w.write_tensor(name, tensors[name])
        return w.close()


# ---- reading -----------------------------------------------------------------------------------

def _read_exact(f, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise FormatError(f"truncated {what}")
    return data


def check_magic(head: bytes, label: str) -> None:
    """What a file's first bytes say (as the server's reader checks them): pgllm's checkpoint
    files are gzip streams, while NumPy's .npz files are zip archives."""
    if head.startswith(b"PK\x03\x04"):
        raise FormatError(f"{label} is a NumPy .npz archive (a zip file), not a pg_llm checkpoint file",
                          hint="convert it: pgllm convert FILE.npz --output OTHER.npz, then import OTHER.npz")
    if len(head) >= 2 and head[:2] != b"\x1f\x8b":
        raise FormatError(f"{label} is not a pg_llm checkpoint file (not a gzip stream)",
                          hint="pgllm convert writes checkpoint files from Hugging Face checkpoints")


def iter_records(raw: io.BufferedReader, label: str = "the file") -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every record of the stream, the format and configuration records included."""
    check_magic(raw.peek(4)[:4], label)
    with gzip.GzipFile(fileobj=raw, mode="rb") as f:
        while True:
            try:
                prefix = f.read(2)
            except (OSError, EOFError, zlib.error) as e:
                raise FormatError(f"not valid gzip data: {e}") from None
            if not prefix:
                return
            if len(prefix) < 2:
                raise FormatError("truncated record")
            try:
                n = int.from_bytes(prefix, "little")
                name = _read_exact(f, n, "record name").decode("utf-8")
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise FormatError(f"record {name!r}: unsupported .npy version {version}")
                if fortran:
                    raise FormatError(f"record {name!r} is in Fortran order")
                count = int(np.prod(shape))
                data = _read_exact(f, count * dtype.itemsize, f"record {name!r}")
            except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
                raise FormatError(f"not a valid checkpoint file: {e}") from None
            except ValueError as e:
                if isinstance(e, FormatError):
                    raise
                raise FormatError(f"not a valid checkpoint file: {e}") from None
            yield name, np.frombuffer(data, dtype=dtype).reshape(shape)


def read_file(path: str | os.PathLike) -> tuple[Config | None, dict[str, np.ndarray]]:
    """The configuration (None when the file has none) and every tensor of a checkpoint file
    of any format (see npz.h); read_tokenizer has the tokenizer records."""
    config, tensors = None, {}
    with open(path, "rb") as raw:
        for i, (name, array) in enumerate(iter_records(io.BufferedReader(raw), str(path))):
            if name == FORMAT_NAME:
                if i > 0:
                    raise FormatError(f"{path}: the format record must be the first record")
                if int(array[0]) > FORMAT_VERSION:
                    raise FormatError(f"{path} is a checkpoint file of format {int(array[0])}, newer than "
                                      f"this pgllm reads ({FORMAT_VERSION})", hint="upgrade pgllm")
            elif name == CONFIG_NAME:
                config = Config(*(int(v) for v in array))
            elif name not in (VOCAB_NAME, MERGES_NAME):
                tensors[name] = array
    return config, tensors


def read_tokenizer(path: str | os.PathLike) -> tuple[bytes, bytes] | None:
    """The bytes of vocab.json and merges.txt that a checkpoint file carries, or None."""
    found = {}
    with open(path, "rb") as raw:
        for name, array in iter_records(io.BufferedReader(raw), str(path)):
            if name in (VOCAB_NAME, MERGES_NAME):
                found[name] = array.tobytes()
            elif name not in (FORMAT_NAME, CONFIG_NAME):
                break  # tensors come after the tokenizer
    return (found[VOCAB_NAME], found[MERGES_NAME]) if len(found) == 2 else None

