"""What goes into an artifact, taken from an IR: the tensor stream (non-FFN weights in
their quantize formats, one bundle blob per FFN layer, predictors) and the metadata.

Every encoded weight is decoded again and compared with the IR's values: the IR after
``quantize`` holds exactly what the artifact decodes to, and a weight that no longer
round-trips (changed after quantize) is an error rather than a silent requantization.
Weights the IR keeps encoded in their artifact format (``TensorStore.encoded``) are
decoded and encoded again a chunk of rows at a time, so the stream holds one tensor's
(or one FFN layer's) encoded bytes, never a float32 copy; the bytes are the ones
encoding the whole float32 tensor gives (rows are encoded independently).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGUFValueType as T

from sparseforge.kernels import quant
from sparseforge.kernels.bundle import BundleLayout, encode_gate, pack_bundles, unpack_bundles

from . import artifact_format as F
from .artifact_writer import TensorEntry
from .errors import PassError
from .fingerprint import file_digest
from .ir import ANNOTATION_PREFIX, ModelIR
from .recipe import VERIFY_GATES

#: statistics that differ between identical runs (wall time, throughput, memory)
VOLATILE = re.compile(r"seconds|_per_s$|^wall_s$|rss")


def ffn_matrices(ir: ModelIR) -> set[str]:
    return {n for b in ir.blocks for n in (b.gate, b.up, b.down) if n}


def weight_names(ir: ModelIR) -> list[str]:
    """Model weights stored as ordinary tensors (everything but FFN matrices and annotations)."""
    skip = ffn_matrices(ir)
    return [n for n in ir.store.names() if n not in skip and not n.startswith(ANNOTATION_PREFIX)]


def gate_apart(b) -> bool:
    """Whether block ``b``'s gate is stored apart from its bundles: the predictors pass
    chose gate-first for it, so every decode step reads the whole gate."""
    return b.gate is not None and (b.annotations.get("predictor") or {}).get("mode") == "gate-first"


def block_layout(ir: ModelIR, b, align: int) -> BundleLayout:
    """Block ``b``'s bundle layout: its quantize format, the gate apart or not."""
    return BundleLayout(fmt=(b.annotations.get("quant") or {}).get("format", "f32"), d_model=ir.spec.hidden_size,
                        n_neurons=ir.spec.intermediate_size, gated=b.gate is not None, align=align,
                        gate_apart=gate_apart(b))


def layouts_for(ir: ModelIR, align: int) -> list[BundleLayout]:
    return [block_layout(ir, b, align) for b in ir.blocks]


def _check_same(name: str, want: np.ndarray, got: np.ndarray) -> None:
    if not np.array_equal(want, got, equal_nan=True):
        raise PassError(f"pack: tensor {name} does not round-trip through its format: its values changed "
                        "after the quantize pass (run quantize again after passes that change weights)")


