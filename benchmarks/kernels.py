"""Benchmark the sparse FFN kernels against dense baselines and the bandwidth roofline.

For each FFN shape (Llama-2-7B d 4096 n 11008, Mistral-7B d 4096 n 14336; ``--smoke``: a
small shape in seconds), each format (f32, Q8_0, Q4_0) and density (1.0 0.5 0.2 0.1
0.05) it times, single-token decode, weights not cached (a different random neuron set
every repetition and a cache flush in between, twice the last-level cache and at least
64 MB; the best of ``--reps`` runs):

* ``dense matvec``: the ``[n, d]`` up matrix on its own (not in bundles) times x, through
  the runtime's ``Linear`` (what attention and output projections use): the "one weight
  matrix times one vector" of the targets,
* ``rows``: the up rows of the active neurons times x (the row-gather matvec over the
  bundles, reading one part of each),
* ``axpy``: the down columns of the active neurons (the down projection),
* ``ffn``: the whole sparse FFN, gate + up + down fused (ReLU gate, so the up and down
  rows are read only for positive gates: the gate rows are sign-flipped so that every
  gate is positive for the input, and every listed neuron costs its three parts),
* ``predictor``: predictor MLP (rank ``--rank``) + threshold selection, at 10% density.

Rows, axpy and FFN are timed twice: after the flush alone (code cold too: the flush also
evicts the interpreter's and the kernels' code), and as in a decode loop, weights cold and
code warm (after the flush, a tiny call through the same kernel on other data). The
speedups against the baselines use the first (the baselines are timed that way); the
roofline fractions use the second, the conditions of the bandwidth probe it is compared
with (the code-cold fractions are kept too: best code-cold time against the median probe
of the same part's code-warm repetitions); so does the predictor's share of the Q4_0 FFN.

Baselines in the same run: numpy dense f32 GEMV of the ``[n, d]`` matrix (OpenBLAS),
onnxruntime dense f32 FFN, onnxruntime MatMulNBits 4-bit (block 32, int8 compute) FFN, and a memory
bandwidth probe (parallel reads of 512 MB, in 4 KB and in 2 MB pages) right before every
repetition of the code-warm timings. The weights are in memory advised for 2 MB pages
(:func:`huge_zeros`), as the runtime's artifact map is. Roofline time = bytes touched / bandwidth; each repetition is compared with the
probe read just before it, and a roofline fraction is the median over the repetitions. The
bandwidth of this shared machine jumps between about 32 and 50 GB/s from one second to the
next (a run's probes: 27-57 GB/s, rarely lower), so a probe read minutes or even seconds
away from a timing can belong to another state: in one run, whose nine probes read 31-33
and 47-53 GB/s, the best timing against the best probe gave 0.66 and the paired median 0.75.
Writes ``results/kernels.json`` and ``results/kernels.png`` (beside this file, or
``--out``). Ratios are reported against numpy's dense f32 GEMV of the same matrix (the
targets of issue #7) and against the onnxruntime FFNs.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import sys
import time
from pathlib import Path

if "--threads" in sys.argv[:-1]:  # before numpy/numba start their thread pools
    _n = sys.argv[sys.argv.index("--threads") + 1]
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_var] = _n

import numba  # noqa: E402
import numpy as np  # noqa: E402

from sparseforge.kernels import quant
from sparseforge.kernels.bundle import BundleLayout
from sparseforge.kernels.runtime import LayerKernels, Predictor
from sparseforge.toolchain.artifact_gguf import advise_huge_pages
from sparseforge.toolchain.bench import cpu_description
from sparseforge.toolchain.runtime_load import Linear

SHAPES = {"llama-2-7b": (4096, 11008), "mistral-7b": (4096, 14336)}
SMOKE_SHAPES = {"smoke": (256, 704)}
DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05)
FORMATS = ("f32", "q8_0", "q4_0")


# not cache=True: a parallel function cached from a module loaded by path (the kernels
# benchmark test loads this file as a module without a package) records its module as
# "<dynamic>", and the next process fails to load the cache (ModuleNotFoundError)
@numba.njit(fastmath=True)
def _sum2(a):
    """Sum of ``a``, its two halves read together: two sequential streams, which read at
    least as fast as one here and often faster (summing 21 MB matrices on 2 threads: one
    stream each 9-22 GB/s, two 27-32 GB/s in the same runs)."""
    h = a.shape[0] // 2
    s = np.float32(0)
    t = np.float32(0)
    for i in range(h):
        s += a[i]
        t += a[h + i]
    for i in range(2 * h, a.shape[0]):
        s += a[i]
    return s + t


@numba.njit(parallel=True, fastmath=True)
def _read_sum(a):
    """Sum of ``a`` on all threads (the bandwidth probe and the cache flush). Each chunk
    is summed by its own function over a slice: a loop over ``range(lo, hi)`` of the
    whole array (inline in the ``prange`` body or not) is not vectorised and read at a
    fifth to two thirds of the bandwidth, so the probe underestimated it."""
    n = a.shape[0]
    chunks = 64
    parts = np.zeros(chunks, np.float32)
    for c in numba.prange(chunks):
        parts[c] = _sum2(a[c * n // chunks:(c + 1) * n // chunks])
    return parts.sum()


def flush_mb() -> int:
    """Megabytes the cache flush reads: twice the last-level cache (``/sys``, Linux), at
    least 64. On a 2-vCPU slice of a host with a 504 MB L3, a 64 MB flush left the Q8_0
    11008 x 4096 matrix (48 MB) in L3, and its "cold" matvec read 52 GB/s against a DRAM
    probe of 38."""
    return max(64, 2 * (max(cpu_description()["cache_bytes"].values(), default=0) >> 20))


def huge_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array in private anonymous memory advised for 2 MB pages (``MADV_HUGEPAGE``):
    the weights as the runtime reads them, from a GGUF map it advises the same way
    (``toolchain.artifact_gguf.advise_huge_pages``). With 4 KB pages the scattered f32 row
    gather reads a few percent slower (Llama-2-7B shape, 10%, kernels alternating: 0.73
    against 0.78 of the probe). Private: Python's ``mmap(-1, n)`` is shared memory, which
    gets 4 KB pages here whatever the advice."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    size = max(1, count * dtype.itemsize)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advise_huge_pages(buf, size)
    return np.frombuffer(buf, dtype, count).reshape(shape)


def huge_array(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` in :func:`huge_zeros` memory."""
    out = huge_zeros(a.shape, a.dtype)
    out[...] = a
    return out


