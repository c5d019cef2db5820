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
from numba import njit, prange

from .ffn import _bits_f32

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
def exp_nonpos(x):
    """``e^x`` of a float32 ``x <= 0``: Cephes' expf (reduction by ln 2 in two parts, a
    degree-6 polynomial, 2^n from the exponent bits), 0 below -80 (``e^-80`` ~ 2e-35:
    no results near the subnormals, whose arithmetic is slow in the BLAS calls that read
    them); no calls and no branches, so loops over it vectorise (Numba's ``math.exp``
    stays a scalar call without SVML)."""
    y = max(x, np.float32(-80.0))
    n = np.floor(y * np.float32(1.44269504) + np.float32(0.5))
    r = y - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1)
    e = p * _bits_f32(np.uint32((np.int32(n) + 127) << 23))
    return e if x >= np.float32(-80.0) else np.float32(0)


@njit(**_FLAGS)
def row_max(x, n):
    """``max(x[:n])`` (``n >= 1``) in eight independent running maxima: LLVM keeps a
    one-accumulator max loop scalar (1.05 against 0.19 ns per element over 1 Mi floats)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = x[0]
    i = 0
    while i + 8 <= n:
        a0 = max(a0, x[i])
        a1 = max(a1, x[i + 1])
        a2 = max(a2, x[i + 2])
        a3 = max(a3, x[i + 3])
        a4 = max(a4, x[i + 4])
        a5 = max(a5, x[i + 5])
        a6 = max(a6, x[i + 6])
        a7 = max(a7, x[i + 7])
        i += 8
    m = max(max(max(a0, a1), max(a2, a3)), max(max(a4, a5), max(a6, a7)))
    for j in range(i, n):
        m = max(m, x[j])
    return m


@njit(**_FLAGS)
def softmax_rows(scores):
    """Softmax over the last axis of ``scores [R, S]``, in place (and returned), float32
    (max subtracted, :func:`exp_nonpos`): one pass per row in L1 where numpy makes five
    over the whole array (a batch of 8 x 128 tokens, 12 heads: 2.4 against 3.6 ms; 0.9 ms
    with :func:`row_max`)."""
    for i in range(scores.shape[0]):
        row = scores[i]
        m = row_max(row, row.shape[0])
        total = np.float32(0)
        for j in range(row.shape[0]):
            e = exp_nonpos(row[j] - m)
            row[j] = e
            total += e
        inv = np.float32(1) / total
        for j in range(row.shape[0]):
            row[j] *= inv
    return scores


@njit(**_FLAGS)
def _rope_into(x, cos, sin, out):
    """``out [hd] = x * cos + rotate_half(x) * sin`` for one head ``x [hd]``."""
    half = x.size // 2
    for j in range(half):
        a, b = x[j], x[j + half]
        out[j] = a * cos[j] - b * sin[j]
        out[j + half] = b * cos[j + half] + a * sin[j + half]


@njit(**_FLAGS)
def _attend_group(q, kc, vc, cos, sin, S, scale, g, G, ctx):
    """The ``G`` query heads of kv group ``g`` over its first ``S`` cache positions
    ``kc, vc [cap, hd]``: ``ctx[h] = softmax(scale * rope(q_h) . K) V`` for
    ``h = g*G .. g*G + G - 1``. The group's heads go together so that each key and value
    row is read once for all of them (out of L1 for long contexts)."""
    hd = kc.shape[1]
    qg = np.empty((G, hd), np.float32)
    p = np.empty((G, S), np.float32)
    for r in range(G):
        h = g * G + r
        _rope_into(q[h * hd:(h + 1) * hd], cos, sin, qg[r])
        for c in range(hd):
            qg[r, c] *= scale
    for j in range(S):
        for r in range(G):
            s = np.float32(0.0)
            for c in range(hd):
                s += qg[r, c] * kc[j, c]
            p[r, j] = s
    softmax_rows(p)
    out = ctx[g * G * hd:(g + 1) * G * hd].reshape((G, hd))
    out[:] = 0.0
    for j in range(S):
        for r in range(G):
            wj = p[r, j]
            for c in range(hd):
                out[r, c] += wj * vc[j, c]


@njit(parallel=True, **_FLAGS)
def attention_step(q, k, v, cos, sin, k_cache, v_cache, pos, scale, ctx):
    """One token's attention over positions ``0 .. pos``: RoPE on ``q [H*hd]`` and
    ``k [KV*hd]``, ``k`` (rotated) and ``v`` written to the caches at ``pos`` (the number of
    past positions), then ``ctx [H*hd] = softmax(scale * q_h . K) V`` per query head
    (max-subtracted softmax), the kv groups (:func:`_attend_group`) spread over the Numba
    threads (TinyLlama's shape, 2 threads: 8.6 against 11.6 us a layer in one thread at 32
    positions, 261 against 512 at 2000; at 1-4 positions the fork/join costs 0.3-0.6 us
    more). ``q, k, v`` are not modified."""
    KV, hd = k_cache.shape[0], k_cache.shape[2]
    for g in range(KV):
        _rope_into(k[g * hd:(g + 1) * hd], cos, sin, k_cache[g, pos])
        v_cache[g, pos, :] = v[g * hd:(g + 1) * hd]
    G = q.size // hd // KV
    for g in prange(KV):
        _attend_group(q, k_cache[g], v_cache[g], cos, sin, pos + 1, scale, g, G, ctx)