def _encoded_rows(ir: ModelIR, name: str, fmt: str, transpose: bool) -> np.ndarray | None:
    """The encoded rows of ``name`` as the artifact stores them, re-encoded from their
    decoded values a chunk at a time and checked (None: not stored encoded in ``fmt``)."""
    enc = ir.store.encoded(name)
    if enc is None or enc[1] != fmt or enc[2] != transpose:
        return None
    raw = enc[0]
    out = np.empty(raw.shape, np.uint8)
    step = max(1, (1 << 22) // max(1, raw.shape[1]))
    for lo in range(0, raw.shape[0], step):
        y = quant.decode(np.asarray(raw[lo: lo + step]), fmt)
        again = quant.encode(y, fmt)
        _check_same(name, y, quant.decode(again, fmt))
        out[lo: lo + step] = again
    return out


def _ffn_blob(ir: ModelIR, b, layout: BundleLayout) -> np.ndarray | None:
    """Block ``b``'s bundles assembled from its encoded rows (None unless every part is
    stored encoded in the layout's format, gate/up by rows and down by columns)."""
    if layout.fmt not in quant.QUANTIZED:
        return None
    parts = {}
    for part in layout.parts:
        rows = _encoded_rows(ir, getattr(b, part), layout.fmt, part == "down")
        if rows is None or rows.shape != (layout.n_neurons, layout.part_bytes):
            return None
        parts[part] = rows
    blob = np.zeros((layout.n_neurons, layout.stride), np.uint8)
    for part, rows in parts.items():
        off = layout.part_offset(part)
        blob[:, off: off + layout.part_bytes] = rows
    return blob


def tensor_stream(ir: ModelIR, layouts: list[BundleLayout], formats: dict[str, str],
                  predictor_format: str = "f32") -> Iterator[TensorEntry]:
    """The artifact's tensors in file order, produced one at a time."""
    for name in weight_names(ir):
        fmt = formats.get(name, "f32")
        rows = _encoded_rows(ir, name, fmt, False) if fmt in quant.QUANTIZED else None
        if rows is not None:
            yield TensorEntry(name, int(F.GGML_TYPES[fmt]), tuple(ir.store.shape(name)), rows)
            continue
        x = ir.store.get_f32(name)
        if fmt == "f32":
            data = x
        elif fmt == "f16":
            data = x.astype(np.float16)
            _check_same(name, x, data.astype(np.float32))
        else:
            data = quant.encode(x, fmt)
            _check_same(name, x, quant.decode(data, fmt))
        yield TensorEntry(name, int(F.GGML_TYPES[fmt]), tuple(x.shape), data)
    for b, layout in zip(ir.blocks, layouts):
        blob = _ffn_blob(ir, b, layout)
        if blob is None:
            mats = [ir.store.get_f32(b.gate) if b.gate else None, ir.store.get_f32(b.up), ir.store.get_f32(b.down)]
            blob = pack_bundles(*mats, layout)
            for part, want, got in zip(("gate", "up", "down"), mats, unpack_bundles(blob, layout)):
                if got is not None:
                    _check_same(f"{getattr(b, part)} (layer {b.layer} bundles)", want, got)
            del mats
        yield TensorEntry(F.bundle_name(b.layer), int(F.BLOB_TYPE), (layout.n_neurons, layout.stride), blob)
        del blob
        if layout.gate_apart:
            yield _gate_entry(ir, b, layout)
        for what, tensor in sorted(((b.annotations.get("predictor") or {}).get("tensors") or {}).items()):
            x = ir.store.get_f32(tensor)
            yield TensorEntry(F.predictor_name(b.layer, what), int(F.GGML_TYPES[predictor_format]), tuple(x.shape),
                              x if predictor_format == "f32" else x.astype(np.float16))


def _gate_entry(ir: ModelIR, b, layout: BundleLayout) -> TensorEntry:
    """A gate-apart block's gate matrix in the layer's format (checked like the bundles)."""
    shape = (layout.n_neurons, layout.d_model)
    rows = _encoded_rows(ir, b.gate, layout.fmt, False) if layout.fmt in quant.QUANTIZED else None
    if rows is None:
        want = ir.store.get_f32(b.gate)
        rows = encode_gate(want, layout)
        got = rows.astype(np.float32) if layout.fmt in ("f32", "f16") else quant.decode(rows, layout.fmt)
        _check_same(f"{b.gate} (layer {b.layer} gate)", want, got)
    return TensorEntry(F.gate_name(b.layer), int(F.GGML_TYPES[layout.fmt]), shape, rows)


def strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: strip_volatile(v) for k, v in obj.items() if not VOLATILE.search(str(k))}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


def source_digest(ir: ModelIR) -> str:
    """sha256 of the source model: the ONNX file's digest, or a digest of the checkpoint's
    config and safetensors files (the config digest alone when they are gone)."""
    src = ir.source
    if src.get("sha256"):
        return src["sha256"]
    path = Path(src.get("path", ""))
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return src.get("config_sha256") or hashlib.sha256(F.to_json(src).encode()).hexdigest()
    h = hashlib.sha256(f"config\0{src.get('config_sha256')}\0".encode())
    for f in files:
        h.update(f"{f.name}\0{file_digest(f)}\0".encode())
    return h.hexdigest()


