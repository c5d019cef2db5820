"""The decoder runtime's KV cache: one sequence's keys (after RoPE) and values per layer,
``[kv_heads, rows, head_dim]``, float32 or float16 (``f32`` / ``f16``, :data:`KV_DTYPES`;
llama.cpp's default is float16: half the bytes, and attention reads the keys and values
rounded to float16. A random Gemma 3 270M-shaped model's logits over 1600 positions move
by 6.4e-4 of their largest, the argmax at 1 position in 1600, as transformers' own do
with keys and values rounded so).

A full-attention layer keeps a row per position (row = position). A sliding-window layer
keeps only its ``window`` latest positions, in a ring: position ``p`` lives in row
``p mod window``, overwriting the position ``window`` before it, which no later query
attends. A decode step attends every filled row in row order: softmax attention is a sum
over its keys, so their order does not matter. Gemma 3 270M (15 of 18 layers sliding,
window 512, one kv head of 256) at 32768 positions keeps 207 MiB instead of 1152 MiB.
"""
from __future__ import annotations

import numpy as np

_FIRST_ROWS = 16  # rows of a cache without max_length before it first grows
#: the element types a cache can store keys and values in
KV_DTYPES = {"f32": np.float32, "f16": np.float16}


def check_kv_dtype(dtype: str) -> str:
    """``dtype`` if it is one of :data:`KV_DTYPES`, else ValueError."""
    if dtype not in KV_DTYPES:
        raise ValueError(f"KV cache type {dtype!r}: expected one of {', '.join(KV_DTYPES)}")
    return dtype


def kv_rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` (float32) as a cache of ``dtype`` gives it back: rounded to the nearest float16
    (ties to even) for ``f16``, float32 either way."""
    return x if check_kv_dtype(dtype) == "f32" else x.astype(KV_DTYPES[dtype]).astype(np.float32)


class DecoderCache:
    """Keys and values of every layer for ``windows[layer]`` (0: full attention) with
    ``kv_heads`` heads of ``head_dim``, stored as ``dtype`` (:data:`KV_DTYPES`). Storage
    grows geometrically (a ring layer up to its window), or is allocated at once for
    ``max_length`` positions; extending past ``max_length`` raises ``ValueError``."""

    def __init__(self, windows: list[int], kv_heads: int, head_dim: int, max_length: int | None = None,
                 dtype: str = "f32") -> None:
        self.windows, self.max_length, self.dtype = list(windows), max_length, check_kv_dtype(dtype)
        rows = [min(max_length if max_length is not None else _FIRST_ROWS, w or np.inf) for w in self.windows]
        self._k = [np.zeros((kv_heads, int(r), head_dim), KV_DTYPES[dtype]) for r in rows]
        self._v = [np.zeros_like(k) for k in self._k]
        self._lengths = [0] * len(self.windows)

    @property
    def length(self) -> int:
        """Number of positions seen (by every layer, after a complete forward)."""
        return min(self._lengths)

    @property
    def nbytes(self) -> int:
        """Bytes of key and value storage held."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self._k, self._v))

    def _reserve(self, layer: int, t: int) -> int:
        """Count ``t`` more positions in ``layer``, growing its rows if they do not fit
        (before a ring first wraps, so rows ``0 .. n-1`` are positions ``0 .. n-1``);
        returns the number of positions before them."""
        n, w = self._lengths[layer], self.windows[layer]
        if self.max_length is not None and n + t > self.max_length:
            raise ValueError(f"KV cache is full: {n + t} positions > max_length {self.max_length}")
        need = min(n + t, w) if w else n + t
        rows = self._k[layer].shape[1]
        if need > rows:
            grown = max(need, 2 * rows) if not w else min(max(need, 2 * rows), w)
            for store in (self._k, self._v):
                new = np.zeros((store[layer].shape[0], grown, store[layer].shape[2]), store[layer].dtype)
                new[:, :rows] = store[layer]
                store[layer] = new
        self._lengths[layer] = n + t
        return n

    def step(self, layer: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """One new position in ``layer``, for a decode step to write: that layer's storage
        ``k, v [kv_heads, rows, head_dim]`` (float32, or float16 as its bits, uint16: the
        attention kernel's types), the row ``slot`` of the new position and the number of
        rows ``count`` its query attends (rows ``0 .. count-1``: every position, or the
        window's latest ones, the new one included)."""
        n, w = self._reserve(layer, 1), self.windows[layer]
        k, v = self._k[layer], self._v[layer]
        if self.dtype == "f16":
            k, v = k.view(np.uint16), v.view(np.uint16)
        return k, v, (n % w if w else n), (min(n + 1, w) if w else n + 1)

    def extend(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Append the keys and values ``[kv_heads, T, head_dim]`` (float32) of ``T`` new
        positions to ``layer``; returns the keys and values a query among them may attend,
        oldest first, ``[kv_heads, S, head_dim]`` float32 as stored (:func:`kv_rounded`),
        and the position of the first (0, or for a ring the oldest it still held)."""
        T, w = k.shape[1], self.windows[layer]
        n = self._reserve(layer, T)
        ks, vs = self._k[layer], self._v[layer]
        k, v = kv_rounded(k, self.dtype), kv_rounded(v, self.dtype)
        if not w:
            ks[:, n:n + T], vs[:, n:n + T] = k, v
            return ks[:, :n + T].astype(np.float32, copy=False), vs[:, :n + T].astype(np.float32, copy=False), 0
        first = max(n - w, 0)
        held = np.arange(first, n) % w  # rows of the positions held, oldest first
        past_k, past_v = ks[:, held], vs[:, held]
        keep = min(T, w)  # the latest window of the new positions
        rows = np.arange(n + T - keep, n + T) % w
        ks[:, rows], vs[:, rows] = k[:, T - keep:], v[:, T - keep:]
        return (np.concatenate([past_k, k], axis=1, dtype=np.float32),
                np.concatenate([past_v, v], axis=1, dtype=np.float32), first)
