"""Checks of a parsed GGUF artifact, in order: identity (architecture, format version,
required keys), metadata digest, tensor table (names, types, shapes, byte sizes,
canonical offsets, file size, zero padding), the model spec (every tensor's shape and
each layer's bundle layout and neuron order), and last the sha256 of every tensor.
Each failure is an :class:`InputError` naming the file and the problem.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from gguf import GGUFValueType

from sparseforge.kernels.bundle import BundleLayout
from sparseforge.kernels.runtime import activation_spec

from . import artifact_format as F
from .artifact_gguf import GGUFFile
from .errors import InputError
from .ir import ArchSpec


def check_identity(g: GGUFFile) -> None:
    arch = g.kv.get("general.architecture", (None, None, None))[1]
    if arch != F.ARCHITECTURE:
        raise InputError(g.path, f"not a sparseforge artifact (general.architecture is {arch!r})")
    version = g.kv.get(F.K_FORMAT_VERSION, (None, None, None))[1]
    if F.K_FORMAT_VERSION in g.kv and version != F.FORMAT_VERSION:
        raise InputError(g.path, f"artifact format version {version} is not supported "
                         f"(this sparseforge reads version {F.FORMAT_VERSION})")
    missing = [k for k in F.REQUIRED_KEYS if k not in g.kv]
    if missing:
        raise InputError(g.path, f"missing metadata key {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if g.kv["general.alignment"][1] != F.ALIGNMENT:
        raise InputError(g.path, f"general.alignment is {g.kv['general.alignment'][1]}, expected {F.ALIGNMENT}")
    if F.metadata_digest(g.kv) != g.kv[F.K_METADATA_SHA256][1]:
        raise InputError(g.path, "metadata checksum mismatch (the metadata was changed or damaged)")


def decode_metadata(g: GGUFFile) -> dict[str, Any]:
    """Plain values by key; JSON documents parsed."""
    out = {}
    for key, (vtype, value, _) in g.kv.items():
        if key in F.JSON_KEYS:
            if vtype != GGUFValueType.STRING:
                raise InputError(g.path, f"metadata {key} is not a string")
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise InputError(g.path, f"metadata {key} is not valid JSON: {exc}") from None
        out[key] = value
    return out


def check_table(g: GGUFFile, table: list[dict[str, Any]]) -> int:
    """Tensor infos against the tensor table; offsets, size, padding. Returns the data start."""
    if len(table) != len(g.tensors):
        raise InputError(g.path, f"{len(g.tensors)} tensors in the file, {len(table)} in the tensor table")
    data_start = F.padded(g.header_end)
    offset = 0
    for info, row in zip(g.tensors, table):
        want = (row["name"], row["type"], tuple(row["shape"]))
        got = (info.name, F.TYPE_NAMES.get(info.ggml_type, str(info.ggml_type)), info.shape)
        if want != got:
            raise InputError(g.path, f"tensor info {got} does not match the tensor table {want}")
        if F.tensor_nbytes(info.ggml_type, info.shape) != row["nbytes"]:
            raise InputError(g.path, f"tensor {info.name}: {row['nbytes']} bytes in the table, "
                             f"{F.tensor_nbytes(info.ggml_type, info.shape)} for its type and shape")
        if info.offset != offset:
            raise InputError(g.path, f"tensor {info.name} at data offset {info.offset}, expected {offset}")
        offset += F.padded(row["nbytes"])
    if g.size != data_start + offset:
        what = "truncated" if g.size < data_start + offset else "has trailing bytes"
        raise InputError(g.path, f"{what}: {g.size} bytes, where the header ({data_start} bytes) and the tensor "
                                 f"data its table lists ({offset} bytes) make {data_start + offset}")
    _check_zero(g, g.header_end, data_start, "header padding")
    for info, row in zip(g.tensors, table):
        start = data_start + info.offset
        _check_zero(g, start + row["nbytes"], start + F.padded(row["nbytes"]), f"padding after {info.name}")
    return data_start


def _check_zero(g: GGUFFile, start: int, end: int, what: str) -> None:
    if end > start and g.bytes_at(start, end - start).any():
        raise InputError(g.path, f"non-zero bytes in the {what} (offset {start})")


def check_checksums(g: GGUFFile, table: list[dict[str, Any]], data_start: int) -> None:
    for info, row in zip(g.tensors, table):
        start = data_start + info.offset
        view = g.bytes_at(start, row["nbytes"])
        if hashlib.sha256(view).hexdigest() != row["sha256"]:
            raise InputError(g.path, f"checksum mismatch in tensor {info.name} (its data was changed or damaged)")
        g.release(start, row["nbytes"])


def check_spec(g: GGUFFile, meta: dict[str, Any]) -> tuple[ArchSpec, list[BundleLayout]]:
    """Every tensor's shape against the architecture spec, bundle layouts, neuron orders."""
    from .families import family_named

    try:
        spec = ArchSpec.from_dict(meta[F.K_ARCH])
    except ValueError as exc:  # a field of the wrong type, RoPE scaling the runtime does not compute
        raise InputError(g.path, f"model spec: {exc}") from None
    family = family_named(spec.family)
    ffn_matrices = {n for b in family.blocks(spec) for n in (b.gate, b.up, b.down) if n}
    required = {k: v for k, v in family.expected_shapes(spec).items() if k not in ffn_matrices}
    optional = dict(family.optional_shapes(spec))
    layouts = [BundleLayout.from_dict(d) for d in meta[F.K_LAYOUTS]]
    if len(layouts) != spec.num_layers:
        raise InputError(g.path, f"{len(layouts)} bundle layouts for {spec.num_layers} layers")
    ranks = meta[F.K_PREDICTOR_RANKS]
    for layer, layout in enumerate(layouts):
        if (layout.d_model, layout.n_neurons, layout.gated) != (spec.hidden_size, spec.intermediate_size, spec.gated):
            raise InputError(g.path, f"layer {layer}: bundle layout {layout.to_dict()} does not fit the model spec")
        required[F.bundle_name(layer)] = (layout.n_neurons, layout.stride)
        if layout.gate_apart:
            required[F.gate_name(layer)] = (layout.n_neurons, layout.d_model)
        order = meta.get(F.neuron_order_key(layer))
        if order is None or sorted(order) != list(range(layout.n_neurons)):
            raise InputError(g.path, f"layer {layer}: metadata {F.neuron_order_key(layer)} is missing or "
                             "not a permutation of the neurons")
        if ranks[layer]:
            d, r, n = spec.hidden_size, ranks[layer], spec.intermediate_size
            required.update({F.predictor_name(layer, "w1"): (r, d), F.predictor_name(layer, "w2"): (n, r)})
            optional.update({F.predictor_name(layer, "b1"): (r,), F.predictor_name(layer, "b2"): (n,)})
    for layer, doc in enumerate(meta[F.K_BLOCKS]):
        try:  # what the runtime's kernels compute
            activation_spec(doc.get("activation"), spec.gated, doc.get("up_activation"))
        except ValueError as exc:
            raise InputError(g.path, f"layer {layer}: {exc}") from None
    for doc in meta[F.K_BLOCKS]:  # FFN biases a pass added (e.g. relufy's mean correction on a Llama)
        for key, size in (("gate_bias", spec.intermediate_size), ("up_bias", spec.intermediate_size),
                          ("down_bias", spec.hidden_size)):
            if doc.get(key):
                optional.setdefault(doc[key], (size,))
    present = {t.name: t for t in g.tensors}
    missing = sorted(set(required) - set(present))
    if missing:
        raise InputError(g.path, f"tensor {missing[0]} is missing")
    shapes = {**optional, **required}
    for name, info in present.items():
        if name not in shapes:
            raise InputError(g.path, f"tensor {name} is not part of the model")
        if info.shape != tuple(shapes[name]):
            raise InputError(g.path, f"tensor {name} has shape {info.shape}, the model spec needs {tuple(shapes[name])}")
    for layer, layout in enumerate(layouts):
        if layout.gate_apart and present[F.gate_name(layer)].ggml_type != F.GGML_TYPES[layout.fmt]:
            raise InputError(g.path, f"tensor {F.gate_name(layer)} is not {layout.fmt}, its layer's format")
    return spec, layouts


def safely(g: GGUFFile, fn, *args):
    """Run a check; a malformed metadata structure it trips over is an InputError too."""
    try:
        return fn(g, *args)
    except InputError as exc:
        if exc.path is None:  # e.g. an unknown model family: name the artifact
            raise InputError(g.path, exc.problem) from None
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(g.path, f"malformed artifact metadata: {type(exc).__name__}: {exc}") from None


def as_array(g: GGUFFile, data_start: int, name: str, ggml_type: int, shape: tuple[int, ...],
             nbytes: int, offset: int) -> np.ndarray:
    """A read-only view of a tensor: typed for F32/F16, encoded bytes ``[..., row bytes]`` otherwise."""
    raw = g.bytes_at(data_start + offset, nbytes)
    if ggml_type == F.GGML_TYPES["f32"]:
        return raw.view("<f4").reshape(shape)
    if ggml_type == F.GGML_TYPES["f16"]:
        return raw.view("<f2").reshape(shape)
    return raw.reshape(*shape[:-1], -1)
