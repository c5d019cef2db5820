"""Memory-mapped safetensors reading and streaming, deterministic writing.

The format: an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the tensor data; offsets count from the first byte after the header.

The reader validates the header against the file size before any tensor is touched
and returns ``numpy.memmap`` views, so opening a 13 GB shard costs a few kilobytes
of RAM. The writer streams one tensor at a time, in name order, so output bytes depend
only on the tensors' names and contents.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from .atomic import atomic_path
from .errors import InputError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def dtype_code(dtype: np.dtype) -> str:
    """The safetensors code (``"F32"``...) of a numpy dtype."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    try:
        return _CODES[dt]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors code") from None


class SafetensorsFile:
    """One validated safetensors file; tensors come back as read-only memory maps."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(self.path, f"truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise InputError(
                    self.path,
                    f"corrupt or truncated safetensors file: header length {n} does not fit "
                    f"a file of {size} bytes",
                )
            raw = fh.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(self.path, f"corrupt safetensors header: {exc}") from None
        if not isinstance(header, dict):
            raise InputError(self.path, "corrupt safetensors header: not a JSON object")
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self.data_start = 8 + n
        data_len = size - self.data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        spans = []
        for name, entry in header.items():
            if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
                raise InputError(self.path, f"corrupt safetensors entry for tensor {name!r}: "
                                            "expected the fields dtype, shape and data_offsets")
            if entry["dtype"] not in DTYPES:
                raise InputError(self.path, f"tensor {name!r} has the unsupported safetensors dtype "
                                            f"{entry['dtype']!r} (supported: {', '.join(DTYPES)})")
            dt = DTYPES[entry["dtype"]]
            try:
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (TypeError, ValueError):
                raise InputError(self.path, f"corrupt safetensors entry for tensor {name!r}: shape and "
                                            "data_offsets must be lists of integers (two offsets)") from None
            count = int(np.prod(shape, dtype=np.int64))
            if any(s < 0 for s in shape) or end - begin != count * dt.itemsize or begin < 0:
                raise InputError(
                    self.path, f"corrupt safetensors entry for tensor {name!r}: offsets do not match shape"
                )
            if end > data_len:
                raise InputError(
                    self.path,
                    f"truncated safetensors file: tensor {name!r} ends at byte {self.data_start + end} "
                    f"but the file has {size} bytes",
                )
            self._entries[name] = (dt, shape, begin)
            spans.append((begin, end, name))
        spans.sort()
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:  # the safetensors library refuses these too
                raise InputError(self.path, f"corrupt safetensors header: the data of tensors {first!r} and "
                                            f"{second!r} overlap")

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def data_files(self) -> list[Path]:
        """The files the tensors' bytes live in (just this one)."""
        return [self.path]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def offset(self, name: str) -> int:
        """Byte offset of tensor ``name``'s data from the start of the file."""
        return self.data_start + self._entries[name][2]

    def get(self, name: str) -> np.ndarray:
        """A read-only memory map of tensor ``name`` (no bytes are read until used)."""
        dt, shape, begin = self._entries[name]
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return np.zeros(shape, dtype=dt)
        return np.memmap(self.path, dtype=dt, mode="r", offset=self.data_start + begin, shape=shape)


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors in name order, streaming each, atomically (temp file, then rename).

    ``tensors`` may be a mapping or pairs; arrays may be memory maps, which are copied
    in chunks so peak memory stays at one chunk.
    """
    items = sorted(tensors.items() if isinstance(tensors, Mapping) else tensors, key=lambda kv: kv[0])
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for name, arr in items:
        nbytes = int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        header[name] = {"dtype": dtype_code(arr.dtype), "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for _, arr in items:
                for chunk in _chunks(arr):
                    fh.write(chunk)


def _chunks(arr: np.ndarray, rows_bytes: int = 64 * 1024 * 1024) -> Iterator[bytes]:
    """Little-endian C-order bytes of ``arr``, at most ~``rows_bytes`` at a time."""
    arr = np.asarray(arr)
    if arr.ndim == 0 or arr.size == 0:
        yield np.ascontiguousarray(arr).tobytes()
        return
    row_bytes = max(1, arr[0].nbytes)
    step = max(1, rows_bytes // row_bytes)
    for i in range(0, arr.shape[0], step):
        yield np.ascontiguousarray(arr[i : i + step]).tobytes()
