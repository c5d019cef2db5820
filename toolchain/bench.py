"""``sparseforge bench``: speed of an artifact in the runtime against dense onnxruntime.

Everything is measured in one process and one run, so the ratios compare like with
like on the same machine state:

* decoders - prefill tokens/s (one ``prompt_tokens`` prompt through ``forward``) and
  decode tokens/s (``decode_tokens`` greedy steps with the KV cache) per runtime mode
  (default ``dense`` and ``sparse``), the fraction of decode time spent in predictors,
  the FFN density computed, and onnxruntime on a dense float32 graph of the same model
  (:mod:`.runtime_ort`; or the graphs given in ``ort_graphs``): prefill of the same
  prompt and, as its decode figure, ``decode_tokens`` one-token forwards timed together
  as the runtime's decode steps are (the graph has no KV cache: this is the weight-bound
  cost of a decode step without the attention over the past, which favours onnxruntime);
* encoders - embeddings/s and tokens/s per sequence length for batches of ``batch``
  sequences, per mode and for onnxruntime;
* peak RSS of the process (runtime and onnxruntime sessions together) and the RSS
  after loading the runtime, before any onnxruntime session exists.

Each timing is the best of ``repeats`` (after a warm-up that compiles the kernels).
``ratios`` divides throughputs: ``sparse_vs_dense``, ``sparse_vs_ort``, ...
"""
from __future__ import annotations

import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import InputError
from .instruments import rss_bytes

DEFAULT_MODES = ("dense", "sparse")
#: encoder sequence lengths timed when none are given (those within the model's positions)
DEFAULT_SEQ_LENS = (16, 64, 128)


def _best(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cpu_description() -> dict[str, Any]:
    """What the figures were measured on: the CPU's model name (``/proc/cpuinfo``, else
    ``platform.processor()``; None when neither says), LLVM's name for the host CPU (what
    Numba compiles for, e.g. ``znver4``) and the per-core data cache sizes in bytes by
    level (``L1d``, ``L2``, ``L3``: the caches cpu0 uses, from sysfs; empty where it is
    absent; glibc's L3 is the whole socket's)."""
    import llvmlite.binding as llvm

    model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    caches: dict[str, int] = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction" and size[:-1].isdigit() and size[-1] in "KMG":
            caches[f"L{level}d" if kind == "Data" else f"L{level}"] = int(size[:-1]) << {"K": 10, "M": 20, "G": 30}[size[-1]]
    return {"model": model, "llvm_cpu": llvm.get_host_cpu_name(), "cache_bytes": caches}


def machine() -> dict[str, Any]:
    import numba
    import onnxruntime

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"cpu_count": os.cpu_count(), "processor": platform.machine(), "cpu": cpu_description(),
            "numba_threads": numba.get_num_threads(), "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "load_average_1m": load}


def _prompt_ids(model, n: int, seed: int) -> np.ndarray:
    """``n`` token ids: the default calibration text through the artifact's tokenizer, or seeded random ids."""
    tok = model.tokenizer
    vocab = model.spec.vocab_size
    if tok is not None:
        from .calibration import default_calibration_path, load_documents

        tok.no_truncation()
        tok.no_padding()
        ids = tok.encode(" ".join(load_documents(default_calibration_path())[:8]), add_special_tokens=False).ids
        ids = np.asarray([i for i in ids if i < vocab], np.int64)
        if ids.size >= n:
            return ids[:n]
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int64)


def bench(artifact: str | Path, *, modes: tuple[str, ...] = DEFAULT_MODES, prompt_tokens: int = 32,
          decode_tokens: int = 32, seq_lens: tuple[int, ...] | None = None, batch: int = 8, repeats: int = 3,
          ort: bool = True, ort_graphs: dict[str, str | Path] | None = None, reference: str | Path | None = None,
          threads: int | None = None, seed: int = 0, linear: str = "auto", kv_cache: str = "f32") -> dict[str, Any]:
    """Benchmark ``artifact`` (see the module docstring); returns the JSON-able report.

    ``seq_lens``: encoder sequence lengths (None: those of :data:`DEFAULT_SEQ_LENS` within
    the model's positions); a length, or a decoder's ``prompt_tokens + decode_tokens``,
    beyond the model's positions is an :class:`~.errors.InputError`.

    ``ort_graphs``: name -> ONNX file to time instead of the float32 graph built from the
    artifact (e.g. a MatMulNBits model); ``reference``: build the baseline from this
    model (checkpoint / ONNX / IR) instead of the artifact; ``ort=False`` skips it.
    ``threads``: threads for the runtime (Numba, BLAS) and onnxruntime alike (None: all
    cores); ``kv_cache``: a decoder's KV cache type (``f32``, ``f16``)."""
    with thread_limit(threads):
        return _bench(artifact, modes, prompt_tokens, decode_tokens, seq_lens, batch, repeats, ort, ort_graphs,
                      reference, threads, seed, linear, kv_cache)