def _sparsity(b) -> float:
    for key in ("profile", "relufy"):
        if key in b.annotations:
            return float(b.annotations[key]["sparsity"])
    return float("nan")


def build_metadata(ir: ModelIR, layouts: list[BundleLayout], formats: dict[str, str], *, target: str,
                   seed: int, pack_options: dict[str, Any], tokenizer: bool) -> list[F.KV]:
    blocks = ir.blocks
    preds = [b.annotations.get("predictor") or {} for b in blocks]
    log = [{"pass": p["pass"], "options": p.get("options", {}), "stats": p.get("stats", {})} for p in ir.pass_log]
    recipe = {"seed": seed, "passes": [{"name": p["pass"], "options": p["options"]} for p in log]
              + [{"name": "pack", "options": pack_options}]}
    gates = {k: pack_options[k] for k in VERIFY_GATES if pack_options.get(k) is not None}
    if gates:
        recipe["verify"] = gates
    source = {k: v for k, v in ir.source.items() if k != "path"}
    source["name"] = Path(ir.source.get("path", "")).name
    kv = [
        F.KV("general.name", T.STRING, ir.spec.architecture),
        F.KV(F.K_ARCH, T.STRING, F.to_json(ir.spec.to_dict())),
        F.KV(F.K_BLOCKS, T.STRING, F.to_json([_block_doc(b) for b in blocks])),
        F.KV(F.K_LAYOUTS, T.STRING, F.to_json([lay.to_dict() for lay in layouts])),
        F.KV(F.K_QUANT, T.STRING, F.to_json({"ffn": [lay.fmt for lay in layouts],
                                             "tensors": {n: formats.get(n, "f32") for n in weight_names(ir)}})),
        F.KV(F.K_SOURCE, T.STRING, F.to_json(source)),
        F.KV(F.K_SOURCE_SHA256, T.STRING, source_digest(ir)),
        F.KV(F.K_RECIPE, T.STRING, F.to_json(recipe)),
        F.KV(F.K_PASS_LOG, T.STRING, F.to_json(strip_volatile(log))),
        F.KV(F.K_TARGET, T.STRING, target),
        F.KV(F.K_SPARSITY, T.ARRAY, [_sparsity(b) for b in blocks], T.FLOAT64),
        F.KV(F.K_OUTPUT_THRESHOLDS, T.ARRAY, [float(b.output_threshold) for b in blocks], T.FLOAT64),
        F.KV(F.K_ACTIVATION_THRESHOLDS, T.ARRAY, [float(b.activation_threshold) for b in blocks], T.FLOAT64),
        F.KV(F.K_PREDICTOR_MODES, T.ARRAY, [p.get("mode", "none") for p in preds], T.STRING),
        F.KV(F.K_PREDICTOR_RANKS, T.ARRAY,
             [int(p.get("rank", 0)) if p.get("mode") == "predictor" else 0 for p in preds], T.UINT32),
        F.KV(F.K_PREDICTOR_THRESHOLDS, T.ARRAY,
             [float(p["threshold"]) if p.get("threshold") is not None else float("nan") for p in preds], T.FLOAT64),
    ]
    for b, lay in zip(blocks, layouts):
        order = ir.store.get(b.annotations["reorder"]["order"]) if "reorder" in b.annotations \
            else np.arange(lay.n_neurons)
        kv.append(F.KV(F.neuron_order_key(b.layer), T.ARRAY, [int(i) for i in order], T.INT32))
    if tokenizer and ir.tokenizer:
        kv.append(F.KV(F.K_TOKENIZER, T.STRING, Path(ir.tokenizer).read_text(encoding="utf-8")))
    return kv


def _block_doc(b) -> dict[str, Any]:
    return {"layer": b.layer, "activation": b.activation, "activation_threshold": b.activation_threshold,
            "up_activation": b.up_activation, "output_threshold": b.output_threshold,
            "gate_bias": b.gate_bias, "up_bias": b.up_bias, "down_bias": b.down_bias,
            "bundle": F.bundle_name(b.layer)}
