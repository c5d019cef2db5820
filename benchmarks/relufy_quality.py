"""Relufy quality benchmark: FFN sparsity against model quality, for issue #4's figures.

Cases (each a ``profile -> relufy`` pipeline through the PassManager, cached in
``--cache-dir``; quality measured by the relufy pass on held-out calibration sequences
the recovery never trained on):

* ``minilm-threshold``: all-MiniLM-L6-v2, training-free ``threshold`` mode at 50%;
* ``minilm-relu``: ReLU with mean correction only (no training);
* ``minilm-fatrelu``: FATReLU at ``--minilm-target`` with mean correction and
  sequential layer-local fitting with the threshold in the loop
  (``--minilm-local-steps`` on ``--minilm-local-sequences``), then ``--minilm-steps``
  of end-to-end distillation;

MiniLM cases calibrate on ``--minilm-calib`` (default ``prose``: ``prose_corpus.py``'s
2.3 MB of standard-library docstrings; the package's ~360 KB is too little to train on).
* ``llama-drelu``: the project's small Llama-family model (``train_tiny_llama.py``),
  dReLU plus a FATReLU threshold at ``--llama-target`` (mode ``fatrelu`` on a gated
  FFN), mean correction, local fitting and ``--llama-steps`` of KL distillation,
  calibrated and evaluated on its held-out standard-library files.

Writes ``results/relufy_quality.json``: per case the options, per-layer sparsity before
and after, mean sparsity, quality (mean/min cosine or perplexity ratio), wall time, and
the acceptance checks (MiniLM >= 85% at cosine >= 0.98; Llama >= 85% within 5% ppl).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from _common import default_cache, default_model, print_record

from sparseforge.passes.profile import Profile, ProfileOptions
from sparseforge.passes.relufy import Relufy, RelufyOptions
from sparseforge.toolchain.frontends import load_model
from sparseforge.toolchain.pass_manager import PassManager


def cases(args: argparse.Namespace) -> dict[str, tuple[Path, ProfileOptions, dict[str, Any]]]:
    """Case name -> (model, profile options, relufy options)."""
    minilm = args.minilm or default_model()
    calib = None if args.minilm_calib == "default" else args.minilm_calib
    if calib == "prose":
        from prose_corpus import build

        calib = str(build(args.cache_dir / "corpora"))
    mprof = ProfileOptions(calib=calib, seq_len=128, num_sequences=args.minilm_sequences or args.num_sequences,
                           heldout_fraction=0.1, max_samples=args.max_samples)
    common = {"eval_sequences": args.eval_sequences, "threads": args.threads, "sweep": (0.8, 0.85, 0.9)}
    out: dict[str, tuple[Path, ProfileOptions, dict[str, Any]]] = {
        "minilm-threshold": (minilm, mprof, {**common, "mode": "threshold", "target_sparsity": 0.5}),
        "minilm-relu": (minilm, mprof, {**common, "mode": "relu", "mean_correction": True}),
        "minilm-fatrelu": (minilm, mprof, {
            **common, "mode": "fatrelu", "target_sparsity": args.minilm_target, "mean_correction": True,
            "layer_sparsity": _layer_values(args.minilm_layer_sparsity),
            "local_steps": args.minilm_local_steps, "local_sequences": args.minilm_local_sequences,
            "steps": args.minilm_steps, "lr": args.minilm_lr,
            "batch_size": 8, "hidden_weight": 0.0, "train_ffn_only": True}),
    }
    llama = args.llama or _tiny_llama()
    if llama is not None:
        lprof = ProfileOptions(calib=str(llama / "heldout.jsonl"), seq_len=256, num_sequences=args.num_sequences * 2,
                               heldout_fraction=0.1, max_samples=args.max_samples * 2)
        out["llama-drelu"] = (llama, lprof, {
            **common, "mode": "fatrelu", "target_sparsity": args.llama_target, "mean_correction": True,
            "local_steps": args.local_steps, "local_sequences": args.local_sequences,
            "steps": args.llama_steps, "lr": args.llama_lr, "batch_size": 8, "eval_sequences": 0})
    return out


def _layer_values(text: str) -> dict[str, float]:
    """``"4=0.8,5=0.78"`` -> {"4": 0.8, "5": 0.78}."""
    pairs = [item.split("=") for item in text.split(",") if item.strip()]
    return {k.strip(): float(v) for k, v in pairs}


def _tiny_llama() -> Path | None:
    root = default_cache() / "models"
    found = sorted(root.glob("tiny-llama-stdlib-*")) if root.is_dir() else []
    return found[-1] if found else None


def run_case(name: str, model: Path, profile: ProfileOptions, relufy: dict[str, Any],
             args: argparse.Namespace) -> dict[str, Any]:
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    result = PassManager([Profile(profile), Relufy(RelufyOptions(**relufy))], cache_dir=args.cache_dir,
                         seed=args.seed, progress=False, on_record=print_record).run(load_model(model))
    report = json.loads(Path(result.ir.files["relufy/relufy.json"]).read_text())
    after, causal = report["after"], result.ir.spec.causal
    row: dict[str, Any] = {
        "case": name, "model": str(model), "relufy_options": relufy, "seconds": time.perf_counter() - t0,
        "eval_sequences": report["eval_sequences"],
        "sparsity_before": report["before"]["sparsity"], "sparsity_after": after["sparsity"],
        "mean_sparsity": after["mean_sparsity"], "untrained": _quality(report["untrained"]),
        "after": _quality(after), "thresholds": report["thresholds"], "sweep": report["sweep"],
        "training": {k: v for k, v in report["training"].items() if k != "history"},
    }
    if causal:
        row["acceptance"] = {"sparsity>=0.85": after["mean_sparsity"] >= 0.85,
                             "perplexity_within_5%": after["perplexity_ratio"] <= 1.05}
    elif relufy["mode"] != "threshold":
        row["acceptance"] = {"sparsity>=0.85": after["mean_sparsity"] >= 0.85,
                             "cosine>=0.98": after["mean_cosine"] >= 0.98}
    return row


def _quality(q: dict[str, Any]) -> dict[str, Any]:
    keys = ("mean_sparsity", "mean_cosine", "min_cosine", "perplexity_reference", "perplexity", "perplexity_ratio")
    return {k: q[k] for k in keys if k in q}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--minilm", type=Path, default=None, help="all-MiniLM-L6-v2 checkpoint (default: the package)")
    ap.add_argument("--llama", type=Path, default=None, help="small Llama checkpoint (default: the cached one)")
    ap.add_argument("--num-sequences", type=int, default=256)
    ap.add_argument("--minilm-calib", default="prose",
                    help="MiniLM calibration text: 'prose' (prose_corpus.py, ~2.3 MB of stdlib docstrings), "
                         "'default' (the package's ~360 KB) or a path")
    ap.add_argument("--minilm-sequences", type=int, default=2560,
                    help="MiniLM calibration sequences (0: --num-sequences)")
    ap.add_argument("--minilm-local-steps", type=int, default=1500)
    ap.add_argument("--minilm-local-sequences", type=int, default=1024)
    ap.add_argument("--max-samples", type=int, default=8192)
    ap.add_argument("--minilm-target", type=float, default=0.865)
    ap.add_argument("--minilm-layer-sparsity", default="", metavar="L=S,...",
                    help="per-layer target sparsity overrides for MiniLM, e.g. '4=0.82,5=0.8'")
    ap.add_argument("--local-steps", type=int, default=300)
    ap.add_argument("--local-sequences", type=int, default=128)
    ap.add_argument("--minilm-steps", type=int, default=600)
    ap.add_argument("--minilm-lr", type=float, default=3e-5)
    ap.add_argument("--llama-target", type=float, default=0.87)
    ap.add_argument("--llama-steps", type=int, default=300)
    ap.add_argument("--llama-lr", type=float, default=3e-4)
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "relufy_quality.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.num_sequences, args.max_samples, args.eval_sequences = 16, 1024, 4
        args.local_steps, args.minilm_steps, args.llama_steps = 2, min(args.minilm_steps, 2), 2
        args.minilm_sequences, args.local_sequences, args.minilm_local_sequences = 0, 8, 8
        args.minilm_local_steps = 2
    args.cache_dir = args.cache_dir or default_cache()
    table = cases(args)
    names = args.cases.split(",") if args.cases else list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(table)}")
    t0 = time.perf_counter()
    rows = [run_case(n, *table[n], args) for n in names]
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "seconds": time.perf_counter() - t0, "cases": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    for r in rows:
        print(f"{r['case']:<17} sparsity {r['mean_sparsity']:.3f}  {r['after']}  {r.get('acceptance', '')}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
