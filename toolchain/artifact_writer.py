"""Writing a sparseforge GGUF artifact with gguf-py's ``GGUFWriter``.

Tensors are streamed: each is checksummed and handed to the writer's spooled temporary
file as it is produced, so the caller can build them one layer at a time. The metadata
then gets the tensor table and the metadata digest, and the file is written to a
temporary path and renamed. The output depends only on the inputs: the key order is
fixed (the writer's own keys, then the rest sorted), tensors keep the caller's order,
and nothing time- or host-dependent is written.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from .artifact_format import (ALIGNMENT, ARCHITECTURE, BLOB_TYPE, FORMAT_VERSION, GGML_TYPES, K_FORMAT_VERSION,
                              K_METADATA_SHA256, K_TENSORS, KV, MAX_NAME_BYTES, QUANTIZATION_VERSION, TYPE_NAMES,
                              metadata_digest, tensor_nbytes, to_json)
from .atomic import atomic_path
from .fingerprint import file_digest

_FLOAT_TYPES = {int(GGML_TYPES["f32"]): np.float32, int(GGML_TYPES["f16"]): np.float16}


@dataclass
class TensorEntry:
    """A tensor to write: ``shape`` in elements (numpy order); ``data`` is float32 /
    float16 for F32 / F16, else the encoded bytes (uint8, rows last) of a Q8_0 / Q4_0
    tensor or of a blob (I8 type, shape = byte shape)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class WrittenArtifact:
    path: Path
    nbytes: int
    sha256: str
    tensors: list[dict]


def write_artifact(path: str | Path, metadata: list[KV], tensors: Iterable[TensorEntry]) -> WrittenArtifact:
    """Write ``metadata`` and ``tensors`` (consumed once, in order) to ``path`` atomically."""
    path = Path(path)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    with atomic_path(path) as tmp:
        writer = GGUFWriter(tmp, ARCHITECTURE, use_temp_file=True)
        writer.add_custom_alignment(ALIGNMENT)
        writer.add_uint32("general.quantization_version", QUANTIZATION_VERSION)
        table = [_add_tensor(writer, t) for t in tensors]
        entries = [*metadata, KV(K_FORMAT_VERSION, GGUFValueType.UINT32, FORMAT_VERSION),
                   KV(K_TENSORS, GGUFValueType.STRING, to_json(table))]
        for kv in sorted(entries, key=lambda e: e.key):
            writer.add_key_value(kv.key, kv.value, kv.type, sub_type=kv.sub_type)
        digest = metadata_digest({k: (int(v.type), v.value, None if v.sub_type is None else int(v.sub_type))
                                  for k, v in writer.kv_data[0].items()})
        writer.add_key_value(K_METADATA_SHA256, digest, GGUFValueType.STRING)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return WrittenArtifact(path, path.stat().st_size, file_digest(path), table)


def _add_tensor(writer: GGUFWriter, t: TensorEntry) -> dict:
    if len(t.name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"tensor name {t.name!r} is longer than {MAX_NAME_BYTES} bytes")
    nbytes = tensor_nbytes(t.ggml_type, t.shape)
    data = np.ascontiguousarray(t.data)
    if t.ggml_type in _FLOAT_TYPES:
        data = data.astype(_FLOAT_TYPES[t.ggml_type], copy=False).reshape(t.shape)
    else:
        data = data.view(np.uint8).reshape(*t.shape[:-1], -1)
    if data.nbytes != nbytes:
        raise ValueError(f"tensor {t.name!r}: {data.nbytes} bytes of data, {TYPE_NAMES[t.ggml_type]} "
                         f"{t.shape} needs {nbytes}")
    sha = hashlib.sha256(memoryview(data).cast("B")).hexdigest()
    if t.ggml_type in _FLOAT_TYPES:
        writer.add_tensor(t.name, data)
    elif t.ggml_type == BLOB_TYPE:
        writer.add_tensor(t.name, data.view(np.int8))
    else:
        writer.add_tensor(t.name, data, raw_dtype=t.ggml_type)
    return {"name": t.name, "type": TYPE_NAMES[t.ggml_type], "shape": list(t.shape), "nbytes": nbytes,
            "sha256": sha}
