"""Fused activation-statistics kernels used by the profile pass.

``accumulate`` sweeps a layer's activations ``a`` [tokens, n_ff] float32 and updates,
per neuron, the counts of |a| > eps and of a > 0, the float64 sum and the max of |a|,
and the layer's |a| histogram over fixed ``edges`` (bin k = [edges[k], edges[k+1]), the
last bin open-ended: the bins of ``numpy.searchsorted(edges, |a|, "right") - 1``).

Per-neuron sums run over column chunks in parallel, in a branch-free loop LLVM
vectorises (``fastmath`` lets it reorder the float64 sums; activations must be finite).
The histogram runs over row chunks in parallel: the bin of a float32 comes without a
logarithm from a table indexed by its top 16 bits (exponent and 7 mantissa bits) holding
the bin of the smallest float with those bits; a bucket is narrower than a bin, so one
comparison with the next edge corrects it. Each chunk has its own histogram row, summed
at the end, so results do not depend on the thread count.
"""
from __future__ import annotations

import numba
import numpy as np

_COLS = 128
_ROWS = 64


def bin_table(edges: np.ndarray) -> np.ndarray:
    """Bin index of the smallest non-negative float32 in each of the 2^15 buckets of
    its top 16 bits (sign bit clear), [32768] int32."""
    lowest = (np.arange(1 << 15, dtype=np.uint32) << np.uint32(16)).view(np.float32)
    with np.errstate(invalid="ignore"):  # the NaN buckets; the kernel never looks them up
        lowest64 = lowest.astype(np.float64)
    return (np.searchsorted(edges, lowest64, side="right") - 1).astype(np.int32)


@numba.njit(cache=True, parallel=True, fastmath=True)
def _neuron_sums(a, eps, count_active, count_positive, sum_abs, max_abs):
    tokens, n = a.shape
    for c in numba.prange((n + _COLS - 1) // _COLS):
        lo = c * _COLS
        hi = min(lo + _COLS, n)
        act = np.zeros(hi - lo, np.int32)
        pos = np.zeros(hi - lo, np.int32)
        s = np.zeros(hi - lo, np.float64)
        m = max_abs[lo:hi].copy()
        for t in range(tokens):
            row = a[t, lo:hi]
            for j in range(hi - lo):
                x = row[j]
                v = abs(x)
                act[j] += np.int32(v > eps)
                pos[j] += np.int32(x > 0)
                s[j] += v
                m[j] = v if v > m[j] else m[j]
        count_active[lo:hi] += act
        count_positive[lo:hi] += pos
        sum_abs[lo:hi] += s
        max_abs[lo:hi] = m


@numba.njit(cache=True, parallel=True)
def _histogram(a, edges, table, hist):
    tokens, n = a.shape
    last = edges.shape[0] - 1
    n_chunks = (tokens + _ROWS - 1) // _ROWS
    local = np.zeros((n_chunks, hist.shape[0]), np.int64)
    bits = a.view(np.uint32)
    for c in numba.prange(n_chunks):
        for t in range(c * _ROWS, min(tokens, (c + 1) * _ROWS)):
            for j in range(n):
                u = bits[t, j] & np.uint32(0x7FFFFFFF)
                if u > np.uint32(0x7F800000):  # NaN sorts last, as in numpy
                    k = last
                else:
                    k = table[u >> np.uint32(16)]
                    if k < last and abs(a[t, j]) >= edges[k + 1]:
                        k += 1
                local[c, k] += 1
    for c in range(n_chunks):
        for k in range(hist.shape[0]):
            hist[k] += local[c, k]


def accumulate(a: np.ndarray, eps: float, edges: np.ndarray, table: np.ndarray, count_active: np.ndarray,
               count_positive: np.ndarray, sum_abs: np.ndarray, max_abs: np.ndarray, hist: np.ndarray) -> None:
    """Add ``a`` [tokens, n_ff] float32 (C-contiguous) to the accumulators, in place."""
    _neuron_sums(a, eps, count_active, count_positive, sum_abs, max_abs)
    _histogram(a, edges, table, hist)
