"""The plots of ``report.html`` that ``toolchain/plots.py`` does not already draw:
predictor recall and density per layer, quantization SQNR per tensor, throughput bars."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .plots import _PNG_META, _pyplot


def _finish(plt, fig, ax, path: Path, title: str, legend: dict | None = None) -> None:
    ax.set_title(title)
    if legend is not None:
        ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, metadata=_PNG_META)
    plt.close(fig)


def plot_predictors(path: Path, layers: Sequence[dict[str, Any]], title: str) -> None:
    """Per layer: held-out recall (line) and predicted vs true activation density (bars)."""
    plt = _pyplot()
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    dens = [r.get("density") or 0.0 for r in layers]
    true = [r.get("true_density") or 0.0 for r in layers]
    ax.bar(x - 0.2, dens, width=0.4, label="computed density")
    ax.bar(x + 0.2, true, width=0.4, label="true density")
    ax.plot(x, [r.get("recall") or 0.0 for r in layers], "k.-", label="recall")
    for i, r in enumerate(layers):
        label = f"r{r.get('rank')}" if r.get("mode") == "predictor" else str(r.get("mode"))
        ax.annotate(label, (i, 1.02), ha="center", fontsize=7)
    ax.set_ylim(0, 1.12)
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction")
    _finish(plt, fig, ax, path, title, {"fontsize": 7, "loc": "lower right"})


def plot_sqnr(path: Path, tensors: dict[str, dict[str, Any]], title: str) -> None:
    """SQNR (dB) of every quantized tensor, grouped and coloured by format."""
    plt = _pyplot()
    rows = sorted(((n, t) for n, t in tensors.items() if t.get("sqnr_db") is not None),
                  key=lambda kv: (kv[1]["format"], kv[0]))
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    formats = sorted({t["format"] for _, t in rows})
    for k, fmt in enumerate(formats):
        idx = [i for i, (_, t) in enumerate(rows) if t["format"] == fmt]
        ax.scatter(idx, [rows[i][1]["sqnr_db"] for i in idx], s=10, label=fmt, color=f"C{k}")
    ax.set_xlabel("tensor (grouped by format)")
    ax.set_ylabel("SQNR (dB)")
    ax.grid(alpha=0.3)
    _finish(plt, fig, ax, path, title, {"fontsize": 8} if formats else None)


def plot_throughput(path: Path, groups: dict[str, dict[str, float]], ylabel: str, title: str) -> None:
    """Grouped bars: ``groups[group][series] = value`` (e.g. phase -> mode -> tokens/s)."""
    plt = _pyplot()
    names = list(groups)
    series = sorted({s for g in groups.values() for s in g}, key=lambda s: (s.startswith("ort"), s))
    x = np.arange(len(names))
    w = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for k, s in enumerate(series):
        ax.bar(x - 0.4 + w * (k + 0.5), [groups[n].get(s, 0.0) for n in names], width=w, label=s)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylabel(ylabel)
    _finish(plt, fig, ax, path, title, {"fontsize": 8})
