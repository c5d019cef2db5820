"""``weight-stats``: measure the FFN weights, layer by layer. Changes no tensor.

For each FFN block it records (in ``block.annotations["weights"]``) the neuron count,
parameter count and per-neuron L2 norms summarised as min / mean / max for the up (and
gate) rows and the down columns; neurons whose down column is all zero are counted as
dead. Statistics: totals of FFN and model parameters and the FFN share, which bounds
what activation sparsity can save.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparseforge.toolchain.ir import FFNBlock, ModelIR
from sparseforge.toolchain.pass_base import Pass, PassContext, PassResult, register_pass
from sparseforge.toolchain.progress import progress


@dataclass(frozen=True)
class WeightStatsOptions:
    """``dead_eps``: a neuron whose down column has L2 norm <= dead_eps is counted dead."""

    dead_eps: float = 0.0


def _summary(norms: np.ndarray) -> dict[str, float]:
    return {"min": float(norms.min()), "mean": float(norms.mean()), "max": float(norms.max())}


@register_pass
class WeightStats(Pass):
    name = "weight-stats"
    summary = "per-layer FFN weight statistics (parameters, neuron norms); changes no tensor"
    Options = WeightStatsOptions

    def run(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        out = ir.evolve()
        ffn_params = 0
        dead_total = 0
        for block in progress(out.blocks, desc="weight-stats", enabled=ctx.progress, unit="layer"):
            info = self._block_stats(out, block)
            block.annotations["weights"] = info
            ffn_params += info["params"]
            dead_total += info["dead_neurons"]
        total = sum(int(np.prod(out.store.shape(n))) for n in out.store.names())
        stats = {
            "layers": len(out.blocks),
            "ffn_params": ffn_params,
            "model_params": total,
            "ffn_fraction": ffn_params / total if total else 0.0,
            "dead_neurons": dead_total,
        }
        return PassResult(out, stats, modified=True)

    def _block_stats(self, ir: ModelIR, block: FFNBlock) -> dict:
        store = ir.store
        up = store.get_f32(block.up)
        down = store.get_f32(block.down)
        info = {
            "neurons": int(up.shape[0]),
            "params": int(sum(np.prod(store.shape(n)) for n in block.weight_names())),
            "up_row_norm": _summary(np.linalg.norm(up, axis=1)),
        }
        down_norms = np.linalg.norm(down, axis=0)
        info["down_col_norm"] = _summary(down_norms)
        if block.gate:
            info["gate_row_norm"] = _summary(np.linalg.norm(store.get_f32(block.gate), axis=1))
        info["dead_neurons"] = int((down_norms <= self.options.dead_eps).sum())
        return info
