"""Human and JSON descriptions of a validated artifact (``sparseforge inspect model.gguf``)."""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

from . import artifact_format as F
from .artifact_reader import Artifact
from .fingerprint import file_digest
from .reference.rope import rope_scaling_text


def _num(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def describe_artifact(art: Artifact) -> dict[str, Any]:
    m = art.metadata
    by_type: Counter[str] = Counter()
    for row in art.table:
        by_type[row["type"]] += row["nbytes"]
    layers = []
    for i, lay in enumerate(art.layouts):
        layers.append({
            "layer": i, "format": lay.fmt, "stride": lay.stride, "gated": lay.gated, "gate_apart": lay.gate_apart,
            "sparsity": _num(m[F.K_SPARSITY][i]), "output_threshold": m[F.K_OUTPUT_THRESHOLDS][i],
            "activation": m[F.K_BLOCKS][i]["activation"], "predictor": m[F.K_PREDICTOR_MODES][i],
            "rank": m[F.K_PREDICTOR_RANKS][i],
            "reordered": art.neuron_order(i).tolist() != list(range(lay.n_neurons)),
        })
    return {
        "path": str(art.path), "bytes": art.gguf.size, "sha256": file_digest(art.path),
        "format_version": m[F.K_FORMAT_VERSION], "gguf_version": art.gguf.version,
        "spec": m[F.K_ARCH], "target": m[F.K_TARGET], "source": m.get(F.K_SOURCE),
        "source_sha256": m[F.K_SOURCE_SHA256],
        "passes": [p["name"] for p in m[F.K_RECIPE]["passes"]], "seed": m[F.K_RECIPE]["seed"],
        "tensors": len(art.table), "bytes_by_type": dict(sorted(by_type.items())),
        "formats": dict(sorted(Counter(m[F.K_QUANT]["tensors"].values()).items())),
        "tokenizer_bytes": len(art.tokenizer_json.encode()) if art.tokenizer_json else 0,
        "layers": layers,
    }


def format_artifact(d: dict[str, Any]) -> str:
    s = d["spec"]
    lines = [
        f"artifact     {d['path']} ({d['bytes']:,} bytes, GGUF v{d['gguf_version']}, "
        f"sparseforge format {d['format_version']}; all checks passed)",
        f"sha256       {d['sha256']}",
        f"model        {s['architecture']} (family {s['family']}), d_model {s['hidden_size']}, "
        f"d_ff {s['intermediate_size']}, layers {s['num_layers']}, vocab {s['vocab_size']}"
        + (f", rope {rope_scaling_text(s['rope_scaling'])}" if s.get("rope_scaling") else "")
        + (f", rope over {s['rotary_dim']} of {s['head_dim']} head dims" if s.get("rotary_dim") else "")
        + (f", sliding window {s['sliding_window']}" if s.get("sliding_window") else "")
        + (f" in {s['layer_types'].count('sliding_attention')} of {s['num_layers']} layers"
           if s.get("layer_types") else ""),
        f"source       {(d['source'] or {}).get('name', '?')} sha256 {d['source_sha256'][:16]}...",
        f"recipe       {', '.join(d['passes'])} (seed {d['seed']}); target {d['target']}",
        f"tensors      {d['tensors']}: " + ", ".join(f"{k} {v:,} B" for k, v in d["bytes_by_type"].items()),
        "formats      " + ", ".join(f"{k} x{v}" for k, v in d["formats"].items()) + " (non-FFN weights)",
        f"tokenizer    {str(d['tokenizer_bytes']) + ' bytes of tokenizer.json' if d['tokenizer_bytes'] else 'none'}",
    ]
    for row in d["layers"]:
        sp = "   n/a" if row["sparsity"] is None else f"{row['sparsity']:.3f}"
        pred = row["predictor"] + (f" r{row['rank']}" if row["predictor"] == "predictor" else "")
        bundles = f"bundles of {row['stride']} B" + (" + gate" if row["gate_apart"] else "")
        lines.append(f"  layer {row['layer']:2d}  {row['format']:<5} {bundles:<22} "
                     f"sparsity {sp}  {row['activation']:<8} predictor {pred:<12} "
                     f"{'hot-first' if row['reordered'] else 'original order'}")
    return "\n".join(lines)