class thread_limit:
    """Context: at most ``threads`` threads for the Numba kernels and BLAS (None: unchanged).
    On a loaded machine fewer threads can be much faster: every parallel region waits for
    all its threads to be scheduled."""

    def __init__(self, threads: int | None) -> None:
        self.threads, self._saved, self._blas = threads, None, None

    def __enter__(self) -> "thread_limit":
        if self.threads:
            import numba

            self._saved = numba.get_num_threads()
            numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))
            try:
                from threadpoolctl import threadpool_limits

                self._blas = threadpool_limits(self.threads)
            except ImportError:  # BLAS keeps its own thread count
                self._blas = None
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            import numba

            numba.set_num_threads(self._saved)
        if self._blas is not None:
            self._blas.restore_original_limits()


def _bench(artifact, modes, prompt_tokens, decode_tokens, seq_lens, batch, repeats, ort, ort_graphs, reference,
           threads, seed, linear, kv_cache) -> dict[str, Any]:
    from .runtime import LoadedModel, runtime_for

    model = LoadedModel.open(artifact, linear=linear)
    positions = model.spec.max_positions  # lengths are checked before the weights are loaded
    if model.spec.causal:
        length, what = prompt_tokens + decode_tokens, f"{prompt_tokens} prompt + {decode_tokens} decode tokens are"
    else:
        if seq_lens is None:
            seq_lens = tuple(L for L in DEFAULT_SEQ_LENS if L <= positions) or (positions,)
        length, what = max(seq_lens), f"sequence length {max(seq_lens)} is"
    if length > positions:
        model.close()
        raise InputError(model.artifact.path, f"{what} beyond the model's {positions} positions")
    model.warm()
    rss_runtime = rss_bytes() / 2**20
    report: dict[str, Any] = {"artifact": str(model.artifact.path), "family": model.spec.family,
                              "architecture": model.spec.architecture, "linear": model.linear_mode,
                              "ffn_formats": sorted({lay.fmt for lay in model.artifact.layouts}),
                              "machine": machine(), "repeats": repeats, "threads": threads}
    runtimes = {m: runtime_for(model, m, kv_cache=kv_cache) for m in modes}
    report["layer_modes"] = {m: rt.ffn.modes for m, rt in runtimes.items()}
    if model.spec.causal:
        ids = _prompt_ids(model, prompt_tokens + decode_tokens, seed)
        report["prompt_tokens"], report["decode_tokens"], report["kv_cache"] = prompt_tokens, decode_tokens, kv_cache
        report["runtime"] = {m: _bench_decoder(rt, ids[:prompt_tokens], decode_tokens, repeats)
                             for m, rt in runtimes.items()}
    else:
        ids = _prompt_ids(model, max(seq_lens) * batch, seed)
        report["batch"], report["seq_lens"] = batch, list(seq_lens)
        report["runtime"] = {m: _bench_encoder(rt, ids, seq_lens, batch, repeats) for m, rt in runtimes.items()}
    report["rss_after_runtime_load_mb"] = rss_runtime
    if ort:
        report["onnxruntime"] = _bench_ort(model, report, ids, ort_graphs, reference, threads, repeats,
                                           prompt_tokens, decode_tokens, seq_lens, batch)
    report["peak_rss_mb"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_bytes() / 2**20,
                                rss_runtime)
    report["ratios"] = ratios(report)
    model.close()
    return report


def _bench_decoder(rt, prompt: np.ndarray, n_decode: int, repeats: int) -> dict[str, Any]:
    warm = rt.new_cache()
    rt.forward(prompt[: min(4, prompt.size)], warm)
    for t in prompt[:2]:
        rt.forward([t], warm)
    t_prefill = _best(lambda: rt.forward(prompt, rt.new_cache()), repeats)
    best_decode, pred_s, density = float("inf"), 0.0, None
    for _ in range(max(1, repeats)):
        cache = rt.new_cache(prompt.size + n_decode + 1)
        logits = rt.forward(prompt, cache)
        rt.ffn.reset_stats()
        t0 = time.perf_counter()
        for _ in range(n_decode):
            logits = rt.forward([int(np.argmax(logits))], cache)
        dt = time.perf_counter() - t0
        if dt < best_decode:
            best_decode, pred_s, density = dt, rt.ffn.predictor_s, rt.ffn.density()
    return {"prefill_tokens_per_s": prompt.size / t_prefill, "prefill_s": t_prefill,
            "decode_tokens_per_s": n_decode / best_decode, "decode_s_per_token": best_decode / n_decode,
            "predictor_overhead": pred_s / best_decode, "ffn_density": density,
            "mean_ffn_density": float(np.nanmean(density)), "kv_cache_bytes": cache.nbytes}


def _batches(ids: np.ndarray, L: int, batch: int) -> np.ndarray:
    return ids[: L * batch].reshape(batch, L)


