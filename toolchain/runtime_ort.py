"""The same model's dense onnxruntime baseline: an artifact turned back into an IR.

:func:`artifact_ir` decodes every weight of an artifact to float32 (FFN matrices
unpacked from the bundles, and a gate-apart layer's gate matrix, in the stored neuron
order: an FFN's output does not depend
on the order of its neurons) under the family's canonical names, with the blocks'
activation fields, so :func:`~.onnx_builder.build_onnx` can write a float32 graph that
computes what the artifact computes, densely. :func:`ort_session` builds and opens it.
"""
from __future__ import annotations

from pathlib import Path

from sparseforge.kernels.bundle import unpack_bundles

from . import artifact_format as F
from .ir import ModelIR
from .tensors import TensorStore


def artifact_ir(model) -> ModelIR:
    """A float32 IR of a :class:`~.runtime_load.LoadedModel` (tensors in memory)."""
    from .families import family_named

    art, spec = model.artifact, model.spec
    store = TensorStore()
    for name in art.tensor_names:
        if not name.startswith("blk."):
            store.set(name, art.weight(name))
    blocks = family_named(spec.family).blocks(spec)
    for b, doc, layout in zip(blocks, model.blocks, art.layouts):
        gate, up, down = unpack_bundles(art.bundles(b.layer), layout)
        if layout.gate_apart:
            gate = art.weight(F.gate_name(b.layer))
        if gate is not None:
            store.set(b.gate, gate)
        store.set(b.up, up)
        store.set(b.down, down)
        b.activation = doc["activation"]
        b.activation_threshold = float(doc.get("activation_threshold") or 0.0)
        b.up_activation = doc.get("up_activation")
        b.output_threshold = float(doc.get("output_threshold") or 0.0)
        b.gate_bias, b.up_bias, b.down_bias = doc.get("gate_bias"), doc.get("up_bias"), doc.get("down_bias")
    return ModelIR(spec=spec, store=store, blocks=blocks, source={"format": "artifact", "path": str(art.path)})


def ort_session(model_or_ir, work_dir: Path, threads: int | None = None):
    """An onnxruntime session (``FFNTap`` without taps) over a float32 graph of an artifact
    (a ``LoadedModel``) or of an IR."""
    from .ffn_tap import FFNTap
    from .onnx_builder import build_onnx

    ir = model_or_ir if isinstance(model_or_ir, ModelIR) else artifact_ir(model_or_ir)
    graph = Path(ir.graph) if ir.graph else build_onnx(ir, Path(work_dir) / "ort", ffn_outputs=False).path
    return FFNTap(graph, [], threads=threads)
