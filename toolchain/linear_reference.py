"""The linear reference of a layer's neuron predictability at a given rank.

A predictor of rank ``r`` costs what a linear map ``d -> r -> n`` costs. Which density
such a map reaches at the recall target shows whether a layer that no trained predictor
fits (``predictors`` pass: "no rank reached recall ... at density <= ...") is hard to
predict at that rank, or undertrained. :func:`linear_reference` fits, on the training
rows, the least-squares map with intercept from the FFN input ``x [S, d]`` to the
pre-activation ``z [S, n]`` whose sign decides activity (the up projection of an ungated
ReLU FFN, the gate of a ReLU-gated one), restricted to rank ``r`` (reduced-rank
regression: the full fit projected onto the top ``r`` right singular vectors of its
fitted values, the least-squares optimum among rank-``r`` linear maps). On the held-out
rows it calibrates one threshold for the recall target (as the predictors pass does)
and reports the predicted density. It optimises squared error, not density at recall,
so it is a reference point, not a bound. :func:`sparsity_sweep` asks the same question at
other activation thresholds: how the density ratio the rank affords changes with the
layer's sparsity.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .predictor import calibrate_threshold, mask_metrics


def _fit(x: np.ndarray, z: np.ndarray, split: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The full least-squares map with intercept fitted on the training rows ``split[0]``:
    its held-out fitted values ``[H, n]`` and the right singular vectors ``[k, n]`` of its
    training fitted values (rank ``r`` keeps the first ``r``)."""
    train, held = split
    if len(train) <= x.shape[1] + 1:
        raise ValueError(f"need more than {x.shape[1] + 1} training rows for a linear fit, got {len(train)}")

    def design(rows: np.ndarray) -> np.ndarray:
        return np.hstack([np.asarray(x[rows], np.float64), np.ones((len(rows), 1))])

    q, r_ = np.linalg.qr(design(train))
    qz = q.T @ np.asarray(z[train], np.float64)  # [d + 1, n]: the fitted values are q @ qz
    coef = np.linalg.solve(r_, qz)               # the full least-squares map [d + 1, n]
    _, _, vt = np.linalg.svd(qz, full_matrices=False)
    return design(held) @ coef, vt


def _at_recall(full: np.ndarray, vt: np.ndarray, rank: int, act: np.ndarray, recall: float) -> dict[str, Any]:
    """Held-out figures of the rank-``rank`` map thresholded for ``recall`` against ``act``."""
    v = vt[:rank]
    score = ((full @ v.T) @ v).astype(np.float32)  # the thresholds' arithmetic (calibrate_threshold)
    m = mask_metrics(score >= calibrate_threshold(score, act, recall), act)
    return {"rank": int(rank), **m.to_dict(), "density_ratio": m.density / m.true_density if m.true_density else None}


def linear_reference(x: np.ndarray, z: np.ndarray, active: np.ndarray, split: tuple[np.ndarray, np.ndarray],
                     ranks: list[int], recall: float) -> list[dict[str, Any]]:
    """Per rank in ``ranks``: held-out ``recall``, ``precision``, ``density``,
    ``true_density`` and ``density_ratio`` (predicted / true) of the rank-``r`` least-squares
    linear predictor of ``z [S, n]`` from ``x [S, d]``, thresholded for ``recall`` on the
    held-out rows ``split[1]`` (fitted on ``split[0]``); ``active [S, n]`` the true mask."""
    full, vt = _fit(x, z, split)
    act = np.asarray(active[split[1]], bool)
    return [_at_recall(full, vt, rank, act, recall) for rank in ranks]


def sparsity_sweep(x: np.ndarray, z: np.ndarray, split: tuple[np.ndarray, np.ndarray], rank: int,
                   densities: list[float], recall: float) -> list[dict[str, Any]]:
    """How the rank-``rank`` reference fares if the layer were sparser or denser: per
    target density ``q`` in ``densities``, activity is redefined as ``z > t`` with ``t``
    the ``1 - q`` quantile of the training rows' ``z`` (one threshold for the layer, as a
    FATReLU shift sets), and the figures of :func:`linear_reference` are reported on the
    held-out rows, plus ``target_density`` and ``threshold``. The map is the same at every
    ``q`` (it fits ``z``, not the mask), so only the activity it must find changes."""
    full, vt = _fit(x, z, split)
    train, held = split
    zt = np.asarray(z[train], np.float64)
    zh = np.asarray(z[held], np.float64)
    out = []
    for q in densities:
        if not 0.0 < q < 1.0:
            raise ValueError(f"target densities must be in (0, 1), got {q}")
        t = float(np.quantile(zt, 1.0 - q))
        out.append({"target_density": float(q), "threshold": t, **_at_recall(full, vt, rank, zh > t, recall)})
    return out
