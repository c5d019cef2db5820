"""The decode-step attention kernel (kernels.attention) against the numpy reference
(apply_rope, softmax, the grouped-query attention of the decoders), and the decoder
runtime's cached decode steps against one forward over the whole sequence (the norm and
softmax kernels: tests/test_norm_kernels.py)."""
from __future__ import annotations

import numpy as np
import pytest
from _runtime_artifacts import llama_out  # noqa: F401 (fixture)

from sparseforge.kernels.attention import attention_step
from sparseforge.toolchain.reference.bert import softmax
from sparseforge.toolchain.reference.llama import KVCache, apply_rope, rope_cos_sin
from sparseforge.toolchain.runtime import load_runtime

H, KV, HD = 8, 2, 16


@pytest.mark.parametrize("past", [0, 1, 5, 40])
def test_attention_step(past):
    rng = np.random.default_rng(past)
    q = rng.standard_normal(H * HD).astype(np.float32)
    k = rng.standard_normal(KV * HD).astype(np.float32)
    v = rng.standard_normal(KV * HD).astype(np.float32)
    cos, sin = rope_cos_sin(np.array([past]), HD, 10000.0)
    cache = KVCache(1, 1, KV, HD)
    cache.append(0, *(rng.standard_normal((2, 1, KV, past, HD)).astype(np.float32)))
    past_k, past_v = cache.keys(0)[0].copy(), cache.values(0)[0].copy()
    k_store, v_store, pos = cache.reserve(0)
    assert pos == past and cache.length == past + 1
    ctx = np.empty_like(q)
    q0, k0, v0 = q.copy(), k.copy(), v.copy()
    attention_step(q, k, v, cos[0], sin[0], k_store[0], v_store[0], pos, np.float32(HD ** -0.5), ctx)
    assert (q == q0).all() and (k == k0).all() and (v == v0).all()

    # reference: the decoders' numpy attention over [past keys, new key]
    qr = apply_rope(q.reshape(H, 1, HD), cos, sin)
    kr = apply_rope(k.reshape(KV, 1, HD), cos, sin)
    keys = np.concatenate([past_k, kr], axis=1)  # [KV, S, hd]
    vals = np.concatenate([past_v, v.reshape(KV, 1, HD)], axis=1)
    np.testing.assert_allclose(cache.keys(0)[0], keys, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cache.values(0)[0], vals)
    scores = (qr.reshape(KV, H // KV, 1, HD) @ keys[:, None].transpose(0, 1, 3, 2)) * np.float32(HD ** -0.5)
    want = (softmax(scores) @ vals[:, None]).reshape(H * HD)
    np.testing.assert_allclose(ctx, want, rtol=1e-5, atol=1e-5)


def test_decoder_decode_steps_match_full_forward(llama_out):
    rt = load_runtime(llama_out / "model.gguf", mode="dense", linear="dequantize")
    ids = np.random.default_rng(3).integers(0, 100, 20)
    want = rt.forward(ids, all_logits=True)
    cache = rt.new_cache()  # 16 positions, grown at the 17th (a decode step)
    got = [rt.forward(ids[:12], cache, all_logits=True)] + [rt.forward([t], cache)[None] for t in ids[12:]]
    assert cache.length == ids.size
    np.testing.assert_allclose(np.concatenate(got), want, rtol=0, atol=1e-4 * np.abs(want).max())