class Timer:
    def __init__(self, reps: int, flush_mb: int) -> None:
        self.reps = reps
        self.medians: list[float] = []
        self.times: list[float] = []  # the last call's repetitions (s)
        self.flush = np.ones(flush_mb * (1 << 20) // 4, np.float32) if flush_mb else None

    def __call__(self, fn, setup=None, rewarm=None, probe: "Probe | None" = None) -> float:
        """Best (minimum) seconds of ``fn(setup(r))`` over the repetitions after one
        warm-up call: on a shared machine the minimum is the run least disturbed by other
        processes (medians are kept in ``self.medians``). ``rewarm``: called after each
        flush, a small call through the same code on other (tiny) data, so that only the
        weights are cold, as in a decode step (the flush also evicts the interpreter's and
        the kernels' code, which a decode loop keeps hot). ``probe``: read before each
        repetition's flush (the repetitions' seconds are kept in ``self.times``)."""
        fn(setup(0) if setup else None)
        times = []
        for r in range(self.reps):
            arg = setup(r + 1) if setup else None
            if probe is not None:
                probe()
            if self.flush is not None:
                _read_sum(self.flush)
                if rewarm is not None:
                    rewarm()
            t0 = time.perf_counter()
            fn(arg)
            times.append(time.perf_counter() - t0)
        self.times = times
        self.medians.append(float(np.median(times)))
        return float(np.min(times))


class Probe:
    """The bandwidth probe: each call reads two ``mb`` MB arrays, one in 4 KB pages and one
    advised for 2 MB pages (:func:`huge_array`, as the weights are), on all threads, with a
    parallel Numba sum and with numpy's sum, and keeps the best read bandwidth (bytes/s)."""

    def __init__(self, mb: int) -> None:
        small = np.ones(mb * (1 << 20) // 4, np.float32)
        self.arrays = (small, huge_array(small))
        self.samples: list[float] = []
        _read_sum(small)  # compiled before the first timed read

    def __call__(self) -> None:
        best = np.inf
        for a in self.arrays:
            for read in (_read_sum, np.sum):
                t0 = time.perf_counter()
                read(a)
                best = min(best, time.perf_counter() - t0)
        self.samples.append(self.arrays[0].nbytes / best)

    def take(self) -> list[float]:
        """The readings since the last take."""
        samples, self.samples = self.samples, []
        return samples


def _ort_session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = numba.get_num_threads()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_ffn_models(gate, up, down):
    """(f32 session, MatMulNBits 4-bit block-32 int8-compute session) of
    ``y = (relu(x Wg^T) * x Wu^T) Wd^T``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = up.shape[1]
    inits = [numpy_helper.from_array(np.ascontiguousarray(gate.T), "wg"),
             numpy_helper.from_array(np.ascontiguousarray(up.T), "wu"),
             numpy_helper.from_array(np.ascontiguousarray(down.T), "wd")]
    nodes = [helper.make_node("MatMul", ["x", "wg"], ["g"]), helper.make_node("Relu", ["g"], ["a"]),
             helper.make_node("MatMul", ["x", "wu"], ["u"]), helper.make_node("Mul", ["a", "u"], ["h"]),
             helper.make_node("MatMul", ["h", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    f32 = _ort_session(model)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # accuracy_level 4: int8 activations (what these kernels compute with); the default 0
    # computes in float32 and took twice as long (Llama-2-7B FFN: 12.7 against 6.8 ms)
    q = MatMulNBitsQuantizer(onnx.ModelProto.FromString(model.SerializeToString()), bits=4, block_size=32,
                             is_symmetric=True, accuracy_level=4)
    q.process()
    nbits = _ort_session(q.model.model)
    return f32, nbits


def bench_shape(name: str, d: int, n: int, timer: Timer, args, rng, probe: Probe) -> dict:
    print(f"[{name}] d={d} n={n}: building weights", flush=True)
    scale = np.float32(1 / np.sqrt(d))
    gate = (rng.standard_normal((n, d), dtype=np.float32) * scale)
    up = (rng.standard_normal((n, d), dtype=np.float32) * scale)
    down = (rng.standard_normal((d, n), dtype=np.float32) * np.float32(1 / np.sqrt(n)))
    x = rng.standard_normal(d, dtype=np.float32)
    # every gate positive for x (rows flipped where not): the fused FFN reads the gate, up
    # and down parts of every listed neuron, the work of an FFN at that density
    gate *= np.where(gate @ x < 0, np.float32(-1), np.float32(1))[:, None]
    up = huge_array(up)  # read by the dense baselines, in the pages the runtime's weights have
    res: dict = {"d_model": d, "n_neurons": n, "baselines": {}, "formats": {}}
    base = res["baselines"]
    base["numpy_dense_f32_gemv_s"] = timer(lambda _: up @ x)
    if not args.no_ort:
        f32s, nbits = ort_ffn_models(gate, up, down)
        feed = {"x": x[None]}
        base["ort_dense_f32_ffn_s"] = timer(lambda _: f32s.run(None, feed))
        base["ort_matmulnbits4_ffn_s"] = timer(lambda _: nbits.run(None, feed))
        del f32s, nbits
    np_gemv = base["numpy_dense_f32_gemv_s"]
    print(f"  numpy dense f32 GEMV {np_gemv * 1e3:.2f} ms; ort {base.get('ort_dense_f32_ffn_s', 0) * 1e3:.2f} ms; "
          f"ort 4-bit {base.get('ort_matmulnbits4_ffn_s', 0) * 1e3:.2f} ms", flush=True)
    for fmt in args.formats:
        lin = Linear(up if fmt == "f32" else huge_array(quant.encode(up, fmt)), fmt, (n, d), dequantize=False)
        t_mv = timer(lambda _: lin.matvec(x))
        del lin
        print(f"  {fmt:5s} dense matvec {t_mv * 1e3:7.3f} ms ({np_gemv / t_mv:5.2f}x numpy)", flush=True)
        lay = BundleLayout(fmt, d, n, True, align=64)
        blob = _pack(gate, up, down, lay)
        k = LayerKernels(blob, lay, activation="relu")
        pb = lay.part_bytes
        tw, xt = _twin_layer(fmt, rng)
        tidx, th = np.arange(8), np.ones(8, np.float32)
        rows_out: dict = {}
        for dens in args.densities:
            m = max(1, int(round(n * dens)))
            sets = [np.sort(rng.choice(n, m, replace=False)) for _ in range(8)]
            hs = rng.standard_normal(m, dtype=np.float32)
            t_rows = timer(lambda idx: k.rows(x, "up", idx), lambda r: sets[r % 8])
            t_axpy = timer(lambda idx: k.axpy(hs, idx), lambda r: sets[r % 8])
            t_ffn = timer(lambda idx: k.forward(x, idx), lambda r: sets[r % 8])
            # as in a decode step: weights cold, code warm (the roofline's conditions); each
            # repetition right after a bandwidth probe, whose reading is that repetition's roofline
            warm, probes, reps_s, fraction = {}, {}, {}, {}
            for part, nbytes, call, rewarm in (
                    ("rows", m * pb, lambda idx: k.rows(x, "up", idx), lambda: tw.rows(xt, "up", tidx)),
                    ("axpy", m * pb, lambda idx: k.axpy(hs, idx), lambda: tw.axpy(th, tidx)),
                    ("ffn", 3 * m * pb, lambda idx: k.forward(x, idx), lambda: tw.forward(xt))):
                warm[part] = timer(call, lambda r: sets[r % 8], rewarm=rewarm, probe=probe)
                probes[part], reps_s[part] = probe.take(), timer.times
                fraction[part] = float(np.median([nbytes / b / t for b, t in zip(probes[part], reps_s[part])]))
            bw = {part: float(np.median(p)) for part, p in probes.items()}
            row = {"active": m,
                   "rows_s": t_rows, "axpy_s": t_axpy, "ffn_s": t_ffn,
                   "rows_s_code_warm": warm["rows"], "axpy_s_code_warm": warm["axpy"], "ffn_s_code_warm": warm["ffn"],
                   "code_warm_reps_s": reps_s, "rows_bytes": m * pb, "ffn_bytes": m * 3 * pb,
                   "bandwidth_bytes_per_s": bw, "bandwidth_probes_bytes_per_s": probes,
                   "rows_roofline_fraction": fraction["rows"], "axpy_roofline_fraction": fraction["axpy"],
                   "ffn_roofline_fraction": fraction["ffn"],
                   "rows_roofline_fraction_code_cold": m * pb / bw["rows"] / t_rows,
                   "ffn_roofline_fraction_code_cold": m * 3 * pb / bw["ffn"] / t_ffn,
                   "rows_speedup_vs_numpy_gemv": np_gemv / t_rows,
                   "ffn_speedup_vs_numpy_gemv": np_gemv / t_ffn}
            if "ort_dense_f32_ffn_s" in base:
                row["ffn_speedup_vs_ort_f32_ffn"] = base["ort_dense_f32_ffn_s"] / t_ffn
                row["ffn_speedup_vs_ort_nbits4_ffn"] = base["ort_matmulnbits4_ffn_s"] / t_ffn
            rows_out[str(dens)] = row
            print(f"  {fmt:5s} density {dens:4.2f}: rows {t_rows * 1e3:7.3f} ms ({np_gemv / t_rows:5.2f}x numpy, "
                  f"{warm['rows'] * 1e3:.3f} ms code warm)  axpy {t_axpy * 1e3:7.3f} ms  "
                  f"ffn {t_ffn * 1e3:7.3f} ms ({np_gemv / t_ffn:5.2f}x numpy"
                  + (f", {row['ffn_speedup_vs_ort_f32_ffn']:5.2f}x ort f32, {row['ffn_speedup_vs_ort_nbits4_ffn']:5.2f}x "
                     f"ort 4-bit" if "ffn_speedup_vs_ort_f32_ffn" in row else "") + ")", flush=True)
        res["formats"][fmt] = {"bundle_stride": lay.stride, "part_bytes": pb, "dense_matvec_s": t_mv,
                               "dense_matvec_speedup_vs_numpy_gemv": np_gemv / t_mv, "densities": rows_out}
        del k, blob, tw
    # predictor eval + selection at 10% density against the sparse FFN at 10%
    r = args.rank
    pred = Predictor(rng.standard_normal((r, d), dtype=np.float32) * scale,
                     rng.standard_normal((n, r), dtype=np.float32) * np.float32(1 / np.sqrt(r)), threshold=0.0)
    lg = pred.logits(x)
    pred.threshold = float(np.quantile(lg, 0.9))
    t_pred = timer(lambda _: pred.select(x))
    twin = Predictor(rng.standard_normal((4, 64), dtype=np.float32), rng.standard_normal((64, 4), dtype=np.float32),
                     serial_below=pred.serial_below if pred.serial else 0)
    xt = rng.standard_normal(64, dtype=np.float32)
    t_pred_warm = timer(lambda _: pred.select(x), rewarm=lambda: twin.select(xt))
    at10 = {f: res["formats"][f]["densities"]["0.1"] for f in args.formats if "0.1" in res["formats"][f]["densities"]}
    res["predictor"] = {"rank": r, "format": pred.fmt, "seconds": t_pred, "seconds_code_warm": t_pred_warm,
                        "bytes": pred.nbytes, "selected_fraction": float(pred.select(x).size / n),
                        "fraction_of_sparse_ffn_10pct": {f: t_pred_warm / row["ffn_s_code_warm"]
                                                         for f, row in at10.items()},
                        "fraction_of_sparse_ffn_10pct_code_cold": {f: t_pred / row["ffn_s"] for f, row in at10.items()}}
    print(f"  predictor rank {r}: {t_pred * 1e3:.3f} ms, code warm {t_pred_warm * 1e3:.3f} ms; share of the FFN "
          f"{res['predictor']['fraction_of_sparse_ffn_10pct']}", flush=True)
    return res


def _twin_layer(fmt: str, rng) -> tuple[LayerKernels, np.ndarray]:
    """A tiny gated layer of format ``fmt`` whose dense forward runs the same kernel as a
    large layer's (the thread-pool one), and an input for it: the ``rewarm`` call."""
    d, n = 64, 64
    lay = BundleLayout(fmt, d, n, True, align=64)
    g, u, dn = (rng.standard_normal(s, dtype=np.float32) for s in ((n, d), (n, d), (d, n)))
    return LayerKernels(_pack(g, u, dn, lay), lay, activation="relu", serial_below=0), \
        rng.standard_normal(d, dtype=np.float32)


def _pack(gate, up, down, lay: BundleLayout) -> np.ndarray:
    """pack_bundles, written out here in row chunks to bound memory for 7B shapes."""
    from sparseforge.kernels.bundle import pack_bundles

    out = huge_zeros((lay.n_neurons, lay.stride), np.uint8)
    step = 2048
    for lo in range(0, lay.n_neurons, step):
        hi = min(lay.n_neurons, lo + step)
        sub = BundleLayout(lay.fmt, lay.d_model, hi - lo, lay.gated, lay.align)
        out[lo:hi] = pack_bundles(gate[lo:hi], up[lo:hi], down[:, lo:hi], sub)
    return out


def targets_summary(shape: dict) -> dict:
    """The issue #7 targets (ratios vs numpy dense f32 GEMV, in the same run) and whether each is met."""
    g = shape["baselines"]["numpy_dense_f32_gemv_s"]
    f = shape["formats"]

    def at(fmt, dens, key):
        return f.get(fmt, {}).get("densities", {}).get(str(dens), {}).get(key)

    checks = {}

    def add(name, value, goal):
        if value is not None:
            checks[name] = {"value": value, "goal": goal, "met": value >= goal}

    add("sparse f32 rows @10% vs numpy f32 GEMV (x)", g / at("f32", 0.1, "rows_s") if at("f32", 0.1, "rows_s") else None, 8.0)
    add("sparse f32 rows @10% roofline fraction", at("f32", 0.1, "rows_roofline_fraction"), 0.8)
    for fmt, goal in (("q8_0", 2.3), ("q4_0", 2.5)):
        add(f"{fmt.upper()} dense matvec vs numpy f32 GEMV (x)", f.get(fmt, {}).get("dense_matvec_speedup_vs_numpy_gemv"),
            goal)
    add("Q4_0 sparse rows @10% vs numpy f32 GEMV (x)", g / at("q4_0", 0.1, "rows_s") if at("q4_0", 0.1, "rows_s") else None, 14.0)
    add("Q4_0 whole sparse FFN @10% vs numpy f32 GEMV (x)", g / at("q4_0", 0.1, "ffn_s") if at("q4_0", 0.1, "ffn_s") else None, 3.6)
    add("f32 sparse FFN @10% vs ORT dense f32 FFN (x)", at("f32", 0.1, "ffn_speedup_vs_ort_f32_ffn"), 7.0)
    add("Q4_0 sparse FFN @10% vs ORT MatMulNBits FFN (x)", at("q4_0", 0.1, "ffn_speedup_vs_ort_nbits4_ffn"), 5.0)
    frac = shape.get("predictor", {}).get("fraction_of_sparse_ffn_10pct", {}).get("q4_0")
    if frac is not None:
        checks["predictor eval+selection / Q4_0 sparse FFN @10%"] = {"value": frac, "goal": 0.15, "met": frac <= 0.15}
    return checks


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(results["shapes"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
    for ax, name in zip(axes[0], shapes):
        s = results["shapes"][name]
        for fmt, fr in s["formats"].items():
            dens = sorted(float(k) for k in fr["densities"])
            ax.plot(dens, [fr["densities"][str(k)]["ffn_speedup_vs_numpy_gemv"] for k in dens], "o-",
                    label=f"{fmt} whole FFN")
            ax.plot(dens, [fr["densities"][str(k)]["rows_speedup_vs_numpy_gemv"] for k in dens], "s--",
                    label=f"{fmt} rows")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (active neurons)")
        ax.set_ylabel("speedup vs numpy dense f32 GEMV")
        ax.set_title(f"{name} (d {s['d_model']}, n {s['n_neurons']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="small shape, few repetitions (seconds)")
    ap.add_argument("--shapes", nargs="*", default=None, choices=list(SHAPES) + list(SMOKE_SHAPES))
    ap.add_argument("--formats", nargs="*", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--densities", nargs="*", type=float, default=list(DENSITIES))
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    ap.add_argument("--rank", type=int, default=64, help="predictor rank")
    ap.add_argument("--no-ort", action="store_true", help="skip the onnxruntime baselines")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for numba, OpenBLAS and onnxruntime (set before they start; default: all)")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    args = ap.parse_args(argv)
    shapes = SMOKE_SHAPES if args.smoke else {k: SHAPES[k] for k in (args.shapes or SHAPES)}
    if args.shapes and args.smoke:
        shapes = {k: {**SHAPES, **SMOKE_SHAPES}[k] for k in args.shapes}
    reps = args.reps or (3 if args.smoke else 9)
    flush = 0 if args.smoke else flush_mb()
    timer = Timer(reps, flush)
    rng = np.random.default_rng(args.seed)
    probe = Probe(32 if args.smoke else 512)
    print(f"{numba.get_num_threads()} threads", flush=True)
    results = {"machine": {"platform": platform.platform(), "cpu": cpu_description(), "cpus": os.cpu_count(),
                           "threads": numba.get_num_threads(), "load_average": list(os.getloadavg()), "flush_mb": flush},
               "reps": reps, "smoke": args.smoke, "shapes": {}}
    for name, (d, n) in shapes.items():
        results["shapes"][name] = bench_shape(name, d, n, timer, args, rng, probe)
    probes = [b for s in results["shapes"].values() for f in s["formats"].values() for row in f["densities"].values()
              for part in row["bandwidth_probes_bytes_per_s"].values() for b in part]
    results["machine"]["bandwidth_bytes_per_s"] = float(np.median(probes))  # the run's, for the record
    print(f"read bandwidth probes {min(probes) / 1e9:.1f}-{max(probes) / 1e9:.1f} GB/s, median "
          f"{results['machine']['bandwidth_bytes_per_s'] / 1e9:.1f}", flush=True)
    for name, s in results["shapes"].items():
        s["targets"] = targets_summary(s)
        print(f"[{name}] targets")
        for k, v in s["targets"].items():
            print(f"  {'MET ' if v['met'] else 'MISS'} {k}: {v['value']:.3f} (goal {v['goal']})")
    results["machine"]["load_average_after"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("kernels_smoke" if args.smoke else "kernels") + args.tag
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / f"{stem}.png")
    return results


if __name__ == "__main__":
    main()
