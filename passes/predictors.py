"""``predictors``: train per-layer activation predictors (Deja Vu / PowerInfer style).

For each FFN block a low-rank MLP ``d -> r -> n`` (``toolchain.predictor``) learns from
the profile pass's (FFN input, activation mask) samples which neurons fire; its
threshold is calibrated on a held-out split (whole calibration sequences) for the
``recall`` target. Ranks are tried in ascending order and the smallest whose held-out
predicted density is ``<= density_factor x`` the true density wins. Predictors must fit
the size ``budget`` (a fraction of all FFN parameters, summed over layers; when they do
not, the predictors saving the least compute per parameter are dropped first); layers
that meet no rank, or do not fit, fall back.

Per-layer modes (``block.annotations["predictor"]["mode"]``):

* ``predictor``: tensors ``sparseforge.predictor.{L}.w1`` [r, d] and ``.w2`` [n, r]
  float32 (``.b1`` [r], ``.b2`` [n] with ``bias``); a neuron is predicted active when
  its logit is ``>= threshold``;
* ``gate-first``: gated FFNs with a ReLU gate (dReLU): the runtime computes
  ``ReLU(x Wg^T)`` first and then only the up/down rows where it is positive (exact);
  chosen for dReLU blocks when ``gate_first`` is ``auto`` (or for every block with
  ``always``), and the fallback of such blocks;
* ``dense``: no prediction (the fallback of other blocks, and of every block with
  ``gate_first="never"``).

The annotation also holds rank, threshold, held-out recall, precision, predicted and
true density, parameters, FLOPs fraction and seconds. Layers train in parallel through
an executor (``toolchain.executors``); the result depends only on the seed, not on the
number of workers. The pass then runs the model with the predicted masks applied on
held-out sequences (``toolchain.masked_eval``) and reports its quality against the
unmasked model. Attaches ``predictors/predictors.json`` and ``predictors/predictors.png``.
Changes no weight (the ONNX graph stays valid).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sparseforge.toolchain.errors import PassError
from sparseforge.toolchain.executors import executor_names, make_executor, map_in_order, result_options
from sparseforge.toolchain.ir import ANNOTATION_PREFIX, FFNBlock, ModelIR
from sparseforge.toolchain.pass_base import Pass, PassContext, PassResult, register_pass
from sparseforge.toolchain.predictor import (LayerSearch, LayerTask, TrainConfig, mask_metrics, predictor_flops,
                                             predictor_params, search_rank, split_rows)
from sparseforge.toolchain.reference.ffn import apply_activation
from sparseforge.toolchain.safetensors_io import SafetensorsFile
from sparseforge.toolchain.samples import read_shards

GateFirst = Literal["auto", "never", "always"]
MODES = ("predictor", "gate-first", "dense")


@dataclass(frozen=True)
class PredictorsOptions:
    """``recall`` target in (0, 1]; ``ranks`` to try (ascending; clipped to < d_model);
    a rank is accepted when its predicted density is <= ``density_factor`` x the true
    density; ``budget``: all predictors together <= this fraction of the FFN parameters;
    training: ``max_epochs``, ``patience`` (early stopping on the held-out loss), ``lr``,
    ``weight_decay`` (AdamW), ``batch_size``, ``heldout_fraction`` (of the calibration
    sequences), ``max_pos_weight`` (cap of the positive-class weight), ``bias``;
    ``workers`` (0: one per core) of the ``executor``; ``gate_first``: ``auto`` (dReLU
    blocks), ``never``, ``always`` (every block; all must have a ReLU gate);
    ``eval_sequences`` held-out sequences for the masked-quality check (0: all, -1: skip)."""

    recall: float = 0.99
    ranks: tuple[int, ...] = (32, 64, 128, 256)
    density_factor: float = 1.5
    budget: float = 0.10
    max_epochs: int = 40
    patience: int = 4
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    heldout_fraction: float = 0.2
    max_pos_weight: float = 20.0
    bias: bool = False
    workers: int = 0
    executor: str = "local"
    gate_first: GateFirst = "auto"
    eval_sequences: int = 64


def tensor_name(layer: int, what: str) -> str:
    return f"{ANNOTATION_PREFIX}predictor.{layer}.{what}"


def gate_first_exact(block: FFNBlock) -> bool:
    """Whether computing the gate first finds every active neuron: a gated block whose
    gate activation is zero wherever it is not positive (ReLU, FATReLU)."""
    return bool(block.gate) and block.activation in ("relu", "fatrelu")


def is_drelu(block: FFNBlock) -> bool:
    return gate_first_exact(block) and block.up_activation == "relu"


def ffn_params(ir: ModelIR, block: FFNBlock) -> int:
    return int(sum(int(np.prod(ir.store.shape(n))) for n in block.weight_names()))


def ffn_flops(ir: ModelIR, block: FFNBlock) -> int:
    """Multiply-add FLOPs (2 per MAC) of one token through the dense FFN block."""
    d, n = ir.spec.hidden_size, ir.spec.intermediate_size
    return 2 * d * n * (3 if block.gate else 2)


@register_pass
class Predictors(Pass):
    name = "predictors"
    summary = "per-layer activation predictors (low-rank MLPs) or gate-first; recall-calibrated thresholds"
    Options = PredictorsOptions

    # -- checks ----------------------------------------------------------------------
    def check_options(self) -> None:
        o = self.options
        if not 0.0 < o.recall <= 1.0:
            raise PassError(f"predictors: recall must be in (0, 1], got {o.recall}")
        if not o.ranks or any(r < 1 for r in o.ranks):
            raise PassError(f"predictors: ranks must be a non-empty list of ranks >= 1, got {list(o.ranks)}")
        self.require_positive("density_factor", "budget", "lr")
        self.require_at_least(max_epochs=1, patience=1, batch_size=1, weight_decay=0)
        if not 0.0 < o.heldout_fraction < 1.0:
            raise PassError(f"predictors: heldout_fraction must be in (0, 1), got {o.heldout_fraction}")
        if o.max_pos_weight < 1:
            raise PassError(f"predictors: max_pos_weight must be >= 1, got {o.max_pos_weight}")
        if o.workers < 0:
            raise PassError(f"predictors: workers must be >= 0 (0: one per core), got {o.workers}")
        if o.executor not in executor_names():
            raise PassError(f"predictors: unknown executor {o.executor!r} (known: {', '.join(executor_names())})")
        if o.gate_first not in ("auto", "never", "always"):
            raise PassError(f"predictors: gate_first must be auto, never or always, got {o.gate_first!r}")

    def requires(self, ir: ModelIR) -> None:
        for b in ir.blocks:
            shards = (b.annotations.get("profile") or {}).get("sample_shards") or []
            if not shards or any(k not in ir.files for k in shards):
                raise PassError(f"predictors needs the (FFN input, activation mask) samples of the profile pass, "
                                f"and layer {b.layer} has none: run the profile pass first")
        if self.options.gate_first == "always":
            bad = [b.layer for b in ir.blocks if not gate_first_exact(b)]
            if bad:
                raise PassError(f"predictors: gate_first='always' needs gated FFNs with a ReLU gate (relufy mode "
                                f"drelu), but layer {bad[0]} of {ir.spec.architecture} "
                                f"{'is not gated' if not ir.blocks[bad[0]].gate else 'has a ' + ir.blocks[bad[0]].activation + ' gate'}")

    def ensures(self, ir: ModelIR) -> None:
        for b in ir.blocks:
            ann = b.annotations.get("predictor")
            assert ann is not None and ann["mode"] in MODES, f"layer {b.layer}: no predictor annotation"
            if ann["mode"] == "predictor":
                assert ir.store.shape(ann["tensors"]["w1"]) == (ann["rank"], ir.spec.hidden_size)
                assert ir.store.shape(ann["tensors"]["w2"]) == (ir.spec.intermediate_size, ann["rank"])

    # -- the pass ----------------------------------------------------------------------
    def train_config(self) -> TrainConfig:
        o = self.options
        return TrainConfig(recall=o.recall, heldout_fraction=o.heldout_fraction, lr=o.lr,
                           weight_decay=o.weight_decay, batch_size=o.batch_size, max_epochs=o.max_epochs,
                           patience=o.patience, max_pos_weight=o.max_pos_weight, bias=o.bias)

    def candidate_ranks(self, ir: ModelIR) -> list[int]:
        d = ir.spec.hidden_size
        return sorted({min(r, d - 1) for r in self.options.ranks if min(r, d - 1) >= 1})

    def run(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        o = self.options
        t0 = time.perf_counter()
        out = ir.evolve()
        out.drop_outputs(tensors="predictor", files="predictors", annotation="predictor")
        d, n = ir.spec.hidden_size, ir.spec.intermediate_size
        config = self.train_config()
        total_ffn = sum(ffn_params(ir, b) for b in ir.blocks)
        budget = o.budget * total_ffn
        ranks = [r for r in self.candidate_ranks(ir) if predictor_params(d, r, n, o.bias) <= budget]
        gate_first = {b.layer for b in ir.blocks
                      if o.gate_first == "always" or (o.gate_first == "auto" and is_drelu(b))}
        groups = {b.layer: sample_sequence_ids(ir, b) for b in ir.blocks}
        tasks = [LayerTask(layer=b.layer, shards=sample_shards(ir, b), n_ff=n, ranks=ranks,
                           density_factor=o.density_factor, config=config, seed=ctx.seed, groups=groups[b.layer])
                 for b in ir.blocks if b.layer not in gate_first and ranks]
        searches = {s.layer: s for s in map_in_order(make_executor(o.executor, o.workers), search_rank, tasks)}
        chosen = {layer: s.chosen for layer, s in searches.items() if s.chosen is not None}
        over_budget = _fit_budget(chosen, budget, {b.layer: ffn_flops(ir, b) for b in ir.blocks})

        layers = []
        for b in out.blocks:
            s = searches.get(b.layer)
            if b.layer in gate_first:
                row = self._gate_first(ir, b, groups[b.layer], ctx.seed, reason=f"gate_first={o.gate_first}")
            elif b.layer in chosen:
                row = self._store_predictor(out, b, s)
            else:
                if not ranks:
                    reason = f"no rank of {list(o.ranks)} fits the budget ({o.budget:g} of FFN parameters)"
                elif b.layer in over_budget:
                    reason = f"over budget: rank {over_budget[b.layer]} did not fit {o.budget:g} of FFN parameters"
                else:
                    reason = (f"no rank of {ranks} reached recall {o.recall:g} at density <= "
                              f"{o.density_factor:g} x true density")
                if gate_first_exact(b) and o.gate_first != "never":
                    row = self._gate_first(ir, b, groups[b.layer], ctx.seed, reason=reason)
                else:
                    row = self._dense(b, s, reason)
            row["flops_fraction"] = (predictor_flops(d, row["rank"], n) if row["mode"] == "predictor" else 0) \
                / ffn_flops(ir, b)
            row["attempts"] = s.attempts if s is not None else []
            b.annotations["predictor"] = {k: v for k, v in row.items() if k != "attempts"}
            layers.append({"layer": b.layer, **row})

        masked = self._masked_eval(out, ir)
        summary = _summary(layers, total_ffn, sum(ffn_flops(ir, b) for b in ir.blocks), masked,
                           time.perf_counter() - t0, d, n)
        report = {"model": ir.spec.architecture, "options": result_options(self.options_dict()),
                  "summary": summary, "layers": layers, "masked": masked}
        self._attach(out, report, ctx.work_dir)
        return PassResult(out, summary, modified=True)

    # -- per-layer rows ------------------------------------------------------------------
    def _store_predictor(self, out: ModelIR, b: FFNBlock, s: LayerSearch) -> dict[str, Any]:
        r = s.chosen
        assert r is not None
        names = {}
        for what, arr in r.weights.tensors().items():
            out.store.set(tensor_name(b.layer, what), np.ascontiguousarray(arr, dtype=np.float32))
            names[what] = tensor_name(b.layer, what)
        m = r.metrics
        return {"mode": "predictor", "rank": r.weights.rank, "threshold": r.threshold, "recall": m.recall,
                "precision": m.precision, "density": m.density, "true_density": m.true_density,
                "params": r.weights.params, "seconds": s.seconds, "tensors": names, "reason": None,
                "samples": s.samples, "heldout_samples": s.heldout_samples}

    def _gate_first(self, ir: ModelIR, b: FFNBlock, groups: np.ndarray | None, seed: int,
                    reason: str) -> dict[str, Any]:
        """Held-out figures of gate-first: the rows it computes (gate activation non-zero)
        against the truly active ones."""
        t0 = time.perf_counter()
        x, active, _ = read_shards(sample_shards(ir, b), ir.spec.intermediate_size)
        _, held = split_rows(len(x), self.options.heldout_fraction, seed, groups)
        z = x[held] @ ir.store.get_f32(b.gate).T
        if b.gate_bias:
            z += ir.store.get_f32(b.gate_bias)
        m = mask_metrics(apply_activation(b, z) != 0, active[held])
        return {"mode": "gate-first", "rank": 0, "threshold": None, "recall": m.recall, "precision": m.precision,
                "density": m.density, "true_density": m.true_density, "params": 0,
                "seconds": time.perf_counter() - t0, "tensors": {}, "reason": reason,
                "samples": len(x), "heldout_samples": len(held)}

    def _dense(self, b: FFNBlock, s: LayerSearch | None, reason: str) -> dict[str, Any]:
        true = s.true_density if s is not None else None
        return {"mode": "dense", "rank": 0, "threshold": None, "recall": 1.0, "precision": true,
                "density": 1.0, "true_density": true, "params": 0, "seconds": s.seconds if s else 0.0,
                "tensors": {}, "reason": reason, "samples": s.samples if s else 0,
                "heldout_samples": s.heldout_samples if s else 0}

    # -- masked quality and report ----------------------------------------------------------
    def _masked_eval(self, out: ModelIR, ir: ModelIR) -> dict[str, Any] | None:
        o = self.options
        if o.eval_sequences < 0 or "calibration/heldout.safetensors" not in ir.files:
            return None
        if not any(b.annotations["predictor"]["mode"] == "predictor" for b in out.blocks):
            return {"exact": True}  # gate-first and dense layers compute the model exactly
        from sparseforge.toolchain.masked_eval import evaluation_sequences, masked_quality

        eps = float(ir.blocks[0].annotations["profile"].get("eps", 0.0))
        seqs = evaluation_sequences(ir, o.eval_sequences)
        result = masked_quality(out, seqs, eps=eps)
        return {"exact": False, "sequences": len(seqs), **result}

    def _attach(self, out: ModelIR, report: dict[str, Any], work: Path) -> None:
        folder = work / "predictors"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "predictors.json").write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
        plot_predictors(folder / "predictors.png", report["layers"], self.options.recall, self.options.density_factor,
                        f"{out.spec.architecture}: activation predictors (held-out)")
        for name in ("predictors.json", "predictors.png"):
            out.files[f"predictors/{name}"] = str(folder / name)


def sample_shards(ir: ModelIR, b: FFNBlock) -> list[str]:
    """The profile pass's (FFN input, activation mask) sample files of block ``b``."""
    return [ir.files[k] for k in b.annotations["profile"]["sample_shards"]]


