"""PNG plots for pass reports (matplotlib, Agg backend, deterministic bytes)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

_PNG_META = {"Software": None}  # no version string: same bytes on every run


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layer_bars(path: Path, first: Sequence[float], second: Sequence[float], labels: tuple[str, str],
                ylabel: str, title: str, legend_loc: str) -> None:
    """Two bars per layer (fractions in [0, 1]): ``first`` left, ``second`` right."""
    plt = _pyplot()
    layers = np.arange(len(first))
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.bar(layers - 0.2, first, width=0.4, label=labels[0])
    ax.bar(layers + 0.2, second, width=0.4, label=labels[1])
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_xticks(layers)
    ax.set_title(title)
    ax.legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata=_PNG_META)
    plt.close(fig)


def plot_layer_sparsity(path: Path, sparsity: Sequence[float], positive: Sequence[float], title: str) -> None:
    """Bar chart: per-layer fraction of zero (|a| <= eps) and of positive activations."""
    _layer_bars(path, sparsity, positive, ("sparsity (|a| <= eps)", "positive fraction (a > 0)"),
                "fraction of activations", title, "upper right")


def plot_frequency_distribution(path: Path, frequencies: Sequence[np.ndarray], title: str) -> None:
    """One curve per layer: the distribution (histogram) of neuron activation frequency."""
    plt = _pyplot()
    bins = np.linspace(0, 1, 51)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for layer, f in enumerate(frequencies):
        counts, _ = np.histogram(f, bins=bins)
        ax.plot(0.5 * (bins[1:] + bins[:-1]), counts / max(len(f), 1), label=f"layer {layer}", lw=1.2)
    ax.set_xlabel("activation frequency of a neuron (fraction of tokens)")
    ax.set_ylabel("fraction of neurons")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, metadata=_PNG_META)
    plt.close(fig)


def plot_before_after(path: Path, before: Sequence[float], after: Sequence[float], title: str) -> None:
    """Bar chart of per-layer FFN sparsity before and after a transformation."""
    _layer_bars(path, before, after, ("before", "after"), "FFN sparsity (fraction of zero activations)", title,
                "upper left")


def plot_tradeoff(path: Path, sparsity: Sequence[float], quality: Sequence[float], quality_label: str,
                  title: str) -> None:
    """The sparsity-vs-quality curve of a threshold sweep."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(sparsity, quality, marker="o")
    for s, q in zip(sparsity, quality):
        ax.annotate(f"{q:.3f}", (s, q), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel("mean FFN sparsity")
    ax.set_ylabel(quality_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata=_PNG_META)
    plt.close(fig)
