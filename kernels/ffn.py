"""Sparse and dense FFN kernels over the artifact's bundle layout (Numba).

Self-contained (numpy + numba + math only): the ``emit`` pass copies this file into the
deployed kernels module with the ``SPEC_*`` constants below rewritten to the model's
shapes and formats. Numba freezes module globals as compile-time constants, so in an
emitted module every ``SPEC_x if SPEC_x ... else argument`` folds to the constant and
LLVM sees fixed trip counts and dead format branches; here (all -1) the values
come from the arguments.

Weights: one layer's bundles ``uint8[n, stride]`` (:mod:`.bundle`), passed twice: as a
float32 view ``wf`` (``f32`` bundles) and as an int8 view ``wq`` (``q8_0``/``q4_0``);
the other is a dummy ``[1, 1]``. ``po_*`` are the part offsets (in float32 elements for
f32, bytes for quantized). ``f16`` bundles run as ``f32`` (:func:`ffn_runtime` widens
them once at load).

Quantized paths quantize the input vector to Q8_0 once per token (ggml's rounding; the
fp16-rounded scale) and form per-block int8 x int8 dot products with int32 accumulation
(``acc = int32(acc + int32(w) * int32(x))``: LLVM narrows the arithmetic and emits
``sdot`` on AArch64 +dotprod, SVE ``sdot z`` on SVE, ``vpmaddwd`` on x86 AVX2), then
scale by ``d_w * d_x`` in float32. Down projections dequantize on the fly
(``y += h * d_w * q``).

Activations (``act``): 0 relu, 1 fatrelu (``z if z > act_t``), 2 silu, 3 gelu (erf),
4 gelu_tanh; gated FFNs compute ``act(g) * u`` (``up_relu``: ``act(g) * relu(u)``,
dReLU), others ``act(u)``; then ``|h| <= out_t`` is zeroed when ``out_t > 0``. With a
ReLU-family gate a neuron whose gate is not positive skips its up and down rows.
"""
import math
import os
import platform

import numba
import numpy as np
from numba import njit, prange
from numba.core import cgutils
from numba.core import types as nbtypes
from numba.extending import intrinsic

# Numba turns LLVM's SLP vectoriser off by default. The per-block int8 dot products have
# a fixed trip count of 32, which LLVM unrolls fully before the loop vectoriser sees them;
# only the SLP vectoriser then turns them into vpmaddwd / sdot (4x faster on x86). Enable
# it for this process unless the user chose explicitly.
if "NUMBA_SLP_VECTORIZE" not in os.environ:
    numba.config.SLP_VECTORIZE = 1

# --- specialisation constants (the emit pass rewrites this block) ---
SPEC_D = -1         # d_model (-1: from the arguments)
SPEC_FMT = -1       # 0 f32, 1 q8_0, 2 q4_0 (-1: from the arguments)
SPEC_GATED = -1     # 1 gated, 0 not (-1: from the arguments)
SPEC_ACT = -1       # activation code (-1: from the arguments)
SPEC_UP_RELU = -1   # 1 dReLU (-1: from the arguments)
# --- end specialisation constants ---

F32, Q8_0, Q4_0 = 0, 1, 2
FORMAT_CODES = {"f32": F32, "q8_0": Q8_0, "q4_0": Q4_0}
RELU, FATRELU, SILU, GELU, GELU_TANH = 0, 1, 2, 3, 4
ACT_CODES = {"relu": RELU, "fatrelu": FATRELU, "silu": SILU, "gelu": GELU, "gelu_tanh": GELU_TANH}
QK = 32
Q8_BYTES = 34
Q4_BYTES = 18

_FLAGS = dict(fastmath=True, cache=True, nogil=True)

# Which quantized row primitives the kernels call (a compile-time constant). ARM: the
# per-block int8 reductions LLVM turns into ``sdot`` (NEON/SVE), the forms ``emit``
# cross-compiles and checks. x86 (AVX2, AVX-512 without relying on VNNI): ``*_x86``, with
# float32 lane accumulators on the stack across blocks and one horizontal sum per row.
# (Numba freezes it into cached code: it must not change between runs on one machine.)
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


