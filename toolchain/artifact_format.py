"""Constants of the sparseforge GGUF artifact (docs/artifact-format.md) shared by the
writer, the strict parser and the validating reader.

Metadata values are written with explicit GGUF value types, and every one (bar the
digest itself) is covered by ``sparseforge.metadata_sha256``: sha256 of a canonical
JSON document of ``{key: [type, value]}`` (floats as the hex of their little-endian
bytes, so a value is hashed exactly as it is stored). With the tensor table (name,
type, shape, bytes, sha256 of each tensor) under that digest, zero padding and the
canonical tensor offsets, every byte of an artifact is checked by the reader.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from gguf import GGMLQuantizationType, GGUFValueType

from sparseforge.kernels import quant

ARCHITECTURE = "sparseforge"
FORMAT_VERSION = 1
GGUF_VERSION = 3
ALIGNMENT = 64
GGUF_MAGIC = b"GGUF"
QUANTIZATION_VERSION = 2
ARTIFACT_KEY = "pack/model.gguf"  # where the pack pass attaches the artifact in ``ir.files``
MAX_NAME_BYTES = 63  # ggml's GGML_MAX_NAME (64) less the terminating zero

NS = "sparseforge."
K_FORMAT_VERSION = NS + "format_version"
K_METADATA_SHA256 = NS + "metadata_sha256"
K_TENSORS = NS + "tensors"
K_ARCH = NS + "arch"
K_BLOCKS = NS + "blocks"
K_LAYOUTS = NS + "bundle_layouts"
K_QUANT = NS + "quant_formats"
K_SOURCE = NS + "source"
K_SOURCE_SHA256 = NS + "source_sha256"
K_RECIPE = NS + "recipe"
K_PASS_LOG = NS + "pass_log"
K_TARGET = NS + "target"
K_SPARSITY = NS + "layer_sparsity"
K_OUTPUT_THRESHOLDS = NS + "output_thresholds"
K_ACTIVATION_THRESHOLDS = NS + "activation_thresholds"
K_PREDICTOR_MODES = NS + "predictor_modes"
K_PREDICTOR_RANKS = NS + "predictor_ranks"
K_PREDICTOR_THRESHOLDS = NS + "predictor_thresholds"
K_TOKENIZER = NS + "tokenizer_json"
REQUIRED_KEYS = ("general.architecture", "general.alignment", K_FORMAT_VERSION, K_METADATA_SHA256, K_TENSORS,
                 K_ARCH, K_BLOCKS, K_LAYOUTS, K_QUANT, K_SOURCE_SHA256, K_RECIPE, K_PASS_LOG, K_TARGET,
                 K_SPARSITY, K_OUTPUT_THRESHOLDS, K_ACTIVATION_THRESHOLDS, K_PREDICTOR_MODES,
                 K_PREDICTOR_RANKS, K_PREDICTOR_THRESHOLDS)
#: keys whose value is a JSON document in a string
JSON_KEYS = (K_TENSORS, K_ARCH, K_BLOCKS, K_LAYOUTS, K_QUANT, K_SOURCE, K_RECIPE, K_PASS_LOG)


def neuron_order_key(layer: int) -> str:
    return f"{NS}layer.{layer}.neuron_order"


def bundle_name(layer: int) -> str:
    return f"blk.{layer}.ffn_bundle"


def gate_name(layer: int) -> str:
    """The gate matrix of a layer whose bundle layout is ``gate_apart``."""
    return f"blk.{layer}.ffn_gate"


def predictor_name(layer: int, what: str) -> str:
    return f"blk.{layer}.predictor.{what}"


#: tensor type of each weight format; FFN bundles are I8 blobs (GGUF has no U8 type)
GGML_TYPES = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
              "q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
BLOB_TYPE = GGMLQuantizationType.I8
TYPE_NAMES = {int(t): t.name for t in (*GGML_TYPES.values(), BLOB_TYPE)}
FORMAT_OF_TYPE = {int(t): fmt for fmt, t in GGML_TYPES.items()}


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` (numpy order, rows last-axis-contiguous)."""
    rows = 1
    for dim in shape[:-1]:
        rows *= dim
    if ggml_type == BLOB_TYPE:
        return rows * shape[-1]
    return rows * quant.row_bytes(FORMAT_OF_TYPE[ggml_type], shape[-1])


def padded(n: int, align: int = ALIGNMENT) -> int:
    return -(-n // align) * align


@dataclass(frozen=True)
class KV:
    """One metadata entry: ``key``, GGUF value type, value, element type of arrays."""

    key: str
    type: GGUFValueType
    value: Any
    sub_type: GGUFValueType | None = None


_FLOAT_PACK = {GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d"}


def _canonical_scalar(value: Any, vtype: int) -> Any:
    fmt = _FLOAT_PACK.get(GGUFValueType(vtype))
    return struct.pack(fmt, value).hex() if fmt else value


def canonical_value(vtype: int, value: Any, sub_type: int | None) -> Any:
    if vtype == GGUFValueType.ARRAY:
        return [int(sub_type), [_canonical_scalar(v, sub_type) for v in value]]
    return [int(vtype), _canonical_scalar(value, vtype)]


def metadata_digest(entries: dict[str, tuple[int, Any, int | None]]) -> str:
    """sha256 of ``{key: (type, value, sub_type)}`` without the digest key itself."""
    doc = {k: canonical_value(t, v, s) for k, (t, v, s) in entries.items() if k != K_METADATA_SHA256}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def to_json(obj: Any) -> str:
    """The JSON text stored in a metadata string (sorted keys, no whitespace: stable bytes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)
