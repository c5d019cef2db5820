"""``profile``: measure every FFN neuron on calibration text through onnxruntime.

Changes no weight. Adds, per FFN block:

* tensors ``sparseforge.profile.{L}.count_active`` / ``count_positive`` [n_ff] int64
  (tokens with |a| > eps / a > 0), ``mean_abs`` and ``max_abs`` [n_ff] float32,
  ``hist`` [len(HIST_EDGES)] int64 (|a| histogram, bins of
  ``toolchain.activation_stats.HIST_EDGES``), ``rank`` [n_ff] int32 (hot first);
* ``block.annotations["profile"]``: tokens, sparsity, positive fraction, the tensor
  names above and the sample shard files;

and attaches to the IR the calibration split (``calibration/train.safetensors``,
``calibration/heldout.safetensors``: ``ids`` [N, seq_len], ``lengths`` [N]), capped
samples of (FFN input, activation mask) in ``profile/samples/`` (see
``toolchain.samples``), ``profile/profile.json`` and two PNG plots.

The graph is the IR's own ONNX graph when it has one (ONNX frontend), otherwise one
built from the IR (``toolchain.onnx_builder``). Padding tokens never count.

Models whose float32 weights exceed ``memory_budget_mb`` (``streaming = "auto"``; or
always with ``"always"``, never with ``"never"``) are profiled layer-streamed instead
(``toolchain.layer_stream``): the numpy reference executor carries a batch of sequences
through the model one layer at a time, each layer's weights read from the memory-mapped
checkpoint and released after use, batches as large as a quarter of the budget holds
(the weights are read once per batch). Same statistics to float32 rounding.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparseforge.toolchain.activation_stats import HIST_EDGES, LayerStats
from sparseforge.toolchain.calibration import CalibrationSet, Sequences, build_calibration
from sparseforge.toolchain.errors import InputError, PassError
from sparseforge.toolchain.ffn_tap import FFNTap
from sparseforge.toolchain.fingerprint import path_digest
from sparseforge.toolchain.ir import ANNOTATION_PREFIX, FFNBlock, ModelIR
from sparseforge.toolchain.layer_stream import STREAMING, StreamTap, make_tap, stream_batch, visit
from sparseforge.toolchain.pass_base import Pass, PassContext, PassResult, register_pass
from sparseforge.toolchain.plots import plot_frequency_distribution, plot_layer_sparsity
from sparseforge.toolchain.progress import progress
from sparseforge.toolchain.safetensors_io import write_safetensors
from sparseforge.toolchain.samples import SampleShardWriter


@dataclass(frozen=True)
class ProfileOptions:
    """``calib``: text file, directory, JSONL or .npy of token ids (None: the shipped default
    text). ``seq_len`` tokens per sequence, ``num_sequences`` calibration sequences,
    ``heldout_fraction`` of all windows kept apart for quality checks, ``batch_size``
    sequences per onnxruntime call, ``eps``: a neuron is active when |a| > eps,
    ``max_samples``: (FFN input, mask) pairs kept per layer, ``shard_size``: pairs per
    shard file, ``threads``: onnxruntime threads (0: all cores); ``streaming``: ``auto``
    (layer-streamed when the float32 weights exceed ``memory_budget_mb`` MiB, else one
    onnxruntime session), ``always`` or ``never``."""

    calib: str | None = None
    seq_len: int = 128
    num_sequences: int = 256
    heldout_fraction: float = 0.1
    batch_size: int = 16
    eps: float = 0.0
    max_samples: int = 8192
    shard_size: int = 4096
    threads: int = 0
    streaming: str = "auto"
    memory_budget_mb: float = 2048.0


def _tensor(layer: int, what: str) -> str:
    return f"{ANNOTATION_PREFIX}profile.{layer}.{what}"


@register_pass
class Profile(Pass):
    name = "profile"
    summary = "per-neuron activation statistics and predictor samples on calibration text (onnxruntime)"
    Options = ProfileOptions
    quiet_defaults = ("streaming", "memory_budget_mb")

    def fingerprint(self) -> dict[str, Any]:
        return {"calib": path_digest(self.options.calib) if self.options.calib else "default"}

    def check_options(self) -> None:
        o = self.options
        self.require_at_least(batch_size=1, shard_size=1, max_samples=0, eps=0, threads=0, seq_len=2,
                              num_sequences=1, heldout_fraction=0)
        self.require_positive("memory_budget_mb")
        if o.heldout_fraction >= 1:
            raise PassError(f"profile: heldout_fraction = {o.heldout_fraction} is out of range (must be < 1)")
        if o.streaming not in STREAMING:
            raise PassError(f"profile: streaming = {o.streaming!r}: expected one of {', '.join(STREAMING)}")

    def check_model(self, ir: ModelIR) -> None:
        if self.options.seq_len > ir.spec.max_positions:
            raise PassError(f"profile: seq_len {self.options.seq_len} exceeds the model's "
                            f"{ir.spec.max_positions} positions")
        calib = self.options.calib
        if ir.tokenizer is None and (calib is None or not str(calib).lower().endswith(".npy")):
            raise InputError(ir.source.get("path"), "the model has no tokenizer.json, which text calibration "
                                                    f"({calib or 'the default text'}) needs; give token ids as a "
                                                    ".npy file (--calib, recipe option calib)")

    def run(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        o = self.options
        out = ir.evolve()
        calib = build_calibration(
            o.calib, tokenizer=ir.tokenizer, vocab_size=ir.spec.vocab_size, seq_len=o.seq_len,
            num_sequences=o.num_sequences, heldout_fraction=o.heldout_fraction, seed=ctx.seed,
            pad_id=ir.spec.pad_token_id or 0,
        )
        tap = make_tap(ir, ctx.work_dir / "graph", streaming=o.streaming, memory_budget_mb=o.memory_budget_mb,
                       threads=o.threads or None)
        batch = o.batch_size
        if isinstance(tap, StreamTap):
            batch = max(batch, stream_batch(ir, o.seq_len, o.memory_budget_mb))
        stats, shards, elapsed = stream_statistics(
            tap, calib.train, n_ff=ir.spec.intermediate_size, eps=o.eps, batch_size=batch,
            max_samples=o.max_samples, shard_size=o.shard_size, seed=ctx.seed,
            sample_dir=ctx.work_dir / "samples", progress_enabled=ctx.progress)
        self._record(out, stats, shards)
        self._attach_calibration(out, calib, ctx.work_dir)
        report = self._report(out, calib, stats, elapsed)
        self._attach_report(out, report, ctx.work_dir)
        return PassResult(out, report["summary"], modified=True)

    # -- recording -------------------------------------------------------------------
    def _record(self, out: ModelIR, stats: dict[int, LayerStats], shards: dict[int, list[Path]]) -> None:
        for block in out.blocks:
            s = stats[block.layer]
            names = {}
            for what, arr in (
                ("count_active", s.count_active), ("count_positive", s.count_positive),
                ("mean_abs", (s.sum_abs / max(s.tokens, 1)).astype(np.float32)), ("max_abs", s.max_abs),
                ("hist", s.hist), ("rank", s.ranking()),
            ):
                out.store.set(_tensor(block.layer, what), arr)
                names[what] = _tensor(block.layer, what)
            files = []
            for path in shards.get(block.layer, []):
                key = f"profile/samples/{path.name}"
                out.files[key] = str(path)
                files.append(key)
            block.annotations["profile"] = {
                "tokens": s.tokens, "eps": self.options.eps, "sparsity": s.sparsity,
                "positive_fraction": s.positive_fraction, "tensors": names, "sample_shards": files,
                "samples": _count_rows(shards.get(block.layer, [])),
            }
        out.store.set(f"{ANNOTATION_PREFIX}profile.hist_edges", HIST_EDGES.astype(np.float64))

    def _attach_calibration(self, out: ModelIR, calib: CalibrationSet, work: Path) -> None:
        for split, seqs in (("train", calib.train), ("heldout", calib.heldout)):
            path = work / "calibration" / f"{split}.safetensors"
            write_safetensors(path, {"ids": seqs.ids, "lengths": seqs.lengths})
            out.files[f"calibration/{split}.safetensors"] = str(path)

    def _report(self, out: ModelIR, calib: CalibrationSet, stats: dict[int, LayerStats],
                elapsed: float) -> dict[str, Any]:
        layers = []
        for block in out.blocks:
            s = stats[block.layer]
            f = s.frequency
            hot = np.sort(s.count_active)[::-1]
            top10 = hot[: max(1, len(hot) // 10)].sum() / max(hot.sum(), 1)
            layers.append({
                "layer": block.layer, "tokens": s.tokens, "sparsity": s.sparsity,
                "positive_fraction": s.positive_fraction,
                "frequency_quantiles": {q: float(np.quantile(f, float(q))) for q in ("0.1", "0.5", "0.9", "0.99")},
                "dead_neurons": int((s.count_active == 0).sum()),
                "top10pct_neuron_share_of_activations": float(top10),
                "mean_abs": float(s.sum_abs.sum() / max(s.tokens * s.n_ff, 1)),
            })
        sp = [l["sparsity"] for l in layers]
        pos = [l["positive_fraction"] for l in layers]
        summary = {
            "sequences": len(calib.train), "tokens": calib.train.num_tokens,
            "heldout_sequences": len(calib.heldout), "mean_sparsity": float(np.mean(sp)),
            "mean_positive_fraction": float(np.mean(pos)),
            "tokens_per_s": calib.train.num_tokens / elapsed if elapsed > 0 else 0.0,
            "per_layer_sparsity": sp, "per_layer_positive_fraction": pos,
        }
        return {"model": out.spec.architecture, "options": self.options_dict(), "summary": summary,
                "layers": layers}

    def _attach_report(self, out: ModelIR, report: dict[str, Any], work: Path) -> None:
        folder = work / "report"
        folder.mkdir(parents=True, exist_ok=True)
        # tokens/s varies from run to run; keep it out of the attached (hashed) file
        stable = {**report, "summary": {k: v for k, v in report["summary"].items() if k != "tokens_per_s"}}
        (folder / "profile.json").write_text(json.dumps(stable, indent=1) + "\n")
        title = f"{out.spec.architecture}: FFN activations on {report['summary']['tokens']} tokens"
        plot_layer_sparsity(folder / "sparsity.png", report["summary"]["per_layer_sparsity"],
                            report["summary"]["per_layer_positive_fraction"], title)
        freqs = [out.store.get(_tensor(b.layer, "count_active")) / max(b.annotations["profile"]["tokens"], 1)
                 for b in out.blocks]
        plot_frequency_distribution(folder / "frequency.png", freqs, "neuron activation frequency per layer")
        for name in ("profile.json", "sparsity.png", "frequency.png"):
            out.files[f"profile/{name}"] = str(folder / name)


def stream_statistics(tap: FFNTap | StreamTap, train: Sequences, *, n_ff: int, eps: float, batch_size: int,
                      max_samples: int, shard_size: int, seed: int, sample_dir: Path,
                      progress_enabled: bool | None = None
                      ) -> tuple[dict[int, LayerStats], dict[int, list[Path]], float]:
    """Stream ``train`` through the tapped graph: per-layer statistics of the real tokens,
    sample shards of ``max_samples`` tokens drawn with ``seed`` (per layer), and seconds."""
    total = train.num_tokens
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(max_samples, total), replace=False))
    stats = {layer: LayerStats(n_ff=n_ff, eps=eps) for layer, _, _ in tap.taps}
    writer = SampleShardWriter(sample_dir, shard_size)
    offset = 0
    t0 = time.perf_counter()
    bar = progress(train.batches(batch_size), desc="profile", enabled=progress_enabled,
                   total=-(-len(train) // batch_size), unit="batch")
    for ids, mask in bar:
        real = np.flatnonzero(mask.ravel())  # positions of real tokens, row-major
        lo, hi = np.searchsorted(chosen, [offset, offset + len(real)])
        picked = real[chosen[lo:hi] - offset]

        def consume(layer: int, x: np.ndarray, a: np.ndarray) -> None:
            a2, x2 = a.reshape(-1, a.shape[-1]), x.reshape(-1, x.shape[-1])
            stats[layer].update(a2 if len(real) == len(a2) else a2[real])
            if len(picked):
                writer.add(layer, x2[picked], np.abs(a2[picked]) > eps, chosen[lo:hi])

        visit(tap, ids, mask, consume)
        offset += len(real)
        bar.set_postfix(tok_s=f"{offset / (time.perf_counter() - t0):.0f}", refresh=False)
    return stats, writer.close(), time.perf_counter() - t0


def _count_rows(paths: list[Path]) -> int:
    from sparseforge.toolchain.safetensors_io import SafetensorsFile

    return sum(SafetensorsFile(p).shape("token")[0] for p in paths)


def graph_with_taps(ir: ModelIR, directory: Path) -> tuple[Path, list[FFNBlock]]:
    """The ONNX graph to observe and blocks naming its FFN values: the IR's own graph when
    every block names its values there, else a graph built from the IR."""
    if ir.graph and all(b.input_value and b.activation_value for b in ir.blocks):
        return Path(ir.graph), ir.blocks
    from sparseforge.toolchain.onnx_builder import build_onnx

    built = build_onnx(ir, directory)
    return Path(built.ir.graph), built.ir.blocks
