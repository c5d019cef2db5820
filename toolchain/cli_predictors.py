"""``sparseforge train-predictors``: the ``predictors`` pass as a subcommand.

Registered onto the ``sparseforge`` click group when this module is imported
(``toolchain/cli.py`` imports it). Also runnable on its own:
``python -m sparseforge.toolchain.cli_predictors train-predictors MODEL -o OUT``.
"""
from __future__ import annotations

from pathlib import Path

import click

from .cli import _print_record, cli, default_cache_dir, main
from .errors import InputError


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(r) for r in text.replace(" ", "").split(",") if r]
    except ValueError:
        raise InputError(None, f"--ranks {text!r}: expected comma-separated integers, e.g. 32,64,128") from None
    if not ranks:
        raise InputError(None, "--ranks: give at least one rank")
    return ranks


@cli.command("train-predictors")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Output directory: ir/, predictors.json, predictors.png, report.json.")
@click.option("--recall", type=float, default=0.99, show_default=True,
              help="Recall target in (0, 1]: fraction of truly active neurons predicted active (held-out).")
@click.option("--ranks", default="32,64,128,256", show_default=True,
              help="Predictor ranks to try, smallest first (clipped to < d_model).")
@click.option("--density-factor", type=float, default=1.5, show_default=True,
              help="Accept a rank when its predicted density is <= this x the true density.")
@click.option("--budget", type=float, default=0.10, show_default=True,
              help="All predictors together <= this fraction of the FFN parameters.")
@click.option("--max-epochs", type=int, default=40, show_default=True, help="Training epochs (at most).")
@click.option("--patience", type=int, default=4, show_default=True,
              help="Stop after this many epochs without held-out loss improvement.")
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Learning rate (AdamW).")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Samples per training step.")
@click.option("--heldout-fraction", type=float, default=0.2, show_default=True,
              help="Fraction of the samples (whole sequences) held out for early stopping and calibration.")
@click.option("--bias/--no-bias", default=False, show_default=True, help="Biases in the predictor MLP.")
@click.option("--gate-first", type=click.Choice(["auto", "never", "always"]), default="auto", show_default=True,
              help="auto = gate-first (exact, no predictor) for dReLU blocks.")
@click.option("--workers", type=int, default=0, show_default=True, help="Parallel layers (0: one per core).")
@click.option("--executor", default="local", show_default=True, help="Execution engine for the layers.")
@click.option("--eval-sequences", type=int, default=64, show_default=True,
              help="Held-out sequences for the masked-quality check (0: all, -1: skip).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration data for the profile pass run first when MODEL has no profile samples.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Sequence length of that profile pass.")
@click.option("--max-samples", type=int, default=8192, show_default=True,
              help="(FFN input, mask) pairs per layer that profile pass keeps.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Pass cache directory.")
@click.option("--no-cache", is_flag=True, help="Ignore cached results.")
def train_predictors(model: Path, output: Path, recall: float, ranks: str, density_factor: float, budget: float,
                     max_epochs: int, patience: int, lr: float, batch_size: int, heldout_fraction: float,
                     bias: bool, gate_first: str, workers: int, executor: str, eval_sequences: int,
                     calib: Path | None, seq_len: int, max_samples: int, seed: int, cache_dir: Path | None,
                     no_cache: bool) -> None:
    """Train per-layer activation predictors for MODEL (best on a relufied model).

    MODEL is profiled first (onnxruntime, --calib data) unless it is an IR directory
    that holds profile samples (e.g. `sparseforge relufy` output, profiled again)."""
    from .frontends import load_model
    from .pass_base import get_pass, make_options
    from .pipeline import run_pass_to_dir

    options = {"recall": recall, "ranks": _ranks(ranks), "density_factor": density_factor, "budget": budget,
               "max_epochs": max_epochs, "patience": patience, "lr": lr, "batch_size": batch_size,
               "heldout_fraction": heldout_fraction, "bias": bias, "gate_first": gate_first,
               "workers": workers, "executor": executor, "eval_sequences": eval_sequences}
    cls = get_pass("predictors")
    cls(make_options(cls, options, "sparseforge train-predictors")).check_options()  # before reading MODEL
    ir = load_model(model)
    sampled = all((b.annotations.get("profile") or {}).get("sample_shards") for b in ir.blocks)
    before = [] if sampled else [("profile", {"calib": str(calib) if calib else None, "seq_len": seq_len,
                                              "max_samples": max_samples})]
    records = run_pass_to_dir("predictors", model, output, options, seed=seed, before=before,
                              cache_dir=None if no_cache else (cache_dir or default_cache_dir()))
    for record in records:
        _print_record(record)
    stats = records[-1].stats
    for i, mode in enumerate(stats["per_layer_mode"]):
        true = stats["per_layer_true_density"][i]
        click.echo(f"  layer {i:2d}: {mode:<10} rank {stats['per_layer_rank'][i]:4d}  recall "
                   f"{stats['per_layer_recall'][i]:.4f}  density {stats['per_layer_density'][i]:.3f}"
                   + (f" (true {true:.3f})" if true is not None else ""))
    click.echo(f"wrote {output}/ (ir/, predictors.json, predictors.png)")


if __name__ == "__main__":
    main()
