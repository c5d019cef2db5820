"""``sparseforge run``, ``verify`` and ``bench``: the artifact at work.

Registered onto the ``sparseforge`` click group when this module is imported
(``toolchain/cli.py`` imports it at the bottom).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from .atomic import check_output_file, write_text_atomic
from .cli import cli, main
from .errors import InputError
from .runtime_cache import KV_DTYPES
from .runtime_load import MODES

_MODE = click.Choice(list(MODES))
_COUNT = click.IntRange(min=1)
_KV_CACHE = dict(type=click.Choice(list(KV_DTYPES)), default="f32", show_default=True,
                 help="Decoders: the KV cache's keys and values in float32 or float16 (half the bytes; attention "
                      "reads them rounded to float16).")


class _Finite(click.FloatRange):
    """A float range that also rejects nan and infinities."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number.", param, ctx)
        return rv


def _existing_reference(path: Path) -> Path:
    """``--reference``, which must exist (the artifact's own check is ``runtime_load.artifact_file``)."""
    if not path.exists():
        raise InputError(path, "reference model not found")
    return path


def _is_decoder(artifact: Path) -> bool:
    """Whether ARTIFACT holds a decoder, from its header (the command validates it in full)."""
    from .artifact_reader import Artifact
    from .runtime_load import artifact_file

    art = Artifact.open(artifact_file(artifact), verify_checksums=False)
    art.close()
    return art.spec.causal


def _reject_other_kind(artifact: Path, decoder: bool, decoder_only: tuple[str, ...] = (),
                       encoder_only: tuple[str, ...] = ()) -> None:
    """InputError when the command line gives an option (parameter names) that applies
    only to the other kind of model: it would be ignored silently."""
    ctx = click.get_current_context()
    wrong = encoder_only if decoder else decoder_only
    given = [p.opts[0] for p in ctx.command.params
             if p.name in wrong and ctx.get_parameter_source(p.name) is not ParameterSource.DEFAULT]
    if given:
        raise InputError(artifact, f"{'a decoder' if decoder else 'an encoder'} artifact: {', '.join(given)} "
                                   f"{'apply' if len(given) > 1 else 'applies'} to {'en' if decoder else 'de'}coders only")


def _write_json(path: Path | None, report: dict) -> None:
    if path is not None:
        write_text_atomic(path, json.dumps(report, indent=1, sort_keys=True, default=float) + "\n")


@cli.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Decoders: generate a continuation of this text.")
@click.option("--embed", "texts", multiple=True, help="Encoders: print the embedding of this text (repeatable).")
@click.option("--mode", type=_MODE, default="sparse", show_default=True,
              help="FFN mode: sparse (per layer as converted), predictor, gate-first or dense.")
@click.option("--max-new-tokens", type=_COUNT, default=32, show_default=True, help="Tokens to generate.")
@click.option("--top-p", type=_Finite(0, 1, min_open=True), default=None,
              help="Sample with this nucleus mass in (0, 1] (default: greedy).")
@click.option("--temperature", type=_Finite(0, min_open=True), default=1.0, show_default=True,
              help="Sampling temperature (> 0).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--kv-cache", **_KV_CACHE)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (embeddings as lists, or the generated text and ids).")
