"""Activation predictors on relufied models: held-out recall, density, size and the
end-to-end quality with predicted masks applied.

For each relufy variant the pipeline ``profile -> relufy(variant) -> profile ->
predictors`` runs through the PassManager (cached in ``--cache-dir``); relufy uses the
default recipe's recovery (mean correction, ``--local-steps`` of layer-local fitting)
unless told otherwise. Reported per
variant: the relufy quality (dense relufied model vs the original), per layer the mode
(predictor / gate-first / dense), rank, held-out recall, precision, predicted vs true
density, parameters, FLOPs fraction and training time, the predictors' total FLOPs
fraction of the dense FFN, and the masked model's quality on held-out sequences
(numpy reference executors, neurons predicted inactive skipped) against the relufied
dense model and against the original. Acceptance (issue 5): recall >= target and
predicted density <= factor x true in every layer, predictor FLOPs <= budget of the
FFN FLOPs, masked quality within the relufy bound (cosine >= 0.98 / perplexity within
5% of the original). With ``--linear-reference`` (default) each predictor or dense layer
also gets the held-out density at the recall target of the least-squares linear map of
each candidate rank and of the largest rank within the FLOPs budget
(``toolchain.linear_reference``): where that is far above the density bound, the layer
is hard to predict at that cost, whatever the training; and the same map's density
ratio if the layer's activity were cut at other densities (``--sparsity-sweep``, a
threshold on the pre-activation): how the ratio the budget affords grows as the layer
gets sparser. Writes JSON.

    python benchmarks/predictor_quality.py [--model DIR] [--variants relu,threshold]
        [--steps N] [--smoke] [--out FILE]

Variants: ``relu``, ``drelu`` (gated models), ``fatrelu``, ``threshold`` (relufy
modes; ``--target-sparsity`` for the last two), ``<mode>+ft`` for the mode with
``--steps`` distillation steps (``--l1`` penalty) before profiling again, and ``asis``
for a model that is relufied already (e.g. ``sparseforge relufy`` output): profile ->
predictors, the "original" being that model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import default_cache, default_model, print_record

from sparseforge.passes.predictors import (Predictors, PredictorsOptions, ffn_flops, sample_sequence_ids,
                                           sample_shards)
from sparseforge.passes.profile import Profile, ProfileOptions
from sparseforge.passes.relufy import Relufy, RelufyOptions
from sparseforge.toolchain.frontends import load_model
from sparseforge.toolchain.linear_reference import linear_reference, sparsity_sweep
from sparseforge.toolchain.masked_eval import evaluation_sequences, masked_quality
from sparseforge.toolchain.pass_manager import PassManager
from sparseforge.toolchain.predictor import predictor_flops, split_rows
from sparseforge.toolchain.samples import read_shards


def relufy_options(variant: str, args: argparse.Namespace) -> dict[str, Any] | None:
    if variant == "asis":
        return None
    mode, _, suffix = variant.partition("+")
    opts: dict[str, Any] = {"mode": mode, "target_sparsity": args.target_sparsity,
                            "mean_correction": args.mean_correction, "local_steps": args.local_steps,
                            "eval_sequences": args.eval_sequences, "sweep": (0.9,)}
    if suffix == "ft":
        opts.update(steps=args.steps, l1=args.l1, lr=args.lr, threads=args.threads,
                    hidden_weight=args.hidden_weight)
    elif suffix:
        raise SystemExit(f"unknown variant suffix {suffix!r} in {variant!r} (use <mode> or <mode>+ft)")
    return opts


def layer_linear_reference(ir, b, args: argparse.Namespace,
                           heldout_fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``toolchain.linear_reference`` for block ``b`` on the pass's samples and split: the
    candidate ranks and the largest rank within the FLOPs budget; and the
    ``sparsity_sweep`` of that budget rank over ``--sparsity-sweep`` (empty without one).
    The pre-activation that decides activity is the gate's in a gated block, the up
    projection's otherwise."""
    d, n = ir.spec.hidden_size, ir.spec.intermediate_size
    x, active, _ = read_shards(sample_shards(ir, b), n)
    w, bias = (b.gate, b.gate_bias) if b.gate else (b.up, b.up_bias)
    z = x.astype(np.float64) @ np.asarray(ir.store.get_f32(w), np.float64).T
    if bias:
        z += ir.store.get_f32(bias)
    split = split_rows(len(x), heldout_fraction, args.seed, sample_sequence_ids(ir, b))
    limit = args.budget * ffn_flops(ir, b)
    budget_rank = max((r for r in range(1, d) if predictor_flops(d, r, n) <= limit), default=0)
    ranks = sorted({r for r in args.ranks if r < d} | ({budget_rank} if budget_rank else set()))
    rows = linear_reference(x, z, active, split, ranks, args.recall)
    for row in rows:  # within 10% (--budget) of the layer's own FFN FLOPs: every layer could have it
        row["within_layer_budget"] = row["rank"] <= budget_rank
    sweep = sparsity_sweep(x, z, split, budget_rank, args.sparsity_sweep, args.recall) if budget_rank else []
    return rows, sweep


