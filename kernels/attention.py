"""Decoder attention for one new token (a decode step with a KV cache) and the norms of
the runtimes (RMSNorm of one token, LayerNorm of an encoder's rows), Numba.

Shapes: ``H`` query heads, ``KV`` key/value heads (grouped-query attention: query head
``h`` reads kv head ``h // (H // KV)``), head size ``hd``, ``cap`` cache capacity; all
arrays contiguous and float32 but the cache, float32 or float16 (as its bits, uint16:
Numba has no float16; :func:`to_f32` and :func:`as_stored` convert, LLVM's ``fpext`` /
``fptrunc``: ``vcvtph2ps`` / ``vcvtps2ph`` on x86, ``fcvtl`` / ``fcvtn`` on ARM). Vectors
are flat, head-major: ``q [H*hd]``, ``k, v [KV*hd]``. RoPE is the Hugging Face
``rotate_half`` convention:
``x * cos + [-x2, x1] * sin`` with ``x1, x2`` the halves of a head's first ``dim``
dimensions (``dim = hd`` unless the model rotates part of each head; the rest pass
unchanged) and ``cos, sin [dim]`` the row of
:meth:`~sparseforge.toolchain.reference.rope.Rope.cos_sin` for the token's position. The
cache holds keys after RoPE, ``k_cache, v_cache [KV, cap, hd]``, a row per cached position.
"""
import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .ffn import _prefetch_into, exp_nonpos

_FLAGS = dict(fastmath=True, cache=True, nogil=True)
_prefetch_l1 = _prefetch_into(3)
#: cache rows a decode step's attention prefetches ahead of the one it reads (4 KB at a
#: head size of 64)
PREFETCH_ROWS = 16


@intrinsic
def to_f32(typingctx, x):
    """``x`` as float32: a float32 unchanged, a uint16 read as the bits of a float16
    (exact)."""
    if x == types.float32:
        return types.float32(x), lambda context, builder, sig, args: args[0]
    if x == types.uint16:
        def widen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(x), widen
    return None


