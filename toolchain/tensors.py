"""The lazy tensor store behind the model IR.

A tensor is either a *reference* into a file on disk (a safetensors shard or an ONNX
model, opened as a memory map on first use) or an *overlay* array a pass produced and
holds in memory until the IR is saved. ``get`` never copies a plain referenced tensor; a
reference may carry a transpose, so an ONNX ``MatMul`` weight ``[in, out]`` reads as
the canonical Hugging Face ``Linear`` layout ``[out, in]`` without a copy.

A reference may also carry an ``encoding`` (``q8_0``, ``q4_0``): the file holds the
ggml-encoded rows (``uint8[rows, row_bytes]``, rows of the canonical tensor, or of its
transpose when ``transpose`` is set) and ``get`` / ``get_f32`` decode them to float32 on
every call (the IR after ``quantize`` keeps its weights this way, so nothing holds a
float32 copy of the model); ``encoded`` gives the bytes themselves.

A reference may instead name a range of ``rows`` of the canonical tensor (the stored
tensor's first axis, or its last with ``transpose``): a fused matrix (Phi-3's
``qkv_proj``, ``gate_up_proj``, in a checkpoint or an ONNX export) reads as the canonical
matrices it holds, each a view into the same memory map.

Passes that produce large tensors write them to files of their own (:meth:`TensorStore.spill`,
one file per layer or task) instead of holding overlays; the store remembers those files
as *owned*, and saving the IR links them into the IR directory (``tensor-files/``).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from .errors import InputError
from .fingerprint import file_digest
from .safetensors_io import SafetensorsFile


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor lives: ``key`` inside ``file`` (format ``safetensors`` or ``onnx``);
    ``rows`` ``(start, stop)``: only those rows of it (of the transpose with ``transpose``:
    those columns of the stored tensor; not with ``encoding``)."""

    file: str
    key: str
    format: str = "safetensors"
    transpose: bool = False
    encoding: str | None = None
    rows: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.rows is not None and (self.encoding or not 0 <= self.rows[0] < self.rows[1]):
            raise ValueError(f"rows {self.rows} of {self.key!r}: a non-empty range, without encoding")

    def to_dict(self) -> dict:
        d = {"file": self.file, "key": self.key, "format": self.format}
        if self.transpose:
            d["transpose"] = True
        if self.encoding:
            d["encoding"] = self.encoding
        if self.rows:
            d["rows"] = list(self.rows)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorRef":
        rows = d.get("rows")
        return cls(d["file"], d["key"], d.get("format", "safetensors"), bool(d.get("transpose", False)),
                   d.get("encoding"), None if rows is None else (int(rows[0]), int(rows[1])))


class TensorFile(Protocol):
    """A file that holds named tensors (safetensors shard, ONNX initializers)."""

    def keys(self) -> list[str]: ...
    def data_files(self) -> list[Path]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> np.dtype: ...
    def get(self, key: str) -> np.ndarray: ...


_OPEN_FILES: dict[tuple[str, str, int, int], TensorFile] = {}


def open_tensor_file(path: str | Path, fmt: str) -> TensorFile:
    """Open a tensor file of format ``fmt``, once per process and file version (a file
    rewritten since it was opened, detected by size and mtime, is opened and validated anew)."""
    resolved = Path(path).resolve()
    try:
        st = resolved.stat()
    except OSError:
        raise InputError(path, "file not found") from None
    key = (str(resolved), fmt, st.st_size, st.st_mtime_ns)
    if key not in _OPEN_FILES:
        if fmt == "safetensors":
            _OPEN_FILES[key] = SafetensorsFile(path)
        elif fmt == "onnx":
            from .frontends.onnx_initializers import OnnxInitializers

            _OPEN_FILES[key] = OnnxInitializers(path)
        else:
            raise InputError(path, f"unknown tensor file format {fmt!r}")
    return _OPEN_FILES[key]


def forget_open_files() -> None:
    """Drop cached file handles (tests that rewrite files in place need this)."""
    _OPEN_FILES.clear()


