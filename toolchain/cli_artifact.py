"""``sparseforge quantize`` and ``sparseforge pack``, and ``inspect`` of a GGUF artifact.

Registered onto the ``sparseforge`` click group when this module is imported
(``toolchain/cli.py`` imports it; its ``inspect`` hands .gguf files to
:func:`inspect_artifact`).
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from .cli import _print_record, cli, default_cache_dir, main

_FORMATS = click.Choice(["f32", "f16", "q8_0", "q4_0"], case_sensitive=False)


def is_artifact(path: Path) -> bool:
    """A file that starts with the GGUF magic (or is named *.gguf)."""
    if not path.is_file():
        return path.suffix == ".gguf"
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF" or path.suffix == ".gguf"


def inspect_artifact(path: Path, as_json: bool) -> None:
    from .artifact_reader import Artifact
    from .artifact_summary import describe_artifact, format_artifact

    art = Artifact.open(path)
    try:
        d = describe_artifact(art)
    finally:
        art.close()
    click.echo(json.dumps(d, indent=1) if as_json else format_artifact(d))


def _annotated(model: Path, key: str) -> bool:
    from .frontends import load_model

    return all(key in b.annotations for b in load_model(model).blocks)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Output directory: ir/, quantize.json, report.json.")
@click.option("--ffn", type=_FORMATS, default="q4_0", show_default=True, help="Format of the FFN matrices.")
@click.option("--attention", type=_FORMATS, default="q8_0", show_default=True, help="Attention matrices.")
@click.option("--embeddings", type=_FORMATS, default="q8_0", show_default=True, help="Embedding tables.")
@click.option("--other", type=_FORMATS, default="q8_0", show_default=True, help="Other matrices (pooler, LM head).")
@click.option("--vectors", type=_FORMATS, default="f32", show_default=True, help="Norms and biases.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Pass cache directory.")
@click.option("--no-cache", is_flag=True, help="Ignore cached results.")
def quantize(model: Path, output: Path, ffn: str, attention: str, embeddings: str, other: str, vectors: str,
             seed: int, cache_dir: Path | None, no_cache: bool) -> None:
    """Quantize MODEL's weights to ggml formats and report bytes and SQNR per tensor.

    The IR written keeps the dequantized weights (what the artifact will hold)."""
    from .pipeline import run_pass_to_dir

    options = {"ffn": ffn.lower(), "attention": attention.lower(), "embeddings": embeddings.lower(),
               "other": other.lower(), "vectors": vectors.lower()}
    (record,) = run_pass_to_dir("quantize", model, output, options, seed=seed,
                                cache_dir=None if no_cache else (cache_dir or default_cache_dir()))
    _print_record(record)
    for fmt, row in record.stats["formats"].items():
        sq = "exact" if row["mean_sqnr_db"] is None else \
            f"SQNR mean {row['mean_sqnr_db']:.1f} dB, min {row['min_sqnr_db']:.1f} dB"
        click.echo(f"  {fmt:<5} {row['tensors']:4d} tensors {row['bytes']:>12,} bytes  {sq}")
    if record.stats["fallbacks"]:
        click.echo(f"  fell back to a float format (rows not a multiple of 32): {', '.join(record.stats['fallbacks'])}")
    click.echo(f"wrote {output}/ (ir/, quantize.json)")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Output directory: model.gguf, ir/, report.json.")
@click.option("--target", default="generic", show_default=True, help="CPU target (see `sparseforge targets`).")
@click.option("--bundle-align", type=int, default=0, show_default=True,
              help="Bytes each neuron bundle is padded to (0: the target's alignment).")
@click.option("--quantize/--no-quantize", "run_quantize", default=True, show_default=True,
              help="Quantize first (default formats) when MODEL has not been quantized.")
@click.option("--reorder/--no-reorder", "run_reorder", default=True, show_default=True,
              help="Reorder neurons hot-first first when MODEL is profiled and not yet reordered.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Pass cache directory.")
@click.option("--no-cache", is_flag=True, help="Ignore cached results.")
def pack(model: Path, output: Path, target: str, bundle_align: int, run_quantize: bool, run_reorder: bool,
         seed: int, cache_dir: Path | None, no_cache: bool) -> None:
    """Write MODEL (a model or IR directory) as one GGUF artifact OUTPUT/model.gguf."""
    from .pipeline import run_pass_to_dir

    before = []
    if run_quantize and not _annotated(model, "quant"):
        before.append(("quantize", {}))
    if run_reorder and _annotated(model, "profile") and not _annotated(model, "reorder"):
        before.append(("reorder", {}))
    records = run_pass_to_dir("pack", model, output, {"target": target, "bundle_align": bundle_align}, seed=seed,
                              before=before, cache_dir=None if no_cache else (cache_dir or default_cache_dir()))
    for record in records:
        _print_record(record)
    inspect_artifact(output / "model.gguf", as_json=False)
    click.echo(f"wrote {output}/ (model.gguf, ir/)")


if __name__ == "__main__":
    main()
