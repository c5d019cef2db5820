"""``relufy``: make FFN activations sparse on purpose, then measure what it cost.

Changes each FFN block's activation by ``mode`` (per model, overridable per layer):

* ``relu``: the activation becomes ReLU (GELU/SiLU FFNs; ReLU strikes back);
* ``drelu``: gated FFNs only: ReLU on both gate and up (TurboSparse's dReLU);
* ``fatrelu``: ``relu``/``drelu`` plus a per-layer threshold: activations <= t become 0,
  t calibrated after training to reach ``target_sparsity`` (ProSparse ends with it);
* ``threshold``: training-free: the model's own activation, zeroed where
  |h| <= t, t per layer from the profile histograms for ``target_sparsity`` (CATS/TEAL).

``auto`` picks ``drelu`` for gated FFNs and ``relu`` otherwise. Optionally
(``mean_correction``) the down projection's bias absorbs ``W_down · E[h_old - h_new]``
measured on the profile samples (a bias is added where there was none), and with
``steps`` > 0 the model is fine-tuned by distillation to the original
(``toolchain.finetune``), resumable from checkpoints.

Requires a profiled IR (calibration split, histograms, samples). The stale profile
statistics are dropped (profile again for predictors). Attaches ``relufy/relufy.json``
(quality before/after, per-layer sparsity, thresholds, training, the sweep),
``relufy/sparsity.png`` and ``relufy/sweep.png``. The IR's ONNX graph is cleared:
graphs are rebuilt from the IR.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sparseforge.toolchain.activation_stats import threshold_for_sparsity
from sparseforge.toolchain.calibration import Sequences, calibration_split
from sparseforge.toolchain.errors import PassError
from sparseforge.toolchain.ir import FFNBlock, ModelIR
from sparseforge.toolchain.pass_base import Pass, PassContext, PassResult, register_pass
from sparseforge.toolchain.plots import plot_before_after, plot_tradeoff
from sparseforge.toolchain.quality import ModelRun, compare, run_model
from sparseforge.toolchain.reference.ffn import ffn_forward
from sparseforge.toolchain.samples import read_shards

Mode = Literal["auto", "relu", "drelu", "fatrelu", "threshold"]
MODES = ("relu", "drelu", "fatrelu", "threshold")
TRAINABLE = ("relu", "drelu", "fatrelu")


@dataclass(frozen=True)
class RelufyOptions:
    """``mode`` for every layer, ``layer_modes`` overrides ({"3": "threshold"});
    ``target_sparsity`` for ``threshold`` and ``fatrelu`` layers, ``layer_sparsity``
    overrides ({"5": 0.8}: spend sparsity where it costs least); ``mean_correction``;
    ``local_steps`` / ``local_lr``: layer-local fitting of each new FFN to the original
    FFN's outputs (``toolchain.local_distill``), ``local_sequential``: layer after layer on
    the student's own FFN inputs over ``local_sequences`` calibration sequences (each
    layer also repairs the error reaching it), else on the profile samples; end-to-end
    fine-tuning: ``steps`` (0: none), ``lr``, ``batch_size``, ``warmup_steps``,
    ``weight_decay``, ``l1`` (max weight of the L1 penalty on activations), ``l1_warmup``
    (fraction of steps over which it rises), ``lm_weight`` (decoders), ``hidden_weight``
    (encoders), ``checkpoint_every``, ``train_ffn_only``, ``threads`` (0: all cores);
    evaluation: ``eval_sequences`` held-out sequences (0: all), ``sweep`` target
    sparsities of the sparsity-quality curve."""

    mode: Mode = "auto"
    layer_modes: dict[str, str] = field(default_factory=dict)
    target_sparsity: float = 0.9
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    mean_correction: bool = False
    local_steps: int = 0
    local_lr: float = 1e-3
    local_sequential: bool = True
    local_sequences: int = 128
    steps: int = 0
    lr: float = 2e-4
    batch_size: int = 16
    warmup_steps: int = 20
    weight_decay: float = 0.0
    l1: float = 0.0
    l1_warmup: float = 0.5
    lm_weight: float = 0.0
    hidden_weight: float = 0.0
    checkpoint_every: int = 50
    train_ffn_only: bool = False
    threads: int = 0
    eval_sequences: int = 64
    sweep: tuple[float, ...] = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95)


@register_pass
class Relufy(Pass):
    name = "relufy"
    summary = "ReLU-ify FFNs (relu / drelu / fatrelu / threshold), optional distillation; quality report"
    Options = RelufyOptions
    quiet_defaults = ("layer_sparsity",)

    # -- checks ----------------------------------------------------------------------
    def layer_modes(self, ir: ModelIR) -> dict[int, str]:
        o = self.options
        modes = {}
        for b in ir.blocks:
            mode = o.layer_modes.get(str(b.layer), o.mode)
            if mode == "auto":
                mode = "drelu" if b.gate else "relu"
            if mode not in MODES:
                raise PassError(f"relufy: unknown mode {mode!r} for layer {b.layer} (modes: auto, {', '.join(MODES)})")
            if mode == "drelu" and not b.gate:
                raise PassError(f"relufy: mode 'drelu' needs a gated FFN, but layer {b.layer} of "
                                f"{ir.spec.architecture} has none (use 'relu')")
            modes[b.layer] = mode
        return modes

    def check_options(self) -> None:
        o = self.options
        bad = sorted(m for m in o.layer_modes.values() if m not in MODES and m != "auto")
        if bad:
            raise PassError(f"relufy: unknown mode {bad[0]!r} in layer_modes (modes: auto, {', '.join(MODES)})")
        if not 0.0 < o.target_sparsity < 1.0:
            raise PassError(f"relufy: target_sparsity must be in (0, 1), got {o.target_sparsity}")
        bad_sparsity = sorted(k for k, v in o.layer_sparsity.items() if not 0.0 < v < 1.0)
        if bad_sparsity:
            raise PassError(f"relufy: layer_sparsity for layer {bad_sparsity[0]} must be in (0, 1), "
                            f"got {o.layer_sparsity[bad_sparsity[0]]}")
        if any(not 0.0 < s < 1.0 for s in o.sweep):
            raise PassError("relufy: sweep sparsities must be in (0, 1)")
        self.require_at_least(steps=0, batch_size=1, local_steps=0, local_sequences=1, warmup_steps=0,
                              weight_decay=0, l1=0, l1_warmup=0, lm_weight=0, hidden_weight=0, checkpoint_every=1,
                              threads=0, eval_sequences=0)
        self.require_positive("lr", "local_lr")

    def layer_targets(self, ir: ModelIR) -> dict[int, float]:
        """Target sparsity per layer: ``layer_sparsity`` overrides, else ``target_sparsity``."""
        o = self.options
        return {b.layer: float(o.layer_sparsity.get(str(b.layer), o.target_sparsity)) for b in ir.blocks}

    def check_model(self, ir: ModelIR) -> None:
        layers = {str(b.layer) for b in ir.blocks}
        for key in ("layer_modes", "layer_sparsity"):
            unknown = sorted(set(getattr(self.options, key)) - layers)
            if unknown:
                raise PassError(f"relufy: {key} names layers {unknown} the model does not have")
        self.layer_modes(ir)

    def requires(self, ir: ModelIR) -> None:
        if not all("profile" in b.annotations for b in ir.blocks) or "calibration/train.safetensors" not in ir.files:
            raise PassError("relufy needs a profiled model: run the 'profile' pass first")

    # -- the pass ----------------------------------------------------------------------
    def run(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        o = self.options
        modes, targets = self.layer_modes(ir), self.layer_targets(ir)
        train, heldout = calibration_split(ir, "train"), calibration_split(ir, "heldout")
        evalset = (heldout if len(heldout) else train).head(o.eval_sequences)
        student = ir.evolve()
        hists = {b.layer: ir.store.get(b.annotations["profile"]["tensors"]["hist"]) for b in ir.blocks}
        student.drop_outputs(tensors="profile", files="profile", annotation="profile")  # describe the old activations
        student.graph = None
        for b in student.blocks:
            _apply_mode(b, modes[b.layer], threshold_for_sparsity(hists[b.layer], targets[b.layer]))
        trainable = [b.layer for b in student.blocks if modes[b.layer] in TRAINABLE]
        if o.mean_correction:
            _mean_correction(ir, student, trainable)
        local = _local_fit(ir, student, trainable, modes, targets, o, ctx, train.head(o.local_sequences)) \
            if o.local_steps > 0 else []
        threads = o.threads or None
        reference = run_model(ir, evalset, threads=threads)
        untrained = compare(reference, run_model(student, evalset, threads=threads))
        training: dict[str, Any] = {}
        if o.steps > 0 and any(m in TRAINABLE for m in modes.values()):
            student, training = self._finetune(student, ir, train, ctx)
        fat = [b for b in student.blocks if modes[b.layer] == "fatrelu"]
        if fat:  # calibrated on the activations before any threshold
            unthresholded = student.evolve()
            for b in unthresholded.blocks:
                if modes[b.layer] == "fatrelu":
                    b.output_threshold = 0.0
            calib_run = run_model(unthresholded, train.head(o.eval_sequences), threads=threads)
            for b in fat:
                b.output_threshold = threshold_for_sparsity(calib_run.stats[b.layer].hist, targets[b.layer])
        final_run = run_model(student, evalset, threads=threads)
        result = compare(reference, final_run)
        sweep = self._sweep(student, train, evalset, reference, threads)
        report = {
            "model": ir.spec.architecture, "modes": {str(k): v for k, v in modes.items()},
            "options": self.options_dict(), "eval_sequences": len(evalset),
            "before": {"sparsity": reference.sparsity, "mean_sparsity": float(np.mean(reference.sparsity))},
            "untrained": untrained, "after": result, "local_fit": local, "training": training,
            "thresholds": {str(b.layer): b.output_threshold for b in student.blocks},
            "sweep": sweep,
        }
        for b in student.blocks:
            b.annotations["relufy"] = {"mode": modes[b.layer], "sparsity": final_run.stats[b.layer].sparsity}
        self._attach(student, report, ctx.work_dir)
        return PassResult(student, _summary(report), modified=True)

    def _finetune(self, student: ModelIR, teacher: ModelIR, train: Sequences,
                  ctx: PassContext) -> tuple[ModelIR, dict[str, Any]]:
        from sparseforge.toolchain.finetune import FinetuneOptions, distill

        o = self.options
        fo = FinetuneOptions(
            steps=o.steps, lr=o.lr, batch_size=o.batch_size, warmup_steps=o.warmup_steps,
            weight_decay=o.weight_decay, l1=o.l1, l1_warmup=o.l1_warmup, lm_weight=o.lm_weight,
            hidden_weight=o.hidden_weight, checkpoint_every=o.checkpoint_every, threads=o.threads,
            train_ffn_only=o.train_ffn_only)
        return distill(student, teacher, train, fo, seed=ctx.seed, state_dir=ctx.state_dir, progress=ctx.progress)

    def _sweep(self, student: ModelIR, train: Sequences, evalset: Sequences, reference: ModelRun,
               threads: int | None) -> list[dict[str, Any]]:
        """Quality at each ``sweep`` sparsity: per-layer magnitude thresholds calibrated on
        the calibration split, measured on the evaluation split."""
        calib = run_model(student, train.head(self.options.eval_sequences), threads=threads)
        points = []
        for target in self.options.sweep:
            variant = student.evolve()
            for b in variant.blocks:
                b.output_threshold = max(b.output_threshold,
                                         threshold_for_sparsity(calib.stats[b.layer].hist, target))
            points.append({"target": target, **compare(reference, run_model(variant, evalset, threads=threads))})
        return points

    def _attach(self, out: ModelIR, report: dict[str, Any], work: Path) -> None:
        folder = work / "relufy"
        folder.mkdir(parents=True, exist_ok=True)
        stable = json.loads(json.dumps(report))
        stable["training"].pop("seconds", None)  # wall time differs between runs
        (folder / "relufy.json").write_text(json.dumps(stable, indent=1) + "\n")
        plot_before_after(folder / "sparsity.png", report["before"]["sparsity"], report["after"]["sparsity"],
                          f"{out.spec.architecture}: FFN sparsity on held-out text")
        causal = out.spec.causal
        key = "perplexity_ratio" if causal else "mean_cosine"
        label = "perplexity / original" if causal else "mean embedding cosine to original"
        plot_tradeoff(folder / "sweep.png", [p["mean_sparsity"] for p in report["sweep"]],
                      [p[key] for p in report["sweep"]], label, "sparsity vs quality (threshold sweep)")
        for name in ("relufy.json", "sparsity.png", "sweep.png"):
            out.files[f"relufy/{name}"] = str(folder / name)


def _apply_mode(block: FFNBlock, mode: str, threshold: float) -> None:
    if mode in TRAINABLE:
        block.activation = "relu"
        if mode in ("drelu", "fatrelu") and block.gate:
            block.up_activation = "relu"
    elif mode == "threshold":
        block.output_threshold = threshold


def _mean_correction(original: ModelIR, student: ModelIR, layers: list[int], chunk: int = 1024) -> None:
    """Add ``W_down · E[h_original - h_student]`` over the profile samples to the down bias."""
    for layer in layers:
        old, new = original.blocks[layer], student.blocks[layer]
        shards = [original.files[k] for k in old.annotations["profile"]["sample_shards"]]
        x, _, _ = read_shards(shards, original.spec.intermediate_size)
        delta = np.zeros(original.spec.intermediate_size, np.float64)
        for i in range(0, len(x), chunk):
            h_old = _activation(original, old, x[i : i + chunk])
            delta += (h_old.astype(np.float64) - _activation(student, new, x[i : i + chunk])).sum(0)
        delta /= max(len(x), 1)
        shift = (student.store.get_f32(new.down).astype(np.float64) @ delta).astype(np.float32)
        if new.down_bias is None:
            new.down_bias = new.down.removesuffix(".weight") + ".bias"
            student.store.set(new.down_bias, shift)
        else:
            student.store.set(new.down_bias, student.store.get_f32(new.down_bias) + shift)


def _local_fit(original: ModelIR, student: ModelIR, layers: list[int], modes: dict[int, str],
               sparsity: dict[int, float], o: RelufyOptions, ctx: PassContext,
               seqs: Sequences) -> list[dict[str, Any]]:
    """Fit each listed layer's new FFN to the original FFN, sequentially on ``seqs`` or on
    the profile samples (``fatrelu`` layers with their threshold in the loop)."""
    from sparseforge.toolchain.local_distill import fit_ffn, fit_sequential

    targets = {layer: sparsity[layer] if modes[layer] == "fatrelu" else None for layer in layers}
    if o.local_sequential:
        return fit_sequential(original, student, layers, seqs, steps=o.local_steps, lr=o.local_lr, batch_size=256,
                              l1=o.l1, seed=ctx.seed, target_sparsity=targets, show_progress=ctx.progress)
    stats = []
    for layer in layers:
        shards = [original.files[k] for k in original.blocks[layer].annotations["profile"]["sample_shards"]]
        x, _, _ = read_shards(shards, original.spec.intermediate_size)
        stats.append(fit_ffn(original, student, layer, x, steps=o.local_steps, lr=o.local_lr,
                             batch_size=256, l1=o.l1, seed=ctx.seed, target_sparsity=targets[layer]))
    return stats


def _activation(ir: ModelIR, block: FFNBlock, x: np.ndarray) -> np.ndarray:
    """The activation h [tokens, n_ff] feeding ``block``'s down projection for inputs x."""
    seen: list[np.ndarray] = []
    ffn_forward(ir.store, block, x, capture=lambda _layer, _x, h: seen.append(h))
    return seen[0]


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    after, untrained = report["after"], report["untrained"]
    out = {"mean_sparsity_before": report["before"]["mean_sparsity"], "mean_sparsity": after["mean_sparsity"]}
    for key in ("mean_cosine", "min_cosine", "perplexity_reference", "perplexity", "perplexity_ratio"):
        if key in after:
            out[key] = after[key]
            out[f"untrained_{key}"] = untrained[key]
    out["training_steps"] = report["training"].get("steps", 0)
    out["per_layer_sparsity"] = after["sparsity"]
    return out
