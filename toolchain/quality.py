"""Model quality and FFN sparsity on held-out sequences, through onnxruntime.

``run_model`` runs an IR (its own ONNX graph, or one built from it; layer-streamed
through the numpy reference executor when its float32 weights exceed the memory budget,
see ``toolchain.layer_stream``) over sequences and
collects, per layer, streaming activation statistics (exact-zero sparsity and the |h|
histogram), and either sentence embeddings (encoders: mean over real tokens,
L2-normalised) or the summed next-token negative log-likelihood (decoders).
``compare`` turns two runs into the quality figures a conversion is judged by.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .activation_stats import LayerStats
from .calibration import Sequences
from .ir import ModelIR
from .layer_stream import StreamTap, make_tap, stream_batch, visit


@dataclass
class ModelRun:
    """Per-layer statistics (``eps`` 0: sparsity = fraction of exact zeros), and
    ``embeddings`` [N, d] (encoders) or ``nll`` / ``predicted`` tokens (decoders)."""

    stats: dict[int, LayerStats]
    embeddings: np.ndarray | None = None
    nll: float = 0.0
    predicted: int = 0

    @property
    def sparsity(self) -> list[float]:
        return [self.stats[k].sparsity for k in sorted(self.stats)]

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll / max(self.predicted, 1)))


def _pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    pooled = (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1.0)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def _next_token_nll(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Summed -log p(ids[t+1] | ..t) over positions where both tokens are real."""
    z = logits[:, :-1].astype(np.float64)
    target = ids[:, 1:]
    valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    zmax = z.max(-1, keepdims=True)
    logsumexp = np.log(np.exp(z - zmax).sum(-1)) + zmax[..., 0]
    picked = np.take_along_axis(z, target[..., None], -1)[..., 0]
    return float((logsumexp - picked)[valid].sum()), int(valid.sum())


def run_model(ir: ModelIR, seqs: Sequences, *, batch_size: int = 16, threads: int | None = None,
              work_dir: Path | None = None, streaming: str = "auto", memory_budget_mb: float = 2048.0) -> ModelRun:
    """Run ``ir`` over ``seqs`` in onnxruntime (graph built in ``work_dir`` or a temp dir),
    or layer-streamed (``streaming``, ``memory_budget_mb``: as the profile pass's options)."""
    with tempfile.TemporaryDirectory(prefix="sparseforge-eval-") as tmp:
        tap = make_tap(ir, Path(work_dir or tmp) / "graph", streaming=streaming,
                       memory_budget_mb=memory_budget_mb, threads=threads)
        if isinstance(tap, StreamTap):
            batch_size = max(batch_size, stream_batch(ir, seqs.ids.shape[1], memory_budget_mb))
        run = ModelRun(stats={layer: LayerStats(n_ff=ir.spec.intermediate_size) for layer, _, _ in tap.taps})
        pooled = []
        for ids, mask in seqs.batches(batch_size):
            real = mask.astype(bool)
            out = visit(tap, ids, mask, lambda layer, _x, a: run.stats[layer].update(a[real]), output=True)
            if ir.spec.causal:
                nll, n = _next_token_nll(out, ids, mask)
                run.nll += nll
                run.predicted += n
            else:
                pooled.append(_pooled(out, mask))
        if pooled:
            run.embeddings = np.concatenate(pooled)
    return run


def compare(reference: ModelRun, candidate: ModelRun) -> dict[str, Any]:
    """Quality of ``candidate`` against ``reference`` on the same sequences: encoders -
    mean and minimum embedding cosine; decoders - both perplexities and their ratio."""
    out: dict[str, Any] = {"sparsity_reference": reference.sparsity, "sparsity": candidate.sparsity,
                           "mean_sparsity": float(np.mean(candidate.sparsity))}
    if reference.embeddings is not None and candidate.embeddings is not None:
        cos = (reference.embeddings * candidate.embeddings).sum(1)
        out.update(mean_cosine=float(cos.mean()), min_cosine=float(cos.min()))
    else:
        out.update(perplexity_reference=reference.perplexity, perplexity=candidate.perplexity,
                   perplexity_ratio=candidate.perplexity / reference.perplexity)
    return out
