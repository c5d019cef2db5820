"""A decode step's attention over a long KV cache: float32 against float16 storage.

For each model shape (``tinyllama``: 22 layers, 32 query heads over 4 kv heads of 64;
``llama2-7b``: 32 layers, 32 kv heads of 128; ``--smoke``: 2 small layers) and context
length, it fills one :class:`~sparseforge.toolchain.runtime_cache.DecoderCache` per
cache type with the same random keys and values (every layer its own), then times one
token's attention through every layer (the runtime's ``attention_step`` kernel, the
decode step's code, layer after layer as a decode step runs them; the best of
``--reps``), against, in the same run:

* ``numpy``: the same attention in numpy over the float32 cache (``q K^T``, softmax,
  ``p V`` per kv group: what the runtime's prompt path does for one query),
* ``read``: reading the cache's bytes alone (a parallel Numba sum over every layer's
  keys and values, as 32-bit integers): the memory-bound floor of a step at this size, taken
  right before each timing (the machine's bandwidth drifts). ``read_fraction``: that
  floor over the kernel's time (1.0: as fast as the cache can be read).

Keys and values total ``2 x layers x kv_heads x context x head_dim`` elements; the
caches of every layer exceed the last-level cache from a few thousand positions on, so
each step reads them from memory. Writes ``results/kv_cache[_smoke].json`` and ``.png``
(beside this file, or ``--out``).

    python benchmarks/kv_cache.py [--shapes tinyllama,llama2-7b] [--contexts 512,2048,4096] [--reps 20] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numba
import numpy as np

from sparseforge.kernels.attention import attention_step
from sparseforge.toolchain.bench import machine
from sparseforge.toolchain.reference.bert import softmax
from sparseforge.toolchain.runtime_cache import KV_DTYPES, DecoderCache

SHAPES = {"tinyllama": dict(layers=22, heads=32, kv_heads=4, head_dim=64),
          "llama2-7b": dict(layers=32, heads=32, kv_heads=32, head_dim=128)}
SMOKE_SHAPES = {"smoke": dict(layers=2, heads=4, kv_heads=2, head_dim=16)}


# not cache=True: this file is loaded by path in the smoke test (see benchmarks/kernels.py)
@numba.njit
def _sum_words(a):
    """Wrapping sum of the uint32 words of ``a`` (a loop LLVM vectorises)."""
    s = np.uint32(0)
    for i in range(a.size):
        s += a[i]
    return s


@numba.njit(parallel=True)
def _read(a):
    """:func:`_sum_words` of ``a`` (flat uint32) in 64 slices on all threads: a read of its
    bytes. Each slice goes to a function of its own: a ``range(lo, hi)`` loop inline in
    the ``prange`` body is not vectorised (``benchmarks/kernels.py``)."""
    n, chunks = a.size, 64
    parts = np.zeros(chunks, np.uint32)
    for c in numba.prange(chunks):
        parts[c] = _sum_words(a[c * n // chunks:(c + 1) * n // chunks])
    return parts.sum()


def _filled(shape: dict, context: int, dtype: str, seed: int) -> DecoderCache:
    """A cache of ``context`` positions (room for one more) of random keys and values."""
    cache = DecoderCache([0] * shape["layers"], shape["kv_heads"], shape["head_dim"], context + 1, dtype)
    rng = np.random.default_rng(seed)
    for layer in range(shape["layers"]):
        k, v = rng.standard_normal((2, shape["kv_heads"], context, shape["head_dim"]), np.float32)
        cache.extend(layer, k, v)
    return cache


def _storage(cache: DecoderCache, layers: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each layer's storage as the kernel takes it. ``step`` counts the new position;
    the timings below overwrite that row again and again."""
    return [cache.step(layer)[:2] for layer in range(layers)]


def _best(fn, reps: int, before=None) -> tuple[float, list[float]]:
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def bench_context(shape: dict, context: int, reps: int, seed: int) -> dict:
    """Timings of one step's attention over ``context`` cached positions, per cache type
    (one cache held at a time), and numpy's over the float32 one."""
    H, KV, hd = shape["heads"], shape["kv_heads"], shape["head_dim"]
    rng = np.random.default_rng(seed + 1)
    q, k, v = (rng.standard_normal(n, np.float32) for n in (H * hd, KV * hd, KV * hd))
    out: dict = {}
    for dtype in KV_DTYPES:
        out.update(_bench_type(shape, context, dtype, reps, seed, q, k, v))
    out["f16_speedup"] = out["f32"]["step_s"] / out["f16"]["step_s"]
    out["f16_bytes_ratio"] = out["f16"]["kv_cache_bytes"] / out["f32"]["kv_cache_bytes"]
    out["f32_vs_numpy"] = out["numpy_f32"]["step_s"] / out["f32"]["step_s"]
    return out


