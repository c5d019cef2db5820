"""The runtimes' norm and softmax kernels against numpy (float64), and the decode-step
attention kernel against the decoders' numpy reference (apply_rope, softmax, grouped-query
attention over a cache's rows); numpy, the kernels and the numpy reference only, so that
``make test-arm`` runs them on emulated aarch64 too."""
from __future__ import annotations

import numpy as np
import pytest

from sparseforge.kernels.attention import add_layer_norm_rows, attention_step, rms_norm_into, row_max, softmax_rows
from sparseforge.toolchain.reference.bert import softmax
from sparseforge.toolchain.reference.rope import apply_rope, rope_cos_sin, rope_inv_freq


def test_rms_norm_into():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(96).astype(np.float32) * 3
    w = rng.standard_normal(96).astype(np.float32)
    out = np.empty_like(x)
    rms_norm_into(x, w, 1e-5, out)
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-5) * w
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_add_layer_norm_rows_against_float64_numpy():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((7, 96)) * 3 + 5).astype(np.float32)  # an offset mean: cancellation
    r = rng.standard_normal((7, 96)).astype(np.float32)
    w, b = rng.standard_normal((2, 96)).astype(np.float32)
    for res in (r, None):
        v = x.astype(np.float64) + (0 if res is None else res)
        c = v - v.mean(1, keepdims=True)
        want = c / np.sqrt((c * c).mean(1, keepdims=True) + 1e-12) * w + b
        out = np.empty_like(x)
        add_layer_norm_rows(x, np.zeros((0, 0), np.float32) if res is None else res, w, b, 1e-12, out)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_row_max_every_length_and_position():
    """The eight running maxima and the tail: the largest value at every position of rows
    of 1 to 19 floats (whole eights, tails, both)."""
    rng = np.random.default_rng(1)
    for n in range(1, 20):
        for at in range(n):
            x = -rng.random(n + 3).astype(np.float32)  # 3 values beyond n, larger than any within
            x[n:] = 5.0
            x[at] = 0.5
            assert row_max(x, n) == np.float32(0.5), (n, at)


def test_softmax_rows_against_float64_numpy():
    rng = np.random.default_rng(2)
    s = (rng.standard_normal((64, 100)) * 8).astype(np.float32)
    s[3, 50:] = np.finfo(np.float32).min  # masked keys, as the encoder adds them
    s[4, 1:] = s[4, 0] - 85  # one key far ahead of the rest: the others are e^-85, i.e. 0
    v = s.astype(np.float64)
    want = np.exp(v - v.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    got = s.copy()
    softmax_rows(got)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9)
    assert np.all(got[3, 50:] == 0) and np.all(got[4, 1:] == 0)
    tiny = got[(got != 0)]
    assert tiny.min() >= np.finfo(np.float32).tiny  # no subnormals (slow in the BLAS calls after)


HD = 16


# heads per kv group: 4; 7 (scores: three pairs and one alone; values: four, then three alone)
@pytest.mark.parametrize("heads", [(8, 2), (7, 1)])
@pytest.mark.parametrize("count", [1, 2, 6, 41])  # keys read: four at a time, then the rest
@pytest.mark.parametrize("ring", [False, True])  # the new row last (appended), or amid older rows (a ring)
@pytest.mark.parametrize("rotary, softcap", [(HD, 0.0), (HD // 4, 0.0), (HD, 0.5)])  # RoPE over a quarter of
@pytest.mark.parametrize("dtype", [np.float32, np.float16])  # the head; scores soft-capped (Gemma 2); the
def test_attention_step(count, heads, ring, rotary, softcap, dtype):  # cache in float32 or float16 (its bits)
    H, KV = heads
    rng = np.random.default_rng(count)
    q = rng.standard_normal(H * HD).astype(np.float32)
    k = rng.standard_normal(KV * HD).astype(np.float32)
    v = rng.standard_normal(KV * HD).astype(np.float32)
    cos, sin = rope_cos_sin(np.array([count + 7]), rope_inv_freq(rotary, 10000.0))
    # rows 0 .. count - 1 hold keys and values; the rows after them (unused capacity) are NaN
    k_store, v_store = np.full((2, KV, count + 3, HD), np.nan, dtype)
    k_store[:, :count], v_store[:, :count] = rng.standard_normal((2, KV, count, HD))
    slot = count // 2 if ring else count - 1
    ctx = np.empty_like(q)
    q0, k0, v0 = q.copy(), k.copy(), v.copy()
    before_k, before_v = k_store.copy(), v_store.copy()
    bits = (lambda a: a) if dtype == np.float32 else (lambda a: a.view(np.uint16))
    attention_step(q, k, v, cos[0], sin[0], bits(k_store), bits(v_store), slot, count, np.float32(HD ** -0.5),
                   np.float32(softcap), ctx)
    assert (q == q0).all() and (k == k0).all() and (v == v0).all()

    # reference: the decoders' numpy attention over the rows, the new key and value in row `slot`
    qr = apply_rope(q.reshape(H, 1, HD), cos, sin)
    exact_k = apply_rope(k.reshape(KV, 1, HD).astype(np.float64), cos, sin)[:, 0]
    before_k[:, slot] = exact_k  # rounded to nearest, in a float16 cache
    before_v[:, slot] = v.reshape(KV, HD)
    np.testing.assert_allclose(k_store, before_k, rtol=1e-6, atol=1e-6)  # only row `slot` written
    np.testing.assert_array_equal(v_store, before_v)
    # within half a step of float16 (2^-11 relative) of the exact key, or 1e-6 in float32
    np.testing.assert_allclose(k_store[:, slot], exact_k, rtol=2.0 ** -11 if dtype == np.float16 else 1e-6, atol=1e-6)
    keys, vals = before_k[:, :count].astype(np.float32), before_v[:, :count].astype(np.float32)
    scores = (qr.reshape(KV, H // KV, 1, HD) @ keys[:, None].transpose(0, 1, 3, 2)) * np.float32(HD ** -0.5)
    if softcap:
        scores = np.tanh(scores / softcap) * softcap
    want = (softmax(scores) @ vals[:, None]).reshape(H * HD)
    np.testing.assert_allclose(ctx, want, rtol=1e-5, atol=1e-5)
