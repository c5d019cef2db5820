"""The constant tensors of an ONNX model, as a :class:`~sparseforge.toolchain.tensors.TensorFile`.

Keys are the names of the graph's initializers and of the outputs of its top-level
``Constant`` nodes (``value`` tensors and the ``value_float(s)`` / ``value_int(s)``
scalar forms; legacy TorchScript exports keep small tensors such as RoPE ``inv_freq``
there). String and sub-byte (4-bit) tensors and sparse initializers are not listed.

The ``ModelProto`` is parsed once, without external data. Inline tensors come back as
read-only arrays over the protobuf bytes; tensors stored as external data come back
as read-only ``np.memmap`` views of the external file at the stated offset, which is
validated (file exists, lies in the model's directory, is long enough) on open.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from ..errors import InputError


def _np_dtype(data_type: int) -> np.dtype | None:
    """Little-endian numpy dtype of an ONNX element type; None if it has no fixed byte size."""
    try:
        dt = np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, TypeError, ValueError):
        return None
    if dt.kind in "OSUV" or dt.itemsize == 0 or dt.name.startswith(("int4", "uint4", "float4")):
        return None
    return dt.newbyteorder("<") if dt.itemsize > 1 else dt


class OnnxInitializers:
    """Initializers and Constant-node tensors of one ONNX file, by value name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "file not found")
        try:
            self.model: onnx.ModelProto = onnx.load(str(self.path), load_external_data=False)
        except DecodeError as exc:
            raise InputError(self.path, f"not a valid ONNX model: corrupt or truncated protobuf ({exc})") from None
        except OSError as exc:
            raise InputError(self.path, f"cannot read: {exc.strerror or exc}") from None
        if not self.model.HasField("graph"):
            raise InputError(self.path, "not a valid ONNX model (no graph)")
        self._tensors: dict[str, TensorProto] = {}
        self._arrays: dict[str, np.ndarray] = {}  # Constant nodes' scalar/list attribute forms
        self._external: dict[str, tuple[Path, int]] = {}  # key -> (data file, byte offset)
        for t in self.model.graph.initializer:
            self._add_tensor(t.name, t)
        for node in self.model.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
                self._add_constant(node)

    # -- indexing --------------------------------------------------------------------
    def _add_tensor(self, key: str, t: TensorProto) -> None:
        dt = _np_dtype(t.data_type)
        if dt is None:
            return
        self._tensors[key] = t
        nbytes = int(np.prod(t.dims, dtype=np.int64)) * dt.itemsize
        if t.data_location == TensorProto.EXTERNAL:
            self._external[key] = self._check_external(key, t, nbytes)
        elif t.HasField("raw_data") and len(t.raw_data) != nbytes:
            raise InputError(
                self.path, f"corrupt or truncated tensor {key!r}: {len(t.raw_data)} bytes, expected {nbytes}"
            )

    def _add_constant(self, node: onnx.NodeProto) -> None:
        for attr in node.attribute:
            if attr.name == "value":
                self._add_tensor(node.output[0], attr.t)
            elif attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
                value = helper.get_attribute_value(attr)
                dtype = np.float32 if "float" in attr.name else np.int64
                arr = np.asarray(value, dtype=dtype)
                arr.flags.writeable = False
                self._arrays[node.output[0]] = arr

    def _check_external(self, key: str, t: TensorProto, nbytes: int) -> tuple[Path, int]:
        info = {e.key: e.value for e in t.external_data}
        location = Path(info.get("location", ""))
        if not location.parts or location.is_absolute() or ".." in location.parts:
            raise InputError(self.path, f"tensor {key!r}: external data location {str(location)!r} is not a "
                                        "file inside the model's directory")
        file = Path(os.path.abspath(self.path)).parent / location  # symlinks stay (Hugging Face hub snapshots)
        try:
            offset = int(info.get("offset", 0))
            length = int(info.get("length", nbytes))
        except ValueError:
            raise InputError(self.path, f"tensor {key!r}: malformed external data offset/length") from None
        if length != nbytes or offset < 0:
            raise InputError(self.path, f"tensor {key!r}: external data length {length} does not match its "
                                        f"shape {list(t.dims)} ({nbytes} bytes)")
        if not file.is_file():
            raise InputError(file, f"external data file of {self.path} (tensor {key!r}) not found")
        size = os.path.getsize(file)
        if offset + nbytes > size:
            raise InputError(file, f"truncated external data: tensor {key!r} ends at byte {offset + nbytes} "
                                   f"but the file has {size} bytes")
        return file, offset

    # -- TensorFile protocol ---------------------------------------------------------
    def data_files(self) -> list[Path]:
        """The .onnx file and every external data file its tensors live in."""
        return [self.path] + sorted({f for f, _ in self._external.values()})

    def keys(self) -> list[str]:
        return sorted(set(self._tensors) | set(self._arrays))

    def __contains__(self, key: str) -> bool:
        return key in self._tensors or key in self._arrays

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._arrays:
            return tuple(self._arrays[key].shape)
        return tuple(int(d) for d in self._tensor(key).dims)

    def dtype(self, key: str) -> np.dtype:
        if key in self._arrays:
            return self._arrays[key].dtype
        return _np_dtype(self._tensor(key).data_type)

    def get(self, key: str) -> np.ndarray:
        """The tensor ``key``, read-only: a memory map for external data, else a view of
        the protobuf bytes (a converted copy for the typed ``*_data`` fields)."""
        if key in self._arrays:
            return self._arrays[key]
        t = self._tensor(key)
        shape, dt = self.shape(key), self.dtype(key)
        count = int(np.prod(shape, dtype=np.int64))
        if key in self._external:
            file, offset = self._external[key]
            if count == 0:
                return np.zeros(shape, dtype=dt)
            return np.memmap(file, dtype=dt, mode="r", offset=offset, shape=(count,)).reshape(shape)
        if t.HasField("raw_data"):
            return np.frombuffer(t.raw_data, dtype=dt, count=count).reshape(shape)
        try:
            arr = numpy_helper.to_array(t)
        except (ValueError, TypeError) as exc:
            raise InputError(self.path, f"corrupt tensor {key!r}: {exc}") from None
        arr.flags.writeable = False
        return arr

    def _tensor(self, key: str) -> TensorProto:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} is not in {self.path}") from None