@intrinsic
def as_stored(typingctx, x, store):
    """The float32 ``x`` as an element of the array ``store``: unchanged for float32, the
    bits of the nearest float16 (ties to even, as numpy's ``astype``) for uint16."""
    if x != types.float32 or not isinstance(store, types.Array):
        return None
    if store.dtype == types.float32:
        return types.float32(x, store), lambda context, builder, sig, args: args[0]
    if store.dtype == types.uint16:
        def narrow(context, builder, sig, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return types.uint16(x, store), narrow
    return None


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
    """``out [hd] = x * cos + rotate_half(x) * sin`` for one head ``x [hd]`` over its first
    ``cos.size`` dimensions; the rest are copied (partial rotary embeddings). ``out``:
    float32, or float16 bits (:func:`as_stored`)."""
    dim = cos.size
    half = dim // 2
    for j in range(half):
        a, b = x[j], x[j + half]
        out[j] = as_stored(a * cos[j] - b * sin[j], out)
        out[j + half] = as_stored(b * cos[j + half] + a * sin[j + half], out)
    for j in range(dim, x.size):
        out[j] = as_stored(x[j], out)


@njit(inline="always", **_FLAGS)
def _prefetch_rows(flat, j, rows, hd):
    """Prefetch cache rows ``j + PREFETCH_ROWS .. + rows`` of ``flat`` (a ``[cap, hd]``
    cache raveled; clamped to its end) into L1, one prefetch per 64-byte line."""
    lim = flat.shape[0] - 1
    base = (j + PREFETCH_ROWS) * hd
    for o in range(0, rows * hd, 64 // flat.itemsize):
        _prefetch_l1(flat, min(base + o, lim))


@njit(**_FLAGS)
def _scores(qg, kc, S, p):
    """``p[r, j] = qg[r] . kc[j]`` for the ``G`` rows of ``qg [G, hd]`` and the keys
    ``j < S`` of ``kc [cap, hd]``: four keys by two heads at a time (each key element
    loaded once for the two heads, each query element once for the four keys), an odd
    head four keys at a time, the last ``S mod 4`` keys one at a time. 8 heads over 2000
    keys of 64, one thread: 47-53 us one head and one key at a time, 34 us this way.
    The keys :data:`PREFETCH_ROWS` ahead are prefetched."""
    G, hd = qg.shape
    kf = kc.ravel()
    j = 0
    while j + 4 <= S:
        _prefetch_rows(kf, j, 4, hd)
        r = 0
        while r + 2 <= G:
            s0 = s1 = s2 = s3 = t0 = t1 = t2 = t3 = np.float32(0.0)
            for c in range(hd):
                q, u = qg[r, c], qg[r + 1, c]
                k0, k1, k2, k3 = to_f32(kc[j, c]), to_f32(kc[j + 1, c]), to_f32(kc[j + 2, c]), to_f32(kc[j + 3, c])
                s0 += q * k0
                s1 += q * k1
                s2 += q * k2
                s3 += q * k3
                t0 += u * k0
                t1 += u * k1
                t2 += u * k2
                t3 += u * k3
            p[r, j], p[r, j + 1], p[r, j + 2], p[r, j + 3] = s0, s1, s2, s3
            p[r + 1, j], p[r + 1, j + 1], p[r + 1, j + 2], p[r + 1, j + 3] = t0, t1, t2, t3
            r += 2
        if r < G:
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for c in range(hd):
                q = qg[r, c]
                s0 += q * to_f32(kc[j, c])
                s1 += q * to_f32(kc[j + 1, c])
                s2 += q * to_f32(kc[j + 2, c])
                s3 += q * to_f32(kc[j + 3, c])
            p[r, j], p[r, j + 1], p[r, j + 2], p[r, j + 3] = s0, s1, s2, s3
        j += 4
    for j in range(j, S):
        for r in range(G):
            s = np.float32(0.0)
            for c in range(hd):
                s += qg[r, c] * to_f32(kc[j, c])
            p[r, j] = s


@njit(**_FLAGS)
def _weighted_values(p, vc, S, out):
    """``out[r] = sum_{j < S} p[r, j] vc[j]`` for the rows of ``out [G, hd]``, four heads
    at a time in accumulators of their own, four values at a time (each accumulator
    element loaded and stored once per four values, each value element loaded once for
    the four heads), the last ``S mod 4`` values one at a time. 8 heads over 2000 values
    of 64, one thread, warm: 56-65 us one head and one value at a time, 39-44 four heads
    and one value, 31 us this way. The values :data:`PREFETCH_ROWS` ahead are
    prefetched."""
    G, hd = out.shape
    vf = vc.ravel()
    r = 0
    while r + 4 <= G:
        a0 = np.zeros(hd, np.float32)
        a1 = np.zeros(hd, np.float32)
        a2 = np.zeros(hd, np.float32)
        a3 = np.zeros(hd, np.float32)
        j = 0
        while j + 4 <= S:
            _prefetch_rows(vf, j, 4, hd)
            w00, w01, w02, w03 = p[r, j], p[r, j + 1], p[r, j + 2], p[r, j + 3]
            w10, w11, w12, w13 = p[r + 1, j], p[r + 1, j + 1], p[r + 1, j + 2], p[r + 1, j + 3]
            w20, w21, w22, w23 = p[r + 2, j], p[r + 2, j + 1], p[r + 2, j + 2], p[r + 2, j + 3]
            w30, w31, w32, w33 = p[r + 3, j], p[r + 3, j + 1], p[r + 3, j + 2], p[r + 3, j + 3]
            v0, v1, v2, v3 = vc[j], vc[j + 1], vc[j + 2], vc[j + 3]
            for c in range(hd):
                x0, x1, x2, x3 = to_f32(v0[c]), to_f32(v1[c]), to_f32(v2[c]), to_f32(v3[c])
                a0[c] += w00 * x0 + w01 * x1 + w02 * x2 + w03 * x3
                a1[c] += w10 * x0 + w11 * x1 + w12 * x2 + w13 * x3
                a2[c] += w20 * x0 + w21 * x1 + w22 * x2 + w23 * x3
                a3[c] += w30 * x0 + w31 * x1 + w32 * x2 + w33 * x3
            j += 4
        for j in range(j, S):
            w0, w1, w2, w3 = p[r, j], p[r + 1, j], p[r + 2, j], p[r + 3, j]
            for c in range(hd):
                v = to_f32(vc[j, c])
                a0[c] += w0 * v
                a1[c] += w1 * v
                a2[c] += w2 * v
                a3[c] += w3 * v
        out[r, :] = a0
        out[r + 1, :] = a1
        out[r + 2, :] = a2
        out[r + 3, :] = a3
        r += 4
    for r in range(r, G):
        a0 = np.zeros(hd, np.float32)
        for j in range(S):
            _prefetch_rows(vf, j, 1, hd)
            w0 = p[r, j]
            for c in range(hd):
                a0[c] += w0 * to_f32(vc[j, c])
        out[r, :] = a0


@njit(**_FLAGS)
def _attend_group(q, kc, vc, cos, sin, S, scale, softcap, g, G, ctx):
    """The ``G`` query heads of kv group ``g`` over its first ``S`` cache rows
    ``kc, vc [cap, hd]``: ``ctx[h] = softmax(cap(scale * rope(q_h) . K)) V`` for
    ``h = g*G .. g*G + G - 1``, where ``cap(s) = softcap tanh(s / softcap)`` when
    ``softcap > 0`` (Gemma 2), else ``s``. The group's heads go together so that each key
    and value row is read once for all of them (out of L1 for long contexts)."""
    hd = kc.shape[1]
    qg = np.empty((G, hd), np.float32)
    p = np.empty((G, S), np.float32)
    for r in range(G):
        h = g * G + r
        _rope_into(q[h * hd:(h + 1) * hd], cos, sin, qg[r])
        for c in range(hd):
            qg[r, c] *= scale
    _scores(qg, kc, S, p)
    if softcap > 0:
        inv = np.float32(1) / softcap
        for r in range(G):
            for j in range(S):
                p[r, j] = np.tanh(p[r, j] * inv) * softcap
    softmax_rows(p)
    _weighted_values(p, vc, S, ctx[g * G * hd:(g + 1) * G * hd].reshape((G, hd)))


@njit(parallel=True, **_FLAGS)
def _groups_par(q, k_cache, v_cache, cos, sin, count, scale, softcap, G, ctx):
    """:func:`_attend_group` for every kv group over cache rows ``0 .. count - 1``, spread
    over the Numba threads."""
    for g in prange(k_cache.shape[0]):
        _attend_group(q, k_cache[g], v_cache[g], cos, sin, count, scale, softcap, g, G, ctx)


@njit(**_FLAGS)
def attention_step(q, k, v, cos, sin, k_cache, v_cache, slot, count, scale, softcap, ctx):
    """One token's attention: RoPE on ``q [H*hd]`` and ``k [KV*hd]``, ``k`` (rotated) and
    ``v`` written to cache row ``slot`` (float32, or rounded to float16 for a cache of
    float16 bits), then ``ctx [H*hd] = softmax(scale * q_h . K) V``
    per query head over the keys and values of cache rows ``0 .. count - 1`` (``slot``
    among them; in any order, as a sliding window's ring keeps them: see
    :class:`~sparseforge.toolchain.runtime_cache.DecoderCache`), max-subtracted softmax,
    the scaled scores soft-capped as ``softcap tanh(s / softcap)`` when ``softcap > 0``.
    The kv groups (:func:`_attend_group`) are spread over the Numba threads by
    :func:`_groups_par`, called from this serial function: TinyLlama's shape, caches warm,
    8 / 32 / 2000 positions 5.8 / 7.8 / 175 us a layer (all of it one parallel function:
    8.7 / 13.0 / 345 in one thread, 11.2-12.1 / 13.5-14.7 / 180 on two).
    ``q, k, v`` are not modified."""
    KV, hd = k_cache.shape[0], k_cache.shape[2]
    for g in range(KV):
        _rope_into(k[g * hd:(g + 1) * hd], cos, sin, k_cache[g, slot])
        for c in range(hd):
            v_cache[g, slot, c] = as_stored(v[g * hd + c], v_cache)
    _groups_par(q, k_cache, v_cache, cos, sin, count, scale, softcap, q.size // hd // KV, ctx)
