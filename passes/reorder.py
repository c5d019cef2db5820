"""``reorder``: sort each FFN's neurons hot-first by profiled activation frequency
(PowerInfer's placement), so the neurons a runtime touches most sit together at the
front of the layer.

The permutation is the profile's ``rank`` (most active first, ties by lower index) and
is applied to everything indexed by neuron: gate/up rows and their biases, down
columns, the predictor's output rows (``w2``, ``b2``), the profile's per-neuron
statistics and the activation masks of its sample shards (rewritten). The model
computes the same function (the down projection sums over neurons). Each block's
``annotations["reorder"]`` names the tensor ``sparseforge.reorder.{L}.order`` [n_ff]
int64: the *original* index of the neuron now at each position (composed across
repeated runs). Works one layer at a time: the permuted weights of a layer go to a file of
the pass's own (``TensorStore.spill``), not to memory; quantized weights (encoded rows
after ``quantize``) are permuted as bytes, since each neuron is its own encoded row. Needs a profiled IR. Statistics per layer: the share of all
activations that falls on the hottest 10% / 25% of the neurons, and how many neurons
moved. The ONNX graph is cleared.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sparseforge.toolchain.errors import PassError
from sparseforge.toolchain.ir import ANNOTATION_PREFIX, FFNBlock, ModelIR
from sparseforge.toolchain.pass_base import Pass, PassContext, PassResult, register_pass
from sparseforge.toolchain.safetensors_io import SafetensorsFile, write_safetensors

#: profile statistics indexed by neuron (``rank`` is recomputed, ``hist`` is per layer)
PER_NEURON_PROFILE = ("count_active", "count_positive", "mean_abs", "max_abs")


def order_tensor(layer: int) -> str:
    return f"{ANNOTATION_PREFIX}reorder.{layer}.order"


@register_pass
class Reorder(Pass):
    name = "reorder"
    summary = "hot-first neuron order per FFN (profiled frequency); same permutation everywhere"

    def requires(self, ir: ModelIR) -> None:
        for b in ir.blocks:
            names = (b.annotations.get("profile") or {}).get("tensors") or {}
            if "rank" not in names or "count_active" not in names:
                raise PassError(f"reorder: layer {b.layer} has no activation profile; run the profile pass first")

    def run(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        out = ir.evolve()
        layers = []
        for b in out.blocks:
            perm = np.asarray(out.store.get(b.annotations["profile"]["tensors"]["rank"]), dtype=np.int64)
            n = out.store.shape(b.up)[0]
            if sorted(perm.tolist()) != list(range(n)):
                raise PassError(f"reorder: layer {b.layer}: the profile's rank is not a permutation of {n} neurons")
            permuted = permute_block(out, b, perm, spill=ctx.work_dir / "reorder-tensors" / f"layer-{b.layer:05d}.safetensors")
            self._reorder_samples(out, b, perm, ctx.work_dir)
            old = b.annotations.get("reorder")
            base = out.store.get(old["order"]) if old else np.arange(n)
            out.store.set(order_tensor(b.layer), np.asarray(base, dtype=np.int64)[perm])
            b.annotations["reorder"] = {"order": order_tensor(b.layer)}
            layers.append({"layer": b.layer, **_placement(out, b), "moved": int((perm != np.arange(n)).sum()),
                           "tensors": permuted})
        out.graph = None
        stats = {"layers": len(layers), "moved": sum(r["moved"] for r in layers),
                 "per_layer_top10pct_share": [r["top10pct_share"] for r in layers],
                 "per_layer_top25pct_share": [r["top25pct_share"] for r in layers],
                 "per_layer_moved": [r["moved"] for r in layers]}
        return PassResult(out, stats, modified=True)

    def _reorder_samples(self, out: ModelIR, b: FFNBlock, perm: np.ndarray, work: Path) -> None:
        """Rewrite the profile sample shards with mask columns in the new neuron order."""
        n = len(perm)
        for key in b.annotations["profile"].get("sample_shards") or []:
            f = SafetensorsFile(out.files[key])
            mask = np.unpackbits(np.asarray(f.get("mask")), axis=1, bitorder="little", count=n).astype(bool)
            path = work / key
            path.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(path, {"x": np.asarray(f.get("x")), "token": np.asarray(f.get("token")),
                                     "mask": np.packbits(mask[:, perm], axis=1, bitorder="little")})
            out.files[key] = str(path)


def permute_block(ir: ModelIR, b: FFNBlock, perm: np.ndarray, spill: Path | None = None) -> list[str]:
    """Apply ``perm`` (new position -> old neuron) to every per-neuron tensor of block
    ``b`` in place in ``ir``'s store; returns the names of the tensors it permuted. With
    ``spill``, the FFN weights go to that file instead of memory (encoded rows stay encoded)."""
    done = []
    weights: dict[str, np.ndarray] = {}
    encodings: dict[str, tuple[str, bool]] = {}

    def apply(name: str | None, axis: int) -> None:
        if name and name in ir.store:
            ir.store.set(name, np.take(ir.store.get(name), perm, axis=axis))
            done.append(name)

    def apply_weight(name: str | None, axis: int) -> None:
        if not name or name not in ir.store:
            return
        if spill is None:
            return apply(name, axis)
        enc = ir.store.encoded(name)
        if enc is not None and (axis == 1) == enc[2]:  # neurons are the encoded rows
            weights[name] = np.asarray(enc[0])[perm]
            encodings[name] = (enc[1], enc[2])
        else:
            weights[name] = np.ascontiguousarray(np.take(ir.store.get(name), perm, axis=axis))
        done.append(name)

    apply_weight(b.gate, 0)
    apply_weight(b.up, 0)
    for name in (b.gate_bias, b.up_bias):
        apply(name, 0)
    apply_weight(b.down, 1)
    if weights:
        assert spill is not None
        ir.store.spill(spill, weights, encodings)
        weights.clear()
    pred = (b.annotations.get("predictor") or {}).get("tensors") or {}
    apply(pred.get("w2"), 0)
    apply(pred.get("b2"), 0)
    prof = b.annotations["profile"]["tensors"]
    for what in PER_NEURON_PROFILE:
        apply(prof.get(what), 0)
    counts = ir.store.get(prof["count_active"])
    ir.store.set(prof["rank"], np.lexsort((np.arange(len(counts)), -counts)).astype(np.int32))
    return done


def _placement(ir: ModelIR, b: FFNBlock) -> dict[str, Any]:
    counts = np.asarray(ir.store.get(b.annotations["profile"]["tensors"]["count_active"]), dtype=np.float64)
    total = max(counts.sum(), 1.0)
    n = len(counts)
    return {"top10pct_share": float(counts[: max(1, n // 10)].sum() / total),
            "top25pct_share": float(counts[: max(1, n // 4)].sum() / total)}
