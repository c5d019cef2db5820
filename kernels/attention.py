"""Decoder attention for one new token (a decode step with a KV cache) and the norms of
the runtimes (RMSNorm of one token, LayerNorm of an encoder's rows), Numba.

Shapes: ``H`` query heads, ``KV`` key/value heads (grouped-query attention: query head
``h`` reads kv head ``h // (H // KV)``), head size ``hd``, ``cap`` cache capacity; all
arrays float32 and contiguous. Vectors are flat, head-major: ``q [H*hd]``,
``k, v [KV*hd]``. RoPE is the Hugging Face ``rotate_half`` convention:
``x * cos + [-x2, x1] * sin`` with ``x1, x2`` the halves of a head and ``cos, sin [hd]``
the row of :func:`~sparseforge.toolchain.reference.llama.rope_cos_sin` for the token's
position. The cache holds keys after RoPE, ``k_cache, v_cache [KV, cap, hd]``.
"""
import math

import numpy as np
from numba import njit

_FLAGS = dict(fastmath=True, cache=True, nogil=True)


@njit(**_FLAGS)
def rms_norm_into(x, w, eps, out):
    """``out [d] = x / sqrt(mean(x^2) + eps) * w`` for ``x, w [d]`` (mean in float64)."""
    acc = 0.0
    for i in range(x.size):
        acc += np.float64(x[i]) * np.float64(x[i])
    inv = np.float32(1.0 / math.sqrt(acc / x.size + eps))
    for i in range(x.size):
        out[i] = x[i] * inv * w[i]


@njit(**_FLAGS)
def add_layer_norm_rows(x, r, w, b, eps, out):
    """``out [T, d] = LayerNorm(x + r)`` over each row, with weight ``w [d]`` and bias
    ``b [d]`` (biased variance; mean and variance accumulated in float64). ``r``: the
    residual ``[T, d]``, or ``[0, d]`` for none. ``out`` may be ``x``."""
    T, d = x.shape
    add = r.shape[0] > 0
    row = np.empty(d, np.float32)
    for t in range(T):
        s = 0.0
        for i in range(d):
            v = x[t, i] + r[t, i] if add else x[t, i]
            row[i] = v
            s += np.float64(v)
        mean = s / d
        q = 0.0
        for i in range(d):
            c = np.float64(row[i]) - mean
            q += c * c
        inv = np.float32(1.0 / math.sqrt(q / d + eps))
        m = np.float32(mean)
        for i in range(d):
            out[t, i] = (row[i] - m) * inv * w[i] + b[i]


@njit(**_FLAGS)
def _rope_into(x, cos, sin, out):
    """``out [hd] = x * cos + rotate_half(x) * sin`` for one head ``x [hd]``."""
    half = x.size // 2
    for j in range(half):
        a, b = x[j], x[j + half]
        out[j] = a * cos[j] - b * sin[j]
        out[j + half] = b * cos[j + half] + a * sin[j + half]


@njit(**_FLAGS)
def attention_step(q, k, v, cos, sin, k_cache, v_cache, pos, scale, ctx):
    """One token's attention over positions ``0 .. pos``: RoPE on ``q [H*hd]`` and
    ``k [KV*hd]``, ``k`` (rotated) and ``v`` written to the caches at ``pos`` (the number of
    past positions), then ``ctx [H*hd] = softmax(scale * q_h . K) V`` per query head
    (max-subtracted softmax). ``q, k, v`` are not modified."""
    KV, hd = k_cache.shape[0], k_cache.shape[2]
    H = q.size // hd
    G = H // KV
    S = pos + 1
    for g in range(KV):
        _rope_into(k[g * hd:(g + 1) * hd], cos, sin, k_cache[g, pos])
        v_cache[g, pos, :] = v[g * hd:(g + 1) * hd]
    qh = np.empty(hd, np.float32)
    p = np.empty(S, np.float32)
    for h in range(H):
        kc, vc = k_cache[h // G], v_cache[h // G]
        _rope_into(q[h * hd:(h + 1) * hd], cos, sin, qh)
        for j in range(S):
            s = np.float32(0.0)
            for c in range(hd):
                s += qh[c] * kc[j, c]
            p[j] = s * scale
        m = p[0]
        for j in range(1, S):
            m = max(m, p[j])
        total = np.float32(0.0)
        for j in range(S):
            p[j] = np.exp(p[j] - m)
            total += p[j]
        out = ctx[h * hd:(h + 1) * hd]
        out[:] = 0.0
        inv = np.float32(1.0) / total
        for j in range(S):
            wj = p[j] * inv
            for c in range(hd):
                out[c] += wj * vc[j, c]