def run(artifact: Path, prompt: str | None, texts: tuple[str, ...], mode: str, max_new_tokens: int,
        top_p: float | None, temperature: float, seed: int, kv_cache: str, as_json: bool) -> None:
    """Run ARTIFACT: embed texts (encoders) or generate from a prompt (decoders)."""
    from .runtime import Sampler, load_runtime

    for option, values in (("--prompt", [] if prompt is None else [prompt]), ("--embed", texts)):
        for text in values:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # bytes the locale could not decode (surrogate escapes)
                raise InputError(None, f"{option}: the text is not valid UTF-8 (character {exc.start})") from None
    _reject_other_kind(artifact, _is_decoder(artifact),
                       decoder_only=("max_new_tokens", "top_p", "temperature", "seed", "kv_cache"))
    rt = load_runtime(artifact, mode=mode, kv_cache=kv_cache)
    if rt.spec.causal:
        if prompt is None or texts:
            raise InputError(artifact, "a decoder artifact: give --prompt TEXT" + (" (not --embed)" if texts else ""))
        try:
            sampler = Sampler(greedy=top_p is None, temperature=temperature, top_p=1.0 if top_p is None else top_p,
                              seed=seed)
        except ValueError as exc:
            raise InputError(None, str(exc)) from None
        tok = rt.model.require_tokenizer()
        tok.no_truncation()
        ids = tok.encode(prompt, add_special_tokens=True).ids
        new, shown = [], ""
        for t in rt.stream(ids, max_new_tokens, sampler):
            new.append(t)
            if not as_json:  # decode the whole continuation: single tokens lose their leading spaces
                text = tok.decode(new, skip_special_tokens=True)
                click.echo(text[len(shown):], nl=False)
                sys.stdout.flush()
                shown = text
        if as_json:
            click.echo(json.dumps({"prompt": prompt, "ids": new, "text": tok.decode(new, skip_special_tokens=True)}))
        else:
            click.echo()
    else:
        if not texts or prompt is not None:
            raise InputError(artifact, "an encoder artifact: give --embed TEXT"
                             + (" (not --prompt)" if prompt is not None else ""))
        emb = rt.embed(list(texts))
        if as_json:
            click.echo(json.dumps({"embeddings": emb.tolist()}))
        else:
            for t, e in zip(texts, emb):
                click.echo(f"{t[:40]!r}: [{', '.join(f'{v:.4f}' for v in e[:6])}, ...] (d={e.size})")
            if len(texts) > 1:
                click.echo("cosine similarities:")
                for i, row in enumerate(emb @ emb.T):
                    click.echo("  " + " ".join(f"{v:6.3f}" for v in row))


@cli.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--reference", required=True, type=click.Path(path_type=Path),
              help="The original model (checkpoint directory, .onnx or IR directory), run in onnxruntime.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Evaluation text/JSONL/directory/.npy (default: the conversion's held-out calibration split).")
@click.option("--num-sequences", type=click.IntRange(min=0), default=64, show_default=True,
              help="Sequences to evaluate (0: all).")
@click.option("--seq-len", type=click.IntRange(min=2), default=None, help="Tokens per sequence (default: the recipe's).")
@click.option("--mode", type=_MODE, default="sparse", show_default=True, help="Runtime FFN mode.")
@click.option("--min-cosine", type=_Finite(-1, 1), default=None,
              help="Encoders: lowest acceptable mean embedding cosine (default: recipe, else 0.98).")
@click.option("--max-ppl-increase", type=_Finite(), default=None,
              help="Decoders: largest acceptable relative perplexity increase (default: recipe, else 0.05).")
@click.option("--recipe", type=click.Path(path_type=Path), default=None,
              help="Recipe TOML whose [verify] table gives the gates.")
@click.option("--kv-cache", **_KV_CACHE)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the report here.")
def verify_cmd(artifact: Path, reference: Path, data: Path | None, num_sequences: int, seq_len: int | None,
               mode: str, min_cosine: float | None, max_ppl_increase: float | None, recipe: Path | None,
               kv_cache: str, json_path: Path | None) -> None:
    """Check ARTIFACT against the original model on held-out inputs; exit 1 when a gate fails."""
    from .verify import verify

    _existing_reference(reference)
    _reject_other_kind(artifact, _is_decoder(artifact), decoder_only=("max_ppl_increase", "kv_cache"),
                       encoder_only=("min_cosine",))
    if json_path is not None:
        check_output_file(json_path)  # before the run, not after it
    report = verify(artifact, reference, data=data, num_sequences=num_sequences, seq_len=seq_len,
                    mode=mode, min_cosine=min_cosine, max_ppl_increase=max_ppl_increase, recipe=recipe,
                    kv_cache=kv_cache)
    _write_json(json_path, report)
    click.echo(verify_summary(report))
    if not report["passed"]:
        sys.exit(1)


