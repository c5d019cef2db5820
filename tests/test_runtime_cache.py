"""The decoder runtime's KV cache against the positions a query may attend: every one
before it, or its sliding window's (its own and the ``window - 1`` before it, as
:func:`~sparseforge.toolchain.reference.llama.causal_mask`), over prompt chunks and
decode steps that wrap a window's ring several times."""
from __future__ import annotations

import numpy as np
import pytest

from sparseforge.toolchain.reference.llama import causal_mask
from sparseforge.toolchain.runtime_cache import DecoderCache

KV, HD = 2, 3
CHUNKS = [5, 1, 1, 9, 1, 3, 1, 1, 17, 1]  # 40 positions: prompt chunks (> 1) and decode steps (1)


def _keys(positions: np.ndarray) -> np.ndarray:
    """Keys ``[KV, T, HD]`` that name their position (and head)."""
    return (positions[None, :, None] + 1000.0 * np.arange(KV)[:, None, None]
            + np.zeros((1, 1, HD))).astype(np.float32)


def _attended(window: int, position: int) -> np.ndarray:
    """The positions the query at ``position`` attends, in order."""
    return np.flatnonzero(causal_mask(np.array([position]), position + 1, window or None)[0])


@pytest.mark.parametrize("dtype", ["f32", "f16"])  # (positions up to 2048 are exact in float16)
@pytest.mark.parametrize("max_length", [None, 40])
@pytest.mark.parametrize("window", [0, 1, 4, 16, 24])  # 24: a ring grown to its window
def test_cache_gives_each_query_its_window(window, max_length, dtype):
    cache = DecoderCache([window, 0], KV, HD, max_length, dtype)
    pos = 0
    for t in CHUNKS:
        new = np.arange(pos, pos + t)
        if t == 1:  # a decode step writes its key into `slot`, then reads rows 0 .. count - 1
            for layer, w in ((0, window), (1, 0)):
                k, v, slot, count = cache.step(layer)
                assert k.dtype == v.dtype == {"f32": np.float32, "f16": np.uint16}[dtype]  # the kernel's types
                k, v = (k, v) if dtype == "f32" else (k.view(np.float16), v.view(np.float16))
                k[:, slot], v[:, slot] = _keys(new)[:, 0], -_keys(new)[:, 0]
                assert slot < count == _attended(w, pos).size
                np.testing.assert_array_equal(np.sort(k[0, :count, 0]), _attended(w, pos))  # any order
                np.testing.assert_array_equal(v[:, :count], -k[:, :count])
        else:
            for layer, w in ((0, window), (1, 0)):
                k, v, first = cache.extend(layer, _keys(new), -_keys(new))
                assert k.dtype == v.dtype == np.float32 and first == (max(pos - w, 0) if w else 0)
                np.testing.assert_array_equal(k, _keys(np.arange(first, pos + t)))  # oldest first
                np.testing.assert_array_equal(v, -k)
                # every new query's window is among them (the mask picks it)
                assert set(_attended(w, pos)) <= set(range(first, pos + t))
        pos += t
        assert cache.length == pos
    rows_full = 40 if max_length else 64  # grown 16 -> 32 -> 64
    assert cache.nbytes == 2 * KV * HD * {"f32": 4, "f16": 2}[dtype] * ((window or rows_full) + rows_full)
    if max_length:
        with pytest.raises(ValueError, match="41 positions > max_length 40"):
            cache.step(0)


@pytest.mark.parametrize("window", [0, 3])
def test_f16_cache_gives_keys_rounded_to_nearest(window):
    """Keys and values as stored: float16's nearest (numpy's rounding), in what a prompt
    chunk gets back and in the rows a decode step reads; float32 keeps them exact."""
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((2, KV, 5, HD)).astype(np.float32)
    f16, f32 = DecoderCache([window], KV, HD, dtype="f16"), DecoderCache([window], KV, HD)
    got_k, got_v, _ = f16.extend(0, k, v)
    np.testing.assert_array_equal(got_k, k.astype(np.float16)[:, -len(got_k[0]):].astype(np.float32))
    np.testing.assert_array_equal(got_v, v.astype(np.float16)[:, -len(got_v[0]):].astype(np.float32))
    assert not np.array_equal(got_k, k[:, -len(got_k[0]):])
    stored, _, _, count = f16.step(0)
    held = np.sort(stored.view(np.float16)[:, :count - 1].astype(np.float32), axis=1)
    np.testing.assert_array_equal(held, np.sort(got_k[:, -(count - 1):], axis=1))
    np.testing.assert_array_equal(f32.extend(0, k, v)[0], k[:, -len(got_k[0]):])
    with pytest.raises(ValueError, match="KV cache type 'bf16': expected one of f32, f16"):
        DecoderCache([0], KV, HD, dtype="bf16")