def sample_sequence_ids(ir: ModelIR, b: FFNBlock) -> np.ndarray | None:
    """The calibration sequence of each sample (from its token index and the calibration
    split's lengths), or None when the split is not attached."""
    path = ir.files.get("calibration/train.safetensors")
    if path is None:
        return None
    ends = np.cumsum(np.asarray(SafetensorsFile(path).get("lengths"), dtype=np.int64))
    tokens = np.concatenate([np.asarray(SafetensorsFile(p).get("token")) for p in sample_shards(ir, b)])
    return np.searchsorted(ends, tokens, side="right")


def _fit_budget(chosen: dict[int, Any], budget: float, dense_flops: dict[int, int]) -> dict[int, int]:
    """Drop predictors until the rest fit ``budget`` parameters, the one that saves the
    least FFN compute per parameter first (saving = 1 - predicted density - predictor
    FLOPs / dense FFN FLOPs; ties: the later layer); returns {layer: rank} of the dropped."""
    def efficiency(layer: int) -> tuple[float, int]:
        r = chosen[layer]
        d, rank, n = r.weights.w1.shape[1], r.weights.rank, r.weights.w2.shape[0]
        saving = 1.0 - r.metrics.density - predictor_flops(d, rank, n) / dense_flops[layer]
        return saving / max(r.weights.params, 1), -layer

    dropped = {}
    while chosen and sum(r.weights.params for r in chosen.values()) > budget:
        layer = min(chosen, key=efficiency)
        dropped[layer] = chosen.pop(layer).weights.rank
    return dropped




