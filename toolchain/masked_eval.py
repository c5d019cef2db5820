"""End-to-end quality with predicted activation masks applied (numpy reference executors).

At decode time a runtime with activation predictors computes only the neurons its
predictor marks active; the others are skipped, i.e. their activation is taken as 0.
:func:`masked_quality` runs the reference executor (``toolchain.reference``) with a
custom FFN that does exactly that (``h *= predicted mask`` before the down projection)
on held-out sequences and compares it with an unmasked reference run through the
definitions of ``toolchain.quality.compare`` (encoders: mean / min cosine of the
mean-pooled, L2-normalised embeddings; decoders: perplexity and its ratio).

It also measures, per masked layer, the predictor's recall, precision and densities on
those sequences, with the masked model's own FFN inputs (errors in earlier layers
included), which is what a runtime sees. Gate-first and dense layers are exact and run
unmasked.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .activation_stats import LayerStats
from .calibration import Sequences, calibration_split
from .ir import FFNBlock, ModelIR
from .predictor import MaskMetrics, as_weights, mask_metrics, predict_mask
from .quality import ModelRun, _next_token_nll, _pooled, compare
from .reference import executor_for, ffn_forward
from .tensors import TensorStore

MaskFn = Callable[[np.ndarray], np.ndarray]
"""``fn(x [tokens, d] float32) -> predicted active [tokens, n_ff] bool``."""


def predictor_masks(ir: ModelIR) -> dict[int, MaskFn]:
    """Mask functions of the layers whose ``annotations["predictor"]["mode"]`` is
    ``predictor`` (weights from the IR's ``sparseforge.predictor.{L}.*`` tensors)."""
    out: dict[int, MaskFn] = {}
    for b in ir.blocks:
        ann = b.annotations.get("predictor") or {}
        if ann.get("mode") != "predictor":
            continue
        weights = as_weights({k: ir.store.get(v) for k, v in ann["tensors"].items()})
        out[b.layer] = _mask_fn(weights, float(ann["threshold"]))
    return out


def _mask_fn(weights: Any, threshold: float) -> MaskFn:
    return lambda x: predict_mask(weights, x, threshold)


class MaskedFFN:
    """An ``ffn`` for the reference executors: ``block``'s FFN with the activation
    multiplied by ``masks[layer](x)`` (layers without a mask function run unmasked).

    Set ``valid`` (flat bool over the rows the executor passes, batch-major) before each
    forward call so the recall figures count real tokens only; ``metrics[layer]``
    accumulates the predicted mask against ``|h| > eps`` of the unmasked activation."""

    def __init__(self, masks: dict[int, MaskFn], eps: float = 0.0) -> None:
        self.masks = masks
        self.eps = eps
        self.valid: np.ndarray | None = None
        self.metrics: dict[int, MaskMetrics] = {layer: MaskMetrics(0, 0, 0, 0) for layer in masks}

    def __call__(self, store: TensorStore, block: FFNBlock, x: np.ndarray, *, capture=None) -> np.ndarray:
        fn = self.masks.get(block.layer)
        if fn is None:
            return ffn_forward(store, block, x, capture=capture)
        x = np.asarray(x, dtype=np.float32)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        seen: list[np.ndarray] = []
        ffn_forward(store, block, x2, capture=lambda _l, _x, h: seen.append(h.copy()))
        h = seen[0]
        predicted = fn(x2)
        rows = slice(None) if self.valid is None else self.valid
        self.metrics[block.layer] += mask_metrics(predicted[rows], np.abs(h[rows]) > self.eps)
        h *= predicted
        if capture is not None:
            capture(block.layer, x2, h)
        y = h @ store.get_f32(block.down).T
        if block.down_bias:
            y += store.get_f32(block.down_bias)
        return y.reshape(*lead, y.shape[-1])


def evaluation_sequences(ir: ModelIR, n: int) -> Sequences:
    """The first ``n`` held-out calibration sequences (0: all; the calibration split when
    nothing was held out)."""
    seqs = calibration_split(ir, "heldout")
    if len(seqs) == 0:
        seqs = calibration_split(ir, "train")
    return seqs.head(n)


def _run(ir: ModelIR, seqs: Sequences, ffn: Any, batch_size: int) -> ModelRun:
    """One pass of the reference executor over ``seqs``: per-layer activation statistics
    and embeddings (encoders) or summed next-token NLL (decoders), as ``quality.run_model``."""
    ex = executor_for(ir, ffn=ffn)
    run = ModelRun(stats={b.layer: LayerStats(n_ff=ir.spec.intermediate_size) for b in ir.blocks})

    def capture(layer: int, _x: np.ndarray, h: np.ndarray) -> None:
        run.stats[layer].update(h)

    pooled = []
    for ids, mask in seqs.batches(batch_size):
        if isinstance(ffn, MaskedFFN):
            ffn.valid = mask.reshape(-1).astype(bool)
        if ir.spec.causal:
            logits = ex.forward(ids, attention_mask=mask, capture=capture)
            nll, n = _next_token_nll(logits, ids, mask)
            run.nll += nll
            run.predicted += n
        else:
            pooled.append(_pooled(ex.hidden_states(ids, mask, capture=capture), mask))
    if pooled:
        run.embeddings = np.concatenate(pooled)
    return run


def masked_quality(ir: ModelIR, seqs: Sequences, masks: dict[int, MaskFn] | None = None, *,
                   reference: ModelIR | None = None, eps: float = 0.0, batch_size: int = 8) -> dict[str, Any]:
    """Quality of ``ir`` with predicted masks applied (``masks``; default: the IR's own
    predictors, :func:`predictor_masks`) against ``reference`` (default: ``ir`` unmasked)
    on ``seqs``: ``toolchain.quality.compare``'s figures plus ``layers``, per masked
    layer: recall, precision, density and true density on these sequences."""
    masks = predictor_masks(ir) if masks is None else masks
    ffn = MaskedFFN(masks, eps)
    ref_run = _run(reference if reference is not None else ir, seqs, ffn_forward, batch_size)
    out = compare(ref_run, _run(ir, seqs, ffn, batch_size))
    out["layers"] = [{"layer": layer, **ffn.metrics[layer].to_dict()} for layer in sorted(ffn.metrics)]
    return out