# ---------------------------------------------------------------------------- helpers
@njit(**_FLAGS)
def activation(z, kind, t):
    """The activation ``kind`` of a float32 pre-activation ``z``."""
    if kind == RELU:
        return z if z > np.float32(0) else np.float32(0)
    if kind == FATRELU:
        return z if z > t else np.float32(0)
    if kind == SILU:
        return np.float32(z / (np.float32(1) + math.exp(-z)))
    if kind == GELU:
        return np.float32(0.5 * z * (1.0 + math.erf(z * 0.7071067811865476)))
    return np.float32(0.5 * z * (1.0 + math.tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))))


@njit(**_FLAGS)
def gate_can_skip(kind):
    """True when ``act(g) == 0`` for every ``g <= 0`` (the ReLU family)."""
    return kind == RELU or kind == FATRELU


@njit(cache=True, nogil=True)
def _f16_round(v):
    """``v`` (float32, >= 0) rounded to the nearest float16 (ties to even), as float32."""
    if v < np.float32(6.103515625e-05):  # float16 subnormals: multiples of 2^-24
        return np.float32(np.round(np.float64(v) * 16777216.0) / 16777216.0)
    if v >= np.float32(65520.0):
        return np.float32(np.inf)
    bits = np.array([v], np.float32).view(np.uint32)[0]
    bits = (bits + np.uint32(0xFFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return np.array([bits], np.uint32).view(np.float32)[0]


@njit(cache=True, nogil=True)
def quantize_q8_0_into(x, xq, xd):
    """ggml's Q8_0 of ``x[d]``: int8 ``xq[d]`` and the fp16-rounded block scales ``xd[d/32]``."""
    nb = x.shape[0] // QK
    for b in range(nb):
        amax = np.float32(0)
        for k in range(QK):
            a = abs(x[b * QK + k])
            amax = a if a > amax else amax
        dd = amax / np.float32(127)
        inv = np.float32(1) / dd if dd != np.float32(0) else np.float32(0)
        for k in range(QK):
            v = x[b * QK + k] * inv
            a = abs(v)
            fl = np.floor(a)
            r = fl + (np.float32(1) if a - fl >= np.float32(0.5) else np.float32(0))
            xq[b * QK + k] = np.int8(r if v >= 0 else -r)
        xd[b] = _f16_round(dd)


@njit(**_FLAGS)
def _scale(w, p, lut):
    return lut[(np.int32(w[p]) & 255) | ((np.int32(w[p + 1]) & 255) << 8)]


@intrinsic
def _stack_f32(typingctx, size):
    """A pointer to ``size`` float32 on the stack (an ``alloca`` in the entry block):
    unlike an ``np.empty`` buffer, LLVM knows it aliases nothing else and promotes it to
    vector registers when the size is a constant. Wrap with ``numba.carray(ptr, size)``."""
    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(nbtypes.float32), size=args[0])
    return nbtypes.CPointer(nbtypes.float32)(nbtypes.intp), codegen


@njit(**_FLAGS)
def _lanes_sum16(acc):
    s = np.float32(0)
    for l in range(16):
        s += acc[l]
    return s


# ----------------------------------------------------------------- per-row primitives
@njit(**_FLAGS)
def dot_f32(w, off, x, d):
    """``sum_k w[off + k] * x[k]`` for a float32 row."""
    d = SPEC_D if SPEC_D >= 0 else d
    seg = w[off:off + d]
    s = np.float32(0)
    for k in range(d):
        s += seg[k] * x[k]
    return s


@njit(**_FLAGS)
def dot_q8_0(w, off, xq, xd, lut, nb):
    """Dot of a Q8_0 row (int8 view, byte offset ``off``) with Q8_0 activations (the ARM
    form: a per-block int8 reduction LLVM turns into two ``sdot`` + ``addv``)."""
    nb = SPEC_D // QK if SPEC_D >= 0 else nb
    s = np.float32(0)
    for b in range(nb):
        p = off + b * Q8_BYTES
        acc = np.int32(0)
        for k in range(QK):
            acc = np.int32(acc + np.int32(w[p + 2 + k]) * np.int32(xq[b * QK + k]))
        s += _scale(w, p, lut) * xd[b] * np.float32(acc)
    return s


@njit(**_FLAGS)
def dot_q4_0(w, off, xq, xd, lut, nb):
    """Dot of a Q4_0 row with Q8_0 activations: nibbles minus 8 as int8, int32 sums (ARM form)."""
    nb = SPEC_D // QK if SPEC_D >= 0 else nb
    s = np.float32(0)
    for b in range(nb):
        p = off + b * Q4_BYTES
        acc = np.int32(0)
        for j in range(QK // 2):
            q = np.int32(w[p + 2 + j])
            acc = np.int32(acc + np.int32(np.int8((q & 15) - 8)) * np.int32(xq[b * QK + j])
                           + np.int32(np.int8(((q >> 4) & 15) - 8)) * np.int32(xq[b * QK + QK // 2 + j]))
        s += _scale(w, p, lut) * xd[b] * np.float32(acc)
    return s


@njit(**_FLAGS)
def dot_q8_0_x86(w, off, xq, xd, lut, nb):
    """:func:`dot_q8_0` for x86 (AVX2/AVX-512 without a 4-way int8 dot): sixteen lanes,
    lane ``l`` = ``w[l] x[l] + w[l+16] x[l+16]`` in int16 (exact: |w| <= 128 and
    |x| <= 127 from the activation quantizer, so |sum| <= 32512), i.e. ``vpmovsxbw`` +
    ``vpmullw`` + ``vpaddw`` on whole halves of the block, no shuffles, then widened,
    converted and multiply-added into sixteen float32 lane accumulators."""
    nb = SPEC_D // QK if SPEC_D >= 0 else nb
    acc = numba.carray(_stack_f32(16), 16)
    for l in range(16):
        acc[l] = np.float32(0)
    for b in range(nb):
        p = off + b * Q8_BYTES
        s = _scale(w, p, lut) * xd[b]
        wb = w[p + 2:p + Q8_BYTES]
        xb = xq[b * QK:b * QK + QK]
        for l in range(16):
            acc[l] += s * np.float32(np.int16(np.int16(wb[l]) * np.int16(xb[l])
                                              + np.int16(wb[16 + l]) * np.int16(xb[16 + l])))
    return _lanes_sum16(acc)


@njit(**_FLAGS)
def dot_q4_0_x86(w, off, xq, xd, lut, nb):
    """:func:`dot_q4_0` for x86: lane ``l`` = ``lo(q[l]) x[l] + hi(q[l]) x[l+16]`` in int16
    (low nibbles are elements 0-15 and high nibbles 16-31, so both halves line up with
    the activation halves without shuffles)."""
    nb = SPEC_D // QK if SPEC_D >= 0 else nb
    acc = numba.carray(_stack_f32(16), 16)
    for l in range(16):
        acc[l] = np.float32(0)
    for b in range(nb):
        p = off + b * Q4_BYTES
        s = _scale(w, p, lut) * xd[b]
        wb = w[p + 2:p + Q4_BYTES]
        xb = xq[b * QK:b * QK + QK]
        for l in range(16):
            q = np.int16(wb[l])
            acc[l] += s * np.float32(np.int16(np.int16((q & 15) - 8) * np.int16(xb[l])
                                              + np.int16(((q >> 4) & 15) - 8) * np.int16(xb[16 + l])))
    return _lanes_sum16(acc)


@njit(**_FLAGS)
def axpy_f32(w, off, h, y, d):
    """``y[k] += h * w[off + k]``."""
    d = SPEC_D if SPEC_D >= 0 else d
    seg = w[off:off + d]
    for k in range(d):
        y[k] += h * seg[k]


@njit(**_FLAGS)
def axpy_q8_0(w, off, h, y, lut, nb):
    nb = SPEC_D // QK if SPEC_D >= 0 else nb
    for b in range(nb):
        p = off + b * Q8_BYTES
        s = h * _scale(w, p, lut)
        for k in range(QK):
            y[b * QK + k] += s * np.float32(w[p + 2 + k])


@njit(**_FLAGS)
def axpy_q4_0(w, off, h, y, lut, nb):
    nb = SPEC_D // QK if SPEC_D >= 0 else nb
    for b in range(nb):
        p = off + b * Q4_BYTES
        s = h * _scale(w, p, lut)
        for j in range(QK // 2):
            q = np.int32(w[p + 2 + j])
            y[b * QK + j] += s * np.float32((q & 15) - 8)
            y[b * QK + QK // 2 + j] += s * np.float32(((q >> 4) & 15) - 8)


@njit(**_FLAGS)
def axpy_q8_0_x86(w, off, h, y, lut, nb):
    """:func:`axpy_q8_0` for x86: each block is dequantized into a stack buffer first, so
    LLVM need not check per block whether ``y`` overlaps the weights, then one vector
    multiply-add over the block (about 4x the plain loop here; on SVE the plain loop is
    the one LLVM vectorises)."""
    nb = SPEC_D // QK if SPEC_D >= 0 else nb
    t = numba.carray(_stack_f32(QK), QK)
    for b in range(nb):
        p = off + b * Q8_BYTES
        s = h * _scale(w, p, lut)
        wb = w[p + 2:p + Q8_BYTES]
        for k in range(QK):
            t[k] = np.float32(wb[k])
        yb = y[b * QK:b * QK + QK]
        for k in range(QK):
            yb[k] += s * t[k]


@njit(**_FLAGS)
def axpy_q4_0_x86(w, off, h, y, lut, nb):
    nb = SPEC_D // QK if SPEC_D >= 0 else nb
    t = numba.carray(_stack_f32(QK), QK)
    for b in range(nb):
        p = off + b * Q4_BYTES
        s = h * _scale(w, p, lut)
        wb = w[p + 2:p + Q4_BYTES]
        for j in range(QK // 2):
            q = np.int32(wb[j])
            t[j] = np.float32((q & 15) - 8)
            t[QK // 2 + j] = np.float32(((q >> 4) & 15) - 8)
        yb = y[b * QK:b * QK + QK]
        for k in range(QK):
            yb[k] += s * t[k]


@njit(**_FLAGS)
def row_dot(fmt, wf, wq, i, off, x, xq, xd, lut, d):
    if fmt == F32:
        return dot_f32(wf[i], off, x, d)
    if fmt == Q8_0:
        if X86:
            return dot_q8_0_x86(wq[i], off, xq, xd, lut, d // QK)
        return dot_q8_0(wq[i], off, xq, xd, lut, d // QK)
    if X86:
        return dot_q4_0_x86(wq[i], off, xq, xd, lut, d // QK)
    return dot_q4_0(wq[i], off, xq, xd, lut, d // QK)


@njit(**_FLAGS)
def row_axpy(fmt, wf, wq, i, off, h, y, lut, d):
    if fmt == F32:
        axpy_f32(wf[i], off, h, y, d)
    elif fmt == Q8_0:
        if X86:
            axpy_q8_0_x86(wq[i], off, h, y, lut, d // QK)
        else:
            axpy_q8_0(wq[i], off, h, y, lut, d // QK)
    elif X86:
        axpy_q4_0_x86(wq[i], off, h, y, lut, d // QK)
    else:
        axpy_q4_0(wq[i], off, h, y, lut, d // QK)


@njit(**_FLAGS)
def _spec(spec, value):
    return spec if spec >= 0 else value


@njit(cache=True, nogil=True)
def prepare_input(fmt, x, xq, xd):
    if fmt != F32:
        quantize_q8_0_into(x, xq, xd)


@njit(**_FLAGS)
def neuron(fmt, wf, wq, i, x, xq, xd, lut, d, gated, act, act_t, up_relu, out_t, po_g, po_u, bg, bu, gpre, use_gpre):
    """Activation ``h`` of neuron ``i`` (gate first; up skipped when the gate decides)."""
    if gated:
        g = gpre if use_gpre else row_dot(fmt, wf, wq, i, po_g, x, xq, xd, lut, d)
        if bg.shape[0] > 0 and not use_gpre:
            g += bg[i]
        a = activation(g, act, act_t)
        if a == np.float32(0) and gate_can_skip(act):
            return np.float32(0)
        u = row_dot(fmt, wf, wq, i, po_u, x, xq, xd, lut, d)
        if bu.shape[0] > 0:
            u += bu[i]
        if up_relu and u < np.float32(0):
            u = np.float32(0)
        h = a * u
    else:
        u = row_dot(fmt, wf, wq, i, po_u, x, xq, xd, lut, d)
        if bu.shape[0] > 0:
            u += bu[i]
        h = activation(u, act, act_t)
    if out_t > np.float32(0) and abs(h) <= out_t:
        h = np.float32(0)
    return h


# ---------------------------------------------------------------------- decode kernels
# Each decode kernel is a per-chunk body plus two drivers: ``*_par`` runs the chunks on
# the thread pool (prange), ``*_ser`` in the calling thread (small work: a fork/join costs
# more than it saves, and much more on a loaded machine).
@njit(**_FLAGS)
def _ffn_chunk(x, xq, xd, wf, wq, idx, lo, hi, fmt, d, gated, act, act_t, up_relu, out_t, po_g, po_u, po_d,
               bg, bu, lut, gpre, h_out, acc):
    fmt = _spec(SPEC_FMT, fmt)
    d = _spec(SPEC_D, d)
    gated = _spec(SPEC_GATED, gated)
    act = _spec(SPEC_ACT, act)
    up_relu = _spec(SPEC_UP_RELU, up_relu)
    use_gpre = gpre.shape[0] > 0
    for p in range(lo, hi):
        i = idx[p]
        gp = gpre[p] if use_gpre else np.float32(0)
        h = neuron(fmt, wf, wq, i, x, xq, xd, lut, d, gated, act, act_t, up_relu, out_t, po_g, po_u,
                   bg, bu, gp, use_gpre)
        h_out[p] = h
        if h != np.float32(0):
            row_axpy(fmt, wf, wq, i, po_d, h, acc, lut, d)


@njit(**_FLAGS)
def _input(x, fmt, d):
    fmt = _spec(SPEC_FMT, fmt)
    d = _spec(SPEC_D, d)
    xq = np.empty(d, np.int8)
    xd = np.empty(max(d // QK, 1), np.float32)
    prepare_input(fmt, x, xq, xd)
    return xq, xd


@njit(**_FLAGS)
def _reduce(part, bd, y):
    d = y.shape[0]
    for k in range(d):
        y[k] = bd[k] if bd.shape[0] > 0 else np.float32(0)
    for c in range(part.shape[0]):
        for k in range(d):
            y[k] += part[c, k]


@njit(parallel=True, **_FLAGS)
def ffn_sparse_par(x, wf, wq, idx, fmt, d, gated, act, act_t, up_relu, out_t, po_g, po_u, po_d,
                   bg, bu, bd, lut, nchunks, gpre, h_out, y):
    """One token through the FFN for the neurons ``idx``: ``y = bd + sum_i h_i down_i``.

    ``gpre``: precomputed gate pre-activations per entry of ``idx`` (gate-first; empty
    to compute them); ``h_out[len(idx)]`` receives the activations."""
    xq, xd = _input(x, fmt, d)
    cnt = idx.shape[0]
    part = np.zeros((nchunks, y.shape[0]), np.float32)
    for c in prange(nchunks):
        _ffn_chunk(x, xq, xd, wf, wq, idx, (c * cnt) // nchunks, ((c + 1) * cnt) // nchunks, fmt, d, gated, act,
                   act_t, up_relu, out_t, po_g, po_u, po_d, bg, bu, lut, gpre, h_out, part[c])
    _reduce(part, bd, y)


@njit(**_FLAGS)
def ffn_sparse_ser(x, wf, wq, idx, fmt, d, gated, act, act_t, up_relu, out_t, po_g, po_u, po_d,
                   bg, bu, bd, lut, nchunks, gpre, h_out, y):
    """:func:`ffn_sparse_par` in the calling thread."""
    xq, xd = _input(x, fmt, d)
    part = np.zeros((1, y.shape[0]), np.float32)
    _ffn_chunk(x, xq, xd, wf, wq, idx, 0, idx.shape[0], fmt, d, gated, act, act_t, up_relu, out_t, po_g, po_u,
               po_d, bg, bu, lut, gpre, h_out, part[0])
    _reduce(part, bd, y)


@njit(**_FLAGS)
def _rows_chunk(x, xq, xd, wf, wq, idx, lo, hi, fmt, d, po, bias, lut, out):
    fmt = _spec(SPEC_FMT, fmt)
    d = _spec(SPEC_D, d)
    for p in range(lo, hi):
        i = idx[p]
        v = row_dot(fmt, wf, wq, i, po, x, xq, xd, lut, d)
        out[p] = v + bias[i] if bias.shape[0] > 0 else v


@njit(parallel=True, **_FLAGS)
def rows_sparse_par(x, wf, wq, idx, fmt, d, po, bias, lut, nchunks, out):
    """``out[p] = row(idx[p]) . x (+ bias)`` for one part (gate/up): the row-gather matvec."""
    xq, xd = _input(x, fmt, d)
    cnt = idx.shape[0]
    for c in prange(nchunks):
        _rows_chunk(x, xq, xd, wf, wq, idx, (c * cnt) // nchunks, ((c + 1) * cnt) // nchunks, fmt, d, po, bias,
                    lut, out)


@njit(**_FLAGS)
def rows_sparse_ser(x, wf, wq, idx, fmt, d, po, bias, lut, nchunks, out):
    xq, xd = _input(x, fmt, d)
    _rows_chunk(x, xq, xd, wf, wq, idx, 0, idx.shape[0], fmt, d, po, bias, lut, out)


@njit(**_FLAGS)
def _axpy_chunk(h, wf, wq, idx, lo, hi, fmt, d, po, lut, acc):
    fmt = _spec(SPEC_FMT, fmt)
    d = _spec(SPEC_D, d)
    for p in range(lo, hi):
        if h[p] != np.float32(0):
            row_axpy(fmt, wf, wq, idx[p], po, h[p], acc, lut, d)


@njit(parallel=True, **_FLAGS)
def axpy_sparse_par(h, wf, wq, idx, fmt, d, po, lut, nchunks, y):
    """``y = sum_p h[p] * column(idx[p])`` for the down part (the sparse axpy)."""
    cnt = idx.shape[0]
    part = np.zeros((nchunks, y.shape[0]), np.float32)
    for c in prange(nchunks):
        _axpy_chunk(h, wf, wq, idx, (c * cnt) // nchunks, ((c + 1) * cnt) // nchunks, fmt, d, po, lut, part[c])
    _reduce(part, np.zeros(0, np.float32), y)


@njit(**_FLAGS)
def axpy_sparse_ser(h, wf, wq, idx, fmt, d, po, lut, nchunks, y):
    part = np.zeros((1, y.shape[0]), np.float32)
    _axpy_chunk(h, wf, wq, idx, 0, idx.shape[0], fmt, d, po, lut, part[0])
    _reduce(part, np.zeros(0, np.float32), y)


@njit(cache=True, nogil=True)
def select_positive(vals, t, idx_out):
    """Indices where ``vals > t`` into ``idx_out``; returns their count (ascending)."""
    m = 0
    for i in range(vals.shape[0]):
        if vals[i] > t:
            idx_out[m] = i
            m += 1
    return m


# ---------------------------------------------------------------------------- predictor
@njit(**_FLAGS)
def _predictor_hidden(x, w1, b1, hidden):
    r, d = w1.shape
    for j in range(r):
        s = np.float32(0)
        for k in range(d):
            s += w1[j, k] * x[k]
        if b1.shape[0] > 0:
            s += b1[j]
        hidden[j] = s if s > np.float32(0) else np.float32(0)


@njit(**_FLAGS)
def _predictor_out(w2, b2, hidden, lo, hi, logits):
    r = w2.shape[1]
    for i in range(lo, hi):
        s = np.float32(0)
        for j in range(r):
            s += w2[i, j] * hidden[j]
        logits[i] = s + b2[i] if b2.shape[0] > 0 else s


@njit(parallel=True, **_FLAGS)
def predictor_logits_par(x, w1, b1, w2, b2, nchunks, hidden, logits):
    """``logits = relu(x W1^T + b1) W2^T + b2`` (W1 ``[r, d]``, W2 ``[n, r]``; empty biases = none);
    the first layer (r x d, small) in the calling thread, the second on the pool."""
    _predictor_hidden(x, w1, b1, hidden)
    n = w2.shape[0]
    for c in prange(nchunks):
        _predictor_out(w2, b2, hidden, (c * n) // nchunks, ((c + 1) * n) // nchunks, logits)


@njit(**_FLAGS)
def predictor_logits_ser(x, w1, b1, w2, b2, nchunks, hidden, logits):
    _predictor_hidden(x, w1, b1, hidden)
    _predictor_out(w2, b2, hidden, 0, w2.shape[0], logits)


@njit(cache=True, nogil=True)
def select_topk(vals, k, idx_out):
    """The ``k`` largest entries' indices, ascending, into ``idx_out``; returns k."""
    k = min(k, vals.shape[0])
    if k <= 0:
        return 0
    part = np.argpartition(-vals, k - 1)[:k]
    part.sort()
    idx_out[:k] = part
    return k


# ------------------------------------------------------------------------------ prefill
@njit(parallel=True, **_FLAGS)
def ffn_prefill_sparse(X, wf, wq, union, mask, fmt, d, gated, act, act_t, up_relu, out_t, po_g, po_u, po_d,
                       bg, bu, bd, lut, nchunks, Y):
    """T tokens: every neuron of ``union`` is read once and applied to the tokens whose
    ``mask[t, i]`` is set (``mask`` empty: every token)."""
    fmt = _spec(SPEC_FMT, fmt)
    d = _spec(SPEC_D, d)
    gated = _spec(SPEC_GATED, gated)
    act = _spec(SPEC_ACT, act)
    up_relu = _spec(SPEC_UP_RELU, up_relu)
    T = X.shape[0]
    nb = d // QK
    XQ = np.empty((T, d), np.int8)
    XD = np.empty((T, max(nb, 1)), np.float32)
    for t in range(T):
        prepare_input(fmt, X[t], XQ[t], XD[t])
    has_mask = mask.shape[0] > 0
    cnt = union.shape[0]
    part = np.zeros((nchunks, T, d), np.float32)
    for c in prange(nchunks):
        for p in range((c * cnt) // nchunks, ((c + 1) * cnt) // nchunks):
            i = union[p]
            for t in range(T):
                if has_mask and not mask[t, i]:
                    continue
                h = neuron(fmt, wf, wq, i, X[t], XQ[t], XD[t], lut, d, gated, act, act_t, up_relu, out_t,
                           po_g, po_u, bg, bu, np.float32(0), False)
                if h != np.float32(0):
                    row_axpy(fmt, wf, wq, i, po_d, h, part[c, t], lut, d)
    for t in range(T):
        for k in range(d):
            Y[t, k] = bd[k] if bd.shape[0] > 0 else np.float32(0)
    for c in range(nchunks):
        for t in range(T):
            for k in range(d):
                Y[t, k] += part[c, t, k]


@njit(parallel=True, **_FLAGS)
def dequantize_rows(wf, wq, lo, hi, fmt, d, po, lut, out):
    """Rows ``lo..hi`` of one part as float32 ``out[hi - lo, d]`` (dense prefill tiles)."""
    for r in prange(hi - lo):
        i = lo + r
        if fmt == F32:
            out[r, :] = wf[i, po:po + d]
        else:
            for k in range(d):
                out[r, k] = np.float32(0)
            row_axpy(fmt, wf, wq, i, po, np.float32(1), out[r], lut, d)


@njit(parallel=True, **_FLAGS)
def apply_activation_2d(G, U, mask, gated, act, act_t, up_relu, out_t):
    """``H = act(G) * U`` (or ``act(U)``) in place into ``U``, zeroed where ``mask`` is false."""
    T, n = U.shape
    has_mask = mask.shape[0] > 0
    for t in prange(T):
        for i in range(n):
            if has_mask and not mask[t, i]:
                U[t, i] = np.float32(0)
                continue
            if gated:
                u = U[t, i]
                if up_relu and u < np.float32(0):
                    u = np.float32(0)
                h = activation(G[t, i], act, act_t) * u
            else:
                h = activation(U[t, i], act, act_t)
            if out_t > np.float32(0) and abs(h) <= out_t:
                h = np.float32(0)
            U[t, i] = h


def default_chunks() -> int:
    """Work chunks per parallel kernel: a few per thread for balance."""
    return max(1, 4 * numba.get_num_threads())