def _summary(layers: list[dict[str, Any]], ffn_params_total: int, ffn_flops_total: int,
             masked: dict[str, Any] | None, seconds: float, d: int, n: int) -> dict[str, Any]:
    pred = [row for row in layers if row["mode"] == "predictor"]
    params = sum(row["params"] for row in layers)
    flops = sum(predictor_flops(d, row["rank"], n) for row in pred)
    out: dict[str, Any] = {
        "layers_predictor": len(pred),
        "layers_gate_first": sum(row["mode"] == "gate-first" for row in layers),
        "layers_dense": sum(row["mode"] == "dense" for row in layers),
        "predictor_params": params,
        "params_fraction": params / max(ffn_params_total, 1),
        "flops_fraction": flops / max(ffn_flops_total, 1),
        "min_recall": min((row["recall"] for row in pred), default=None),
        "seconds": seconds,
        "per_layer_mode": [row["mode"] for row in layers],
        "per_layer_rank": [row["rank"] for row in layers],
        "per_layer_recall": [row["recall"] for row in layers],
        "per_layer_density": [row["density"] for row in layers],
        "per_layer_true_density": [row["true_density"] for row in layers],
    }
    if masked and not masked.get("exact"):
        for key in ("mean_cosine", "min_cosine", "perplexity_ratio", "perplexity", "perplexity_reference"):
            if key in masked:
                out[f"masked_{key}"] = masked[key]
        out["masked_mean_sparsity"] = masked["mean_sparsity"]
    elif masked:
        out["masked_exact"] = True
    return out