def _bench_encoder(rt, ids: np.ndarray, seq_lens: tuple[int, ...], batch: int, repeats: int) -> dict[str, Any]:
    out = {}
    rt.embed_ids(_batches(ids, min(seq_lens), batch)[:2])  # compile
    for L in seq_lens:
        x = _batches(ids, L, batch)
        rt.ffn.reset_stats()
        t = _best(lambda: rt.embed_ids(x), repeats)
        out[str(L)] = {"embeddings_per_s": batch / t, "tokens_per_s": batch * L / t, "seconds": t,
                       "mean_ffn_density": float(np.nanmean(rt.ffn.density()))}
    return out


def _bench_ort(model, report, ids, ort_graphs, reference, threads, repeats, prompt_tokens, decode_tokens,
               seq_lens, batch):
    from .ffn_tap import FFNTap
    from .runtime_ort import ort_session

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sparseforge-bench-") as tmp:
        sessions: dict[str, Any] = {}
        if ort_graphs:
            for name, g in ort_graphs.items():
                try:
                    sessions[name] = FFNTap(Path(g), [], threads=threads)
                except Exception as exc:  # onnx / onnxruntime raise their own types for a bad file
                    raise InputError(g, f"--ort-graph {name}: not a loadable ONNX model ({type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        elif reference is not None:
            from .verify import load_reference

            sessions["ort_f32"] = ort_session(load_reference(reference, model.spec), Path(tmp), threads)
        else:
            sessions["ort_f32"] = ort_session(model, Path(tmp), threads)
        for name, sess in sessions.items():
            if model.spec.causal:
                p = ids[None, :prompt_tokens]
                one = ids[None, :1]
                run = sess.run_with_output
                run(p[:, :4], np.ones((1, 4), np.int64))
                t_prefill = _best(lambda: run(p, np.ones_like(p)), repeats)
                mask = np.ones_like(one)

                def steps() -> None:  # as many steps as the runtime's decode, timed together
                    for _ in range(decode_tokens):
                        run(one, mask)
                t_step = _best(steps, repeats) / decode_tokens
                out[name] = {"prefill_tokens_per_s": prompt_tokens / t_prefill, "prefill_s": t_prefill,
                             "decode_tokens_per_s": 1.0 / t_step, "decode_s_per_token": t_step}
            else:
                res = {}
                sess.run_with_output(_batches(ids, min(seq_lens), 2), np.ones((2, min(seq_lens)), np.int64))
                for L in seq_lens:
                    x = _batches(ids, L, batch)
                    t = _best(lambda: sess.run_with_output(x, np.ones_like(x)), repeats)
                    res[str(L)] = {"embeddings_per_s": batch / t, "tokens_per_s": batch * L / t, "seconds": t}
                out[name] = res
            del sess
        sessions.clear()
    return out


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    """Throughput ratios: every runtime mode against ``dense`` and against each onnxruntime baseline."""
    rt, ort = report.get("runtime", {}), report.get("onnxruntime", {})
    out: dict[str, Any] = {}
    if report.get("family") != "bert":
        keys = ("decode_tokens_per_s", "prefill_tokens_per_s")
        for m, r in rt.items():
            for k in keys:
                phase = k.split("_")[0]
                if m != "dense" and "dense" in rt:
                    out[f"{phase}_{m}_vs_dense"] = r[k] / rt["dense"][k]
                for name, o in ort.items():
                    out[f"{phase}_{m}_vs_{name}"] = r[k] / o[k]
    else:
        for m, r in rt.items():
            for L, row in r.items():
                if m != "dense" and "dense" in rt:
                    out[f"embed{L}_{m}_vs_dense"] = row["embeddings_per_s"] / rt["dense"][L]["embeddings_per_s"]
                for name, o in ort.items():
                    out[f"embed{L}_{m}_vs_{name}"] = row["embeddings_per_s"] / o[L]["embeddings_per_s"]
    return out


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few human-readable lines of a bench report."""
    lines = []
    rt, ort = report.get("runtime", {}), report.get("onnxruntime", {})
    if report.get("family") != "bert":
        for m, r in rt.items():
            lines.append(f"{m:<11} decode {r['decode_tokens_per_s']:8.1f} tok/s  prefill "
                         f"{r['prefill_tokens_per_s']:8.1f} tok/s  FFN density {r['mean_ffn_density']:.3f}  "
                         f"predictor {100 * r['predictor_overhead']:.1f}% of decode")
        for name, o in ort.items():
            lines.append(f"{name:<11} decode {o['decode_tokens_per_s']:8.1f} tok/s  prefill "
                         f"{o['prefill_tokens_per_s']:8.1f} tok/s")
    else:
        for m, r in [*rt.items(), *ort.items()]:
            lines.append(f"{m:<11} " + "  ".join(f"L{L}: {row['embeddings_per_s']:7.1f} emb/s" for L, row in r.items()))
    lines.append("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in report.get("ratios", {}).items()))
    lines.append(f"peak RSS {report['peak_rss_mb']:.0f} MiB (runtime alone {report['rss_after_runtime_load_mb']:.0f} MiB), "
                 f"load {report['machine']['load_average_1m']}")
    return lines