def verify_summary(r: dict) -> str:
    if r["family"] == "bert":
        figures = f"mean cosine {r['mean_cosine']:.4f}, min {r['min_cosine']:.4f}"
    else:
        figures = (f"perplexity {r['perplexity']:.3f} vs {r['perplexity_reference']:.3f} "
                   f"({100 * r['ppl_increase']:+.2f}%), top-1 agreement {r['top1_agreement']:.3f}, "
                   f"mean KL {r['mean_kl']:.4f}")
    gates = ", ".join(f"{k} {g['limit']} ({g['source']}): {'pass' if g['passed'] else 'FAIL'}"
                      for k, g in r["gates"].items())
    return (f"verify {'PASSED' if r['passed'] else 'FAILED'}: {figures} on {r['sequences']} sequences "
            f"({r['tokens']} tokens, {r['data']}); FFN density {r['mean_ffn_density']:.3f}; gates: {gates}")


@cli.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--modes", default="dense,sparse", show_default=True, help="Runtime modes to time (comma-separated).")
@click.option("--prompt-tokens", type=_COUNT, default=32, show_default=True, help="Decoders: prompt (prefill) length.")
@click.option("--decode-tokens", type=_COUNT, default=32, show_default=True, help="Decoders: generated tokens timed.")
@click.option("--seq-lens", default=None,
              help="Encoders: sequence lengths, comma-separated (default: those of 16,64,128 within the model's "
                   "positions).")
@click.option("--batch", type=_COUNT, default=8, show_default=True, help="Encoders: sequences per batch.")
@click.option("--repeats", type=_COUNT, default=3, show_default=True, help="Best of this many timings.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Time the dense onnxruntime baseline of this model instead of the artifact's own weights.")
@click.option("--ort-graph", "ort_graphs", multiple=True, metavar="NAME=PATH",
              help="Time this ONNX file as the onnxruntime baseline NAME (repeatable).")
@click.option("--no-ort", is_flag=True, help="Skip the onnxruntime baseline.")
@click.option("--threads", type=_COUNT, default=None, help="Threads for the runtime and onnxruntime (default: all cores).")
@click.option("--kv-cache", **_KV_CACHE)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the report here.")
def bench_cmd(artifact: Path, modes: str, prompt_tokens: int, decode_tokens: int, seq_lens: str | None, batch: int,
              repeats: int, reference: Path | None, ort_graphs: tuple[str, ...], no_ort: bool, threads: int | None,
              kv_cache: str, json_path: Path | None) -> None:
    """Decode/prefill tokens/s (decoders) or embeddings/s (encoders) per mode, against onnxruntime."""
    from .bench import bench, summary_lines

    mode_list = tuple(m.strip() for m in modes.split(",") if m.strip())
    bad = [m for m in mode_list if m not in MODES]
    if bad or not mode_list:
        raise InputError(None, f"--modes {modes!r}: expected a comma-separated subset of {', '.join(MODES)}")
    lens = None
    if seq_lens is not None:
        try:
            lens = tuple(int(v) for v in seq_lens.split(","))
        except ValueError:
            lens = ()
        if not lens or min(lens) < 1:
            raise InputError(None, f"--seq-lens {seq_lens!r}: expected comma-separated integers >= 1")
    _reject_other_kind(artifact, _is_decoder(artifact), decoder_only=("prompt_tokens", "decode_tokens", "kv_cache"),
                       encoder_only=("seq_lens", "batch"))
    if reference is not None:
        _existing_reference(reference)
    if json_path is not None:
        check_output_file(json_path)
    graphs = {}
    for g in ort_graphs:
        name, sep, path = g.partition("=")
        if not sep or not Path(path).is_file():
            raise InputError(Path(path) if sep else None, f"--ort-graph {g!r}: expected NAME=PATH of an ONNX file")
        graphs[name] = path
    report = bench(artifact, modes=mode_list, prompt_tokens=prompt_tokens,
                   decode_tokens=decode_tokens, seq_lens=lens, batch=batch, repeats=repeats, ort=not no_ort,
                   ort_graphs=graphs or None, reference=reference, threads=threads, kv_cache=kv_cache)
    _write_json(json_path, report)
    click.echo("\n".join(summary_lines(report)))


if __name__ == "__main__":
    main()
