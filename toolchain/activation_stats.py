"""Streaming per-neuron activation statistics of one FFN layer.

The update is one fused Numba sweep (``kernels/stats.py``). Memory is fixed by the layer width and the histogram, never by the number of tokens:
``LayerStats`` holds six arrays of ``n_ff`` entries and one histogram of
``len(HIST_EDGES)`` bins however many batches it sees.

The magnitude histogram has fixed bins over |a|: ``[0, 1e-6)``, then 40 log-spaced
bins per decade up to 1e3, then ``[1e3, inf)``; bin k is ``[HIST_EDGES[k], HIST_EDGES[k+1])``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sparseforge.kernels.stats import accumulate, bin_table

HIST_EDGES = np.concatenate([[0.0], np.logspace(-6, 3, 9 * 40 + 1)])
_BIN_TABLE = bin_table(HIST_EDGES)


@dataclass
class LayerStats:
    """Running statistics of one layer's activations ``a`` [tokens, n_ff].

    ``count_active``: tokens with |a| > eps; ``count_positive``: tokens with a > 0;
    ``sum_abs`` (float64) and ``max_abs``: of |a|; ``hist``: counts of |a| per bin.
    """

    n_ff: int
    eps: float = 0.0
    tokens: int = 0
    count_active: np.ndarray = field(init=False)
    count_positive: np.ndarray = field(init=False)
    sum_abs: np.ndarray = field(init=False)
    max_abs: np.ndarray = field(init=False)
    hist: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.count_active = np.zeros(self.n_ff, np.int64)
        self.count_positive = np.zeros(self.n_ff, np.int64)
        self.sum_abs = np.zeros(self.n_ff, np.float64)
        self.max_abs = np.zeros(self.n_ff, np.float32)
        self.hist = np.zeros(len(HIST_EDGES), np.int64)

    def update(self, a: np.ndarray) -> None:
        """Add the activations of real (non-padding) tokens, ``a`` [tokens, n_ff] float32."""
        if a.shape[0] == 0:
            return
        self.tokens += a.shape[0]
        accumulate(np.ascontiguousarray(a, dtype=np.float32), float(self.eps), HIST_EDGES, _BIN_TABLE,
                   self.count_active, self.count_positive, self.sum_abs, self.max_abs,
                   self.hist)

    def nbytes(self) -> int:
        """Bytes held by the accumulators (constant for a given layer width)."""
        return sum(x.nbytes for x in (self.count_active, self.count_positive, self.sum_abs, self.max_abs, self.hist))

    @property
    def frequency(self) -> np.ndarray:
        """Fraction of tokens on which each neuron is active (|a| > eps), [n_ff] float64."""
        return self.count_active / max(self.tokens, 1)

    @property
    def sparsity(self) -> float:
        """Fraction of (token, neuron) activations with |a| <= eps."""
        return 1.0 - float(self.count_active.sum()) / max(self.tokens * self.n_ff, 1)

    @property
    def positive_fraction(self) -> float:
        return float(self.count_positive.sum()) / max(self.tokens * self.n_ff, 1)

    def ranking(self) -> np.ndarray:
        """Neuron ids from hottest to coldest (by active count; ties by lower id), int32."""
        return np.lexsort((np.arange(self.n_ff), -self.count_active)).astype(np.int32)



def threshold_for_sparsity(hist: np.ndarray, target: float) -> float:
    """A magnitude t such that about ``target`` of the histogrammed |a| are <= t.

    Finds the bin where the cumulative fraction crosses ``target`` and interpolates
    log-linearly inside it (linearly in the first bin, [0, 1e-6)). Resolution: one bin
    is 6% wide in magnitude; the sparsity actually reached is measured afterwards."""
    total = int(hist.sum())
    if total == 0 or target <= 0:
        return 0.0
    cum = np.cumsum(hist) / total
    k = min(int(np.searchsorted(cum, target, side="left")), len(hist) - 1)
    below = cum[k - 1] if k > 0 else 0.0
    frac = 0.0 if hist[k] == 0 else min(max((target - below) * total / hist[k], 0.0), 1.0)
    lo = HIST_EDGES[k]
    hi = HIST_EDGES[k + 1] if k + 1 < len(HIST_EDGES) else lo * 10.0
    return float(hi * frac) if lo == 0.0 else float(lo * (hi / lo) ** frac)