class TensorStore:
    """Named tensors, loaded lazily. Passes read with ``get`` and write with ``set``."""

    def __init__(self, refs: dict[str, TensorRef] | None = None) -> None:
        self._refs: dict[str, TensorRef] = dict(refs or {})
        self._overlay: dict[str, np.ndarray] = {}
        self._owned: set[str] = set()  # files passes wrote (moved into the IR directory on save)

    # -- reading ---------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(set(self._refs) | set(self._overlay))

    def __contains__(self, name: str) -> bool:
        return name in self._overlay or name in self._refs

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(set(self._refs) | set(self._overlay))

    def ref(self, name: str) -> TensorRef | None:
        """The file reference of ``name``, or None if it is an in-memory overlay."""
        return None if name in self._overlay else self._refs.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._overlay:
            return tuple(self._overlay[name].shape)
        ref = self._lookup(name)
        shape = tuple(open_tensor_file(ref.file, ref.format).shape(ref.key))
        if ref.rows and ref.transpose:
            shape = (*shape[:-1], ref.rows[1] - ref.rows[0])
        elif ref.rows:
            shape = (ref.rows[1] - ref.rows[0], *shape[1:])
        if ref.encoding:
            shape = (*shape[:-1], decoded_row_length(ref.encoding, shape[-1]))
        return tuple(reversed(shape)) if ref.transpose else tuple(shape)

    def dtype(self, name: str) -> np.dtype:
        if name in self._overlay:
            return self._overlay[name].dtype
        ref = self._lookup(name)
        if ref.encoding:
            return np.dtype(np.float32)
        return open_tensor_file(ref.file, ref.format).dtype(ref.key)

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name``: a read-only memory-mapped view, or the overlay array, or
        (encoded references) a new float32 array of the decoded values."""
        if name in self._overlay:
            return self._overlay[name]
        ref = self._lookup(name)
        arr = open_tensor_file(ref.file, ref.format).get(ref.key)
        if ref.rows:
            return arr[..., ref.rows[0]:ref.rows[1]].T if ref.transpose else arr[ref.rows[0]:ref.rows[1]]
        if ref.encoding:
            return decode_rows(arr, ref.encoding, ref.transpose)
        return arr.T if ref.transpose else arr

    def encoded(self, name: str) -> tuple[np.ndarray, str, bool] | None:
        """``(bytes uint8[rows, row_bytes] memory map, format, transpose)`` of an encoded
        reference (rows are the tensor's columns when ``transpose``); None otherwise."""
        ref = self.ref(name)
        if ref is None or not ref.encoding:
            return None
        return open_tensor_file(ref.file, ref.format).get(ref.key), ref.encoding, ref.transpose

    def get_f32(self, name: str) -> np.ndarray:
        """The tensor as a float32 array (copies only when the stored dtype differs)."""
        arr = self.get(name)
        return arr if arr.dtype == np.float32 else arr.astype(np.float32)

    def _lookup(self, name: str) -> TensorRef:
        try:
            return self._refs[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the store") from None

    # -- writing ---------------------------------------------------------------------
    def set(self, name: str, array: np.ndarray) -> None:
        """Add or replace ``name`` with an in-memory array (saved with the IR)."""
        self._overlay[name] = np.ascontiguousarray(array)
        self._refs.pop(name, None)

    def set_ref(self, name: str, ref: TensorRef) -> None:
        self._refs[name] = ref
        self._overlay.pop(name, None)

    def spill(self, path: str | Path, tensors: dict[str, np.ndarray],
              encodings: dict[str, tuple[str, bool]] | None = None) -> None:
        """Write ``tensors`` to the safetensors file ``path`` (a pass's own file) and make
        each a reference into it; ``encodings`` {name: (format, transpose)} marks arrays
        that are encoded rows (see :class:`TensorRef`). The file is owned: saving the IR
        moves it into the IR directory."""
        from .safetensors_io import write_safetensors

        write_safetensors(path, tensors)
        encodings = encodings or {}
        self.register_file(path, {name: encodings.get(name, (None, False)) for name in tensors})

    def register_file(self, path: str | Path, tensors: dict[str, tuple[str | None, bool]]) -> None:
        """Reference tensors of a safetensors file a pass (or its task) wrote: {name:
        (encoding or None, transpose)}, keys = names; the file becomes owned."""
        path = str(Path(path).resolve())
        for name, (fmt, transpose) in tensors.items():
            self.set_ref(name, TensorRef(path, name, transpose=transpose, encoding=fmt))
        self._owned.add(path)

    def owned_files(self) -> list[str]:
        """Files passes wrote that some tensor still references (sorted)."""
        used = {r.file for r in self._refs.values()}
        return sorted(f for f in self._owned if f in used)

    def adopt(self, path: str | Path) -> None:
        """Treat ``path`` as owned (saving the IR moves it into the IR directory)."""
        self._owned.add(str(path))

    def relocate(self, moves: dict[str, str]) -> None:
        """Point references at ``moves[old file]`` instead; the new files are not owned."""
        for name, ref in list(self._refs.items()):
            if ref.file in moves:
                self._refs[name] = dataclasses.replace(ref, file=moves[ref.file])
        self._owned -= set(moves)

    def delete(self, name: str) -> None:
        self._overlay.pop(name, None)
        self._refs.pop(name, None)

    def ref_digest(self, name: str) -> str:
        """Digest of the files a referenced tensor's bytes live in, plus its key and
        transpose flag (content, not paths: a moved file keeps its digest)."""
        ref = self._lookup(name)
        files = open_tensor_file(ref.file, ref.format).data_files()
        doc = "|".join(file_digest(f) for f in files) + f"|{ref.key}|{ref.transpose}"
        if ref.encoding:
            doc += f"|{ref.encoding}"
        if ref.rows:
            doc += f"|rows {ref.rows[0]}:{ref.rows[1]}"
        return hashlib.sha256(doc.encode()).hexdigest()

    def check(self) -> None:
        """Open every referenced file and check each referenced key is in it (InputError if not)."""
        for name, ref in self._refs.items():
            f = open_tensor_file(ref.file, ref.format)
            if ref.key not in f.keys():
                raise InputError(ref.file, f"tensor {ref.key!r} (IR name {name!r}) is missing from the file")
            have = f.shape(ref.key)[-1 if ref.transpose else 0] if ref.rows else 0
            if ref.rows and ref.rows[1] > have:
                raise InputError(ref.file, f"tensor {ref.key!r} has {have} {'columns' if ref.transpose else 'rows'}, "
                                           f"fewer than the {ref.rows[1]} IR name {name!r} takes")

    def overlay_names(self) -> list[str]:
        return sorted(self._overlay)

    def copy(self) -> "TensorStore":
        """A shallow copy: references are shared, overlay arrays are shared (not copied)."""
        new = TensorStore(self._refs)
        new._overlay = dict(self._overlay)
        new._owned = set(self._owned)
        return new

    def overlay_digest(self, name: str) -> str:
        """sha256 of an overlay tensor's dtype, shape and bytes."""
        arr = self._overlay[name]
        h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).data)
        return h.hexdigest()


def decoded_row_length(fmt: str, row_bytes: int) -> int:
    """Values in an encoded row of ``row_bytes`` bytes."""
    from sparseforge.kernels import quant

    return row_bytes // quant.BLOCK_BYTES[fmt] * quant.BLOCK


def decode_rows(data: np.ndarray, fmt: str, transpose: bool = False, rows_per_chunk: int = 4096) -> np.ndarray:
    """float32 values of encoded rows ``data [rows, row_bytes]``, transposed when
    ``transpose`` (C-contiguous either way); decodes a chunk of rows at a time."""
    from sparseforge.kernels import quant

    rows, width = data.shape[0], decoded_row_length(fmt, data.shape[-1])
    out = np.empty((width, rows) if transpose else (rows, width), np.float32)
    for lo in range(0, rows, rows_per_chunk):
        y = quant.decode(np.asarray(data[lo: lo + rows_per_chunk]), fmt)
        if transpose:
            out[:, lo: lo + len(y)] = y.T
        else:
            out[lo: lo + len(y)] = y
    return out