def plot_predictors(path: Path, layers: list[dict[str, Any]], recall: float, factor: float, title: str) -> None:
    """Two panels per layer: held-out recall (with the target), and true vs predicted
    density (with the ``factor`` x true bound); bars labelled by mode."""
    from sparseforge.toolchain.plots import _PNG_META, _pyplot

    plt = _pyplot()
    idx = np.arange(len(layers))
    rec = [row["recall"] for row in layers]
    true = [row["true_density"] or 0.0 for row in layers]
    dens = [row["density"] for row in layers]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), dpi=100, sharex=True)
    ax1.plot(idx, rec, marker="o", label="held-out recall")
    ax1.axhline(recall, color="grey", ls="--", lw=1, label=f"target {recall:g}")
    ax1.set_ylabel("recall")
    ax1.set_ylim(min(min(rec, default=recall), recall) - 0.01, 1.002)
    ax1.legend(loc="lower right", fontsize=8)
    ax1.set_title(title)
    ax2.bar(idx - 0.2, true, width=0.4, label="true density")
    ax2.bar(idx + 0.2, dens, width=0.4, label="predicted density (computed rows)")
    ax2.scatter(idx + 0.2, [factor * t for t in true], marker="_", s=250, color="black", zorder=3,
                label=f"{factor:g} x true")
    for i, row in enumerate(layers):
        label = f"r{row['rank']}" if row["mode"] == "predictor" else row["mode"]
        ax2.annotate(label, (i + 0.2, dens[i]), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("fraction of neurons")
    ax2.set_ylim(0, 1.1)
    ax2.set_xticks(idx)
    ax2.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, metadata=_PNG_META)
    plt.close(fig)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
