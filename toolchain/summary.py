"""Human and JSON summaries of an IR (what ``sparseforge inspect`` prints)."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from .ir import ANNOTATION_PREFIX, ModelIR
from .reference.rope import rope_scaling_text


def describe(ir: ModelIR) -> dict[str, Any]:
    """A JSON-serialisable description: spec, parameter counts and dtypes of the model's
    weights (not the ``sparseforge.*`` tensors passes add), blocks, pass log."""
    dtypes: Counter[str] = Counter()
    params = 0
    weights = [n for n in ir.store.names() if not n.startswith(ANNOTATION_PREFIX)]
    for name in weights:
        n = int(np.prod(ir.store.shape(name)))
        params += n
        dtypes[ir.store.dtype(name).name] += n
    ffn = sum(int(np.prod(ir.store.shape(t))) for b in ir.blocks for t in b.weight_names())
    return {
        "spec": ir.spec.to_dict(),
        "source": ir.source,
        "tokenizer": ir.tokenizer,
        "graph": ir.graph,
        "tensors": len(weights),
        "annotation_tensors": len(ir.store) - len(weights),
        "parameters": params,
        "ffn_parameters": ffn,
        "dtypes": dict(sorted(dtypes.items())),
        "blocks": [
            {"layer": b.layer, "activation": b.activation, "gated": b.gate is not None,
             "neurons": int(ir.store.shape(b.up)[0]), "annotations": sorted(b.annotations)}
            for b in ir.blocks
        ],
        "passes": [p["pass"] for p in ir.pass_log],
        "profile": _profile(ir),
    }


def _profile(ir: ModelIR) -> list[dict[str, Any]] | None:
    """Per-layer sparsity and positive fraction when the IR has been profiled."""
    if not all("profile" in b.annotations for b in ir.blocks):
        return None
    return [{"layer": b.layer, "tokens": b.annotations["profile"]["tokens"],
             "sparsity": b.annotations["profile"]["sparsity"],
             "positive_fraction": b.annotations["profile"]["positive_fraction"]} for b in ir.blocks]


def _activations(blocks: list[dict[str, Any]]) -> str:
    kinds = Counter(b["activation"] for b in blocks)
    return ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))


def format_summary(d: dict[str, Any]) -> str:
    s = d["spec"]
    lines = [
        f"model        {s['architecture']} (family {s['family']}) from {d['source'].get('path', '?')}",
        f"dims         d_model {s['hidden_size']}, d_ff {s['intermediate_size']}, layers {s['num_layers']}, "
        f"heads {s['num_heads']} (kv {s['num_kv_heads']}, head_dim {s['head_dim']}), vocab {s['vocab_size']}"
        + (f", sliding window {s['sliding_window']}" if s.get("sliding_window") else "")
        + (f" in {s['layer_types'].count('sliding_attention')} of {s['num_layers']} layers"
           if s.get("layer_types") else ""),
        f"ffn          {'gated ' if s['gated'] else ''}{s['activation']} in the source; now "
        f"{_activations(d['blocks'])}; norm {s['norm']} (eps {s['norm_eps']:g})"
        + (f", rope theta {s['rope_theta']:g}" if s.get("rope_theta") else "")
        + (f" ({rope_scaling_text(s['rope_scaling'])})" if s.get("rope_scaling") else "")
        + (f", over {s['rotary_dim']} of {s['head_dim']} head dims" if s.get("rotary_dim") else ""),
        f"parameters   {d['parameters']:,} in {d['tensors']} tensors; FFN {d['ffn_parameters']:,} "
        f"({100 * d['ffn_parameters'] / max(d['parameters'], 1):.1f}%)",
        "dtypes       " + ", ".join(f"{k} {v:,}" for k, v in d["dtypes"].items()),
        f"tokenizer    {d['tokenizer'] or 'none'}",
    ]
    if d["graph"]:
        lines.append(f"onnx graph   {d['graph']}")
    notes = sorted({a for b in d["blocks"] for a in b["annotations"]})
    lines.append(f"annotations  {', '.join(notes) if notes else 'none'}")
    lines.append(f"passes run   {', '.join(d['passes']) if d['passes'] else 'none'}")
    if d.get("profile"):
        lines.append(f"profile      {d['profile'][0]['tokens']} calibration tokens")
        for p in d["profile"]:
            lines.append(f"  layer {p['layer']:2d}  sparsity {p['sparsity']:.3f}  "
                         f"positive fraction {p['positive_fraction']:.3f}")
    return "\n".join(lines)