def _bench_type(shape: dict, context: int, dtype: str, reps: int, seed: int, q: np.ndarray, k: np.ndarray,
                v: np.ndarray) -> dict:
    """``{dtype: timings}`` of the kernel over a cache of ``dtype``, and for ``f32`` numpy's
    (``numpy_f32``) and its largest difference from the kernel's output."""
    H, KV, hd = shape["heads"], shape["kv_heads"], shape["head_dim"]
    cos, sin = np.ones(hd, np.float32), np.zeros(hd, np.float32)
    scale, nocap = np.float32(hd ** -0.5), np.float32(0)
    cache = _filled(shape, context, dtype, seed)
    layers = _storage(cache, shape["layers"])
    ctx = np.empty(H * hd, np.float32)

    def step():
        for kc, vc in layers:
            attention_step(q, k, v, cos, sin, kc, vc, context, context + 1, scale, nocap, ctx)

    def read():
        for kc, vc in layers:
            _read(kc.reshape(-1).view(np.uint32))
            _read(vc.reshape(-1).view(np.uint32))

    step()
    read()
    reads: list[float] = []
    kernel_s, kernel_reps = _best(step, reps, before=lambda: reads.append(_best(read, 1)[0]))
    out = {dtype: {"step_s": kernel_s, "step_reps_s": kernel_reps, "read_reps_s": reads,
                   "read_fraction": float(np.median(np.array(reads) / np.array(kernel_reps))),
                   "kv_cache_bytes": cache.nbytes, "ms_per_step": 1e3 * kernel_s}}
    if dtype == "f32":  # numpy over the same keys and values (the last layer's output compared)
        def numpy_step() -> np.ndarray:
            for kc, vc in layers:
                s = (q.reshape(KV, H // KV, hd) * scale) @ kc[:, :context + 1].transpose(0, 2, 1)
                res = (softmax(s) @ vc[:, :context + 1]).reshape(-1)
            return res

        out["kernel_vs_numpy_max_abs"] = float(np.abs(numpy_step() - ctx).max())
        numpy_s = _best(numpy_step, reps)[0]
        out["numpy_f32"] = {"step_s": numpy_s, "ms_per_step": 1e3 * numpy_s}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["shapes"]), figsize=(6 * len(results["shapes"]), 4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results["shapes"].items()):
        ctx = [int(c) for c in rows]
        for key, style in (("f32", "o-"), ("f16", "s-"), ("numpy_f32", "x--")):
            ax.plot(ctx, [rows[c][key]["ms_per_step"] for c in rows], style, label=f"{key} (attention_step)"
                    if key != "numpy_f32" else "numpy f32")
        for key in ("f32", "f16"):
            ax.plot(ctx, [1e3 * float(np.median(rows[c][key]["read_reps_s"])) for c in rows], ":",
                    label=f"read the {key} cache")
        ax.set(xscale="log", yscale="log", xlabel="context (positions)", ylabel="ms per decode step (all layers)",
               title=name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="tinyllama,llama2-7b")
    ap.add_argument("--contexts", default="512,2048,4096")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="Small layers, short contexts: a few seconds.")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    shapes = SMOKE_SHAPES if args.smoke else {s: SHAPES[s] for s in args.shapes.split(",")}
    contexts = [64, 200] if args.smoke else [int(c) for c in args.contexts.split(",")]
    results = {"machine": machine(), "reps": args.reps, "smoke": args.smoke, "numba_threads": numba.get_num_threads(),
               "shapes": {}}
    for name, shape in shapes.items():
        results["shapes"][name] = {}
        for c in contexts:
            row = bench_context(shape, c, args.reps, args.seed)
            row["shape"] = shape
            results["shapes"][name][str(c)] = row
            print(f"{name:<10} {c:>6} positions: f32 {row['f32']['ms_per_step']:7.2f} ms "
                  f"(read {row['f32']['read_fraction']:.2f}), f16 {row['f16']['ms_per_step']:7.2f} ms "
                  f"(read {row['f16']['read_fraction']:.2f}), numpy {row['numpy_f32']['ms_per_step']:7.2f} ms; "
                  f"f16 {row['f16_speedup']:.2f}x, {row['f16']['kv_cache_bytes'] / 2**20:.0f} MiB", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kv_cache_smoke" if args.smoke else "kv_cache"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / f"{stem}.png")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