def run_variant(model: Path, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    print(f"== {variant}", flush=True)
    original = load_model(model)
    profile = ProfileOptions(calib=args.calib, seq_len=args.seq_len, num_sequences=args.num_sequences,
                             max_samples=args.max_samples)
    predictors = PredictorsOptions(
        recall=args.recall, ranks=tuple(args.ranks), density_factor=args.density_factor, budget=args.budget,
        max_epochs=args.max_epochs, workers=args.workers, gate_first=args.gate_first,
        eval_sequences=args.eval_sequences)
    ropts = relufy_options(variant, args)
    relufy = [] if ropts is None else [Profile(profile), Relufy(RelufyOptions(**ropts))]
    passes = [*relufy, Profile(profile), Predictors(predictors)]
    t0 = time.perf_counter()
    result = PassManager(passes, cache_dir=args.cache_dir, seed=args.seed, progress=False, on_record=print_record).run(original)
    ir = result.ir
    relufy_stats = result.records[1].stats if relufy else {}
    pred_stats = result.records[-1].stats
    report = json.loads(Path(ir.files["predictors/predictors.json"]).read_text())
    layers = []
    for row in report["layers"]:
        true = row["true_density"]
        layers.append({k: row[k] for k in ("layer", "mode", "rank", "recall", "precision", "density", "true_density",
                                           "params", "flops_fraction", "seconds", "reason")}
                      | {"density_ratio": row["density"] / true if true else None,
                         "attempts": [{k: a[k] for k in ("rank", "recall", "density", "true_density", "meets_target")}
                                      for a in row["attempts"]]})
    if args.linear_reference:
        for row, b in zip(layers, ir.blocks):
            if row["mode"] != "gate-first":
                row["linear_reference"], row["sparsity_sweep"] = layer_linear_reference(
                    ir, b, args, predictors.heldout_fraction)
    seqs = evaluation_sequences(ir, args.eval_sequences)
    vs_original = masked_quality(ir, seqs, reference=original)
    causal = ir.spec.causal
    key = "perplexity_ratio" if causal else "mean_cosine"
    masked_vs_relufied = pred_stats.get(f"masked_{key}", 1.0)
    pred_layers = [row for row in layers if row["mode"] == "predictor"]
    acceptance = {
        "layers_with_predictor": len(pred_layers),
        "layers_falling_back": [row["layer"] for row in layers if row["mode"] == "dense"],
        "gate_first_layers": [row["layer"] for row in layers if row["mode"] == "gate-first"],
        "recall_and_density_in_every_layer": all(
            row["mode"] == "gate-first" or (row["mode"] == "predictor" and row["recall"] >= args.recall
                                            and row["density"] <= args.density_factor * row["true_density"])
            for row in layers),
        "flops_within_budget": pred_stats["flops_fraction"] <= args.budget,
        "quality_within_relufy_bound": (vs_original[key] <= 1.05) if causal else (vs_original[key] >= 0.98),
    }
    return {
        "variant": variant, "relufy_options": relufy_options(variant, args), "seconds": time.perf_counter() - t0,
        "relufy": {k: relufy_stats[k] for k in ("mean_sparsity", "mean_cosine", "min_cosine", "perplexity_ratio",
                                                "training_steps") if k in relufy_stats},
        "predictors": {k: v for k, v in pred_stats.items() if not k.startswith("per_layer_")},
        "flops_fraction": pred_stats["flops_fraction"], "params_fraction": pred_stats["params_fraction"],
        "layers": layers,
        "masked_vs_relufied": {key: masked_vs_relufied,
                               **({"min_cosine": pred_stats.get("masked_min_cosine")} if not causal else {})},
        "masked_vs_original": {k: vs_original[k] for k in ("mean_cosine", "min_cosine", "perplexity",
                                                           "perplexity_reference", "perplexity_ratio")
                               if k in vs_original},
        "eval_layers": vs_original["layers"], "eval_sequences": len(seqs),
        "acceptance": acceptance,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint or IR (default: all-MiniLM-L6-v2)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated relufy variants (default: relu,threshold for non-gated models, "
                         "drelu for gated ones)")
    ap.add_argument("--calib", default=None, help="calibration data (default: sparseforge's text)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--num-sequences", type=int, default=256)
    ap.add_argument("--max-samples", type=int, default=32768, help="profile samples per layer")
    ap.add_argument("--target-sparsity", type=float, default=0.9, help="for the threshold / fatrelu variants")
    ap.add_argument("--mean-correction", action=argparse.BooleanOptionalAction, default=True,
                    help="relufy mean correction (default recipe: on)")
    ap.add_argument("--local-steps", type=int, default=150,
                    help="relufy layer-local fitting steps (default recipe: 150; 0: none)")
    ap.add_argument("--steps", type=int, default=300, help="distillation steps of the '+ft' variants")
    ap.add_argument("--l1", type=float, default=0.1, help="L1 activation penalty of the '+ft' variants")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--hidden-weight", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the distillation (0: all cores)")
    ap.add_argument("--recall", type=float, default=0.99)
    ap.add_argument("--ranks", type=lambda s: [int(r) for r in s.split(",")], default=[32, 64, 128, 256])
    ap.add_argument("--density-factor", type=float, default=1.5)
    ap.add_argument("--budget", type=float, default=0.10)
    ap.add_argument("--max-epochs", type=int, default=40)
    ap.add_argument("--gate-first", default="auto", choices=["auto", "never", "always"])
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=None, help="pass cache (default: the sparseforge cache)")
    ap.add_argument("--linear-reference", action=argparse.BooleanOptionalAction, default=True,
                    help="per layer, the density at the recall target of the best linear map of each rank "
                         "(toolchain.linear_reference): is a layer hard to predict at that rank, or undertrained?")
    ap.add_argument("--sparsity-sweep", type=lambda s: [float(q) for q in s.split(",")] if s else [],
                    default=[0.5, 0.35, 0.25, 0.15, 0.1, 0.05],
                    help="with --linear-reference: target densities at which the layer's activity is redefined "
                         "by a threshold on its pre-activation, for the density ratio of the budget rank's linear "
                         "map at each ('': none)")
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI (16 sequences, 2 epochs)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "predictor_quality.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.num_sequences, args.max_samples, args.max_epochs, args.eval_sequences = 16, 1024, 2, 4
        args.steps, args.local_steps = min(args.steps, 2), min(args.local_steps, 2)
    args.cache_dir = args.cache_dir or default_cache()
    model = args.model or default_model()
    gated = bool(load_model(model).blocks[0].gate)
    variants = args.variants.split(",") if args.variants else (["drelu"] if gated else ["relu", "threshold"])
    t0 = time.perf_counter()
    results = [run_variant(model, v, args) for v in variants]
    out = {
        "model": str(model), "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": time.perf_counter() - t0, "variants": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    for r in results:
        print(f"\n{r['variant']}: relufy {r['relufy']}  FLOPs fraction {r['flops_fraction']:.4f}  "
              f"masked vs relufied {r['masked_vs_relufied']}  masked vs original {r['masked_vs_original']}")
        for row in r["layers"]:
            ratio = row["density_ratio"]
            print(f"  layer {row['layer']:2d} {row['mode']:<10} rank {row['rank']:4d} recall {row['recall']:.4f} "
                  f"density {row['density']:.4f} true {row['true_density']:.4f}"
                  + (f" ({ratio:.2f}x)" if ratio else "")
                  + f" params {row['params']}" + (f"  [{row['reason']}]" if row["reason"] else ""))
            if row.get("linear_reference"):
                print("      linear reference, density ratio at the recall target: " + ", ".join(
                    f"rank {ref['rank']}{'' if ref['within_layer_budget'] else ' (over the layer budget)'} "
                    f"{ref['density_ratio']:.2f}x"
                    for ref in row["linear_reference"] if ref["density_ratio"] is not None))
            if row.get("sparsity_sweep"):
                print(f"      rank {row['sparsity_sweep'][0]['rank']} if the layer were as sparse as: " + ", ".join(
                    f"density {ref['true_density']:.2f} {ref['density_ratio']:.2f}x" for ref in row["sparsity_sweep"]))
        print(f"  acceptance: {r['acceptance']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
