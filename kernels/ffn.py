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
``sdot`` on AArch64 +dotprod, SVE ``sdot z`` on SVE), then scale by ``d_w * d_x`` in
float32. On x86 with AVX2 the block dot products are written in LLVM vector IR
(:data:`SIMD`): ``vpdpbusd`` with AVX-512 VNNI / AVX-VNNI, ``vpmaddubsw`` + ``vpmaddwd``
otherwise; each row keeps four accumulators of eight float32 lanes in registers (blocks
``b mod 4``: one chain of dependent multiply-adds would cap a row at one block per
multiply-add latency) and converts the fp16 block scales with ``vcvtph2ps`` (the lookup
table the other paths use is 256 KB, which competes with the weights in L2). Down
projections dequantize on the fly (``y += h * d_w * q``).

The quantized input is ``xq: int8[2d]`` (Q8_0 values, then their magnitudes) and
``xd: float32[2 * d/32]`` (block scales, then minus each block's sum of values as int32
bits), filled once per token by :func:`prepare_input`; only the x86 vector paths fill and
use the second halves.

Activations (``act``): 0 relu, 1 fatrelu (``z if z > act_t``), 2 silu, 3 gelu (erf),
4 gelu_tanh; gated FFNs compute ``act(g) * u`` (``up_relu``: ``act(g) * relu(u)``,
dReLU), others ``act(u)``; then ``|h| <= out_t`` is zeroed when ``out_t > 0``. With a
ReLU-family gate a neuron whose gate is not positive skips its up and down rows.

float32 rows are bound by how many streams of reads are in flight, not by arithmetic:
the dense matvec reads four rows at once from the quarters of its range, the row gather
eight scattered rows (:func:`dot8_f32`), the fused FFN four neurons' bundles
(:func:`neurons4_f32`). Quantized parts are short (1.1 KB at d 2048
in Q4_0): each part read prefetches the same part of the next row into L2
(:func:`row_dot_next`).
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
from llvmlite import ir

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

# Which quantized row primitives the kernels call (compile-time constants; Numba freezes
# them into cached code, and its cache is keyed by CPU name and features). ARM and x86
# without AVX2: the per-block int8 reductions LLVM turns into ``sdot`` (NEON/SVE), the
# forms ``emit`` cross-compiles and checks. x86 with AVX2: ``*_simd``, explicit vector IR.
def _x86_features() -> set[str]:
    """The features of the CPU Numba compiles for (its ``NUMBA_CPU_FEATURES`` if set, else
    the host's); empty on other architectures."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return set()
    from numba.core import codegen

    feats = numba.config.CPU_FEATURES if numba.config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
    return {f[1:] for f in str(feats).split(",") if f.startswith("+")}


def _x86_simd(have: set[str]) -> int:
    """0: no x86 vector path (other CPUs; x86 without AVX2/FMA/F16C), 1: AVX2, 2: VNNI
    (AVX-512 VNNI with VL, or AVX-VNNI)."""
    if not {"avx2", "fma", "f16c"} <= have:
        return 0
    return 2 if "avxvnni" in have or {"avx512vnni", "avx512vl"} <= have else 1


SIMD_AVX2, SIMD_VNNI = 1, 2
_FEATURES = _x86_features()
#: the x86 vector path of the quantized kernels (a compile-time constant, see _x86_simd)
SIMD = _x86_simd(_FEATURES)
#: whether the x86 vector path unpacks Q4_0 nibbles with one GF(2) affine transform
#: (``vgf2p8affineqb``, :func:`_ir_nibbles`)
GFNI = bool(SIMD) and "gfni" in _FEATURES
if SIMD:  # the vector path has inline assembly (_ir_scale), which Numba's JIT must parse
    import llvmlite.binding

    llvmlite.binding.initialize_native_asmparser()


# ---------------------------------------------------------------------------- helpers
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


@njit(error_model="numpy", **_FLAGS)  # no zero-division branch: the loops over it vectorise
def _times_sigmoid(z, y):
    """``z sigmoid(y)`` in float32 from ``e^-|y|`` (:func:`exp_nonpos`): no cancellation
    on either side, no branches (SiLU: ``y = z``; GELU's tanh form: ``0.5 z (1 + tanh(a))
    = z sigmoid(2a)``)."""
    e = exp_nonpos(-abs(y))
    s = np.float32(1) / (np.float32(1) + e)
    return z * (s if y >= np.float32(0) else e * s)


@njit(error_model="numpy", **_FLAGS)  # no zero-division branch: the loops over it vectorise
def _gelu_erf(z):
    """``0.5 z (1 + erf(z / sqrt 2))`` in float32 through ``erfc(|x|)`` (Numerical Recipes'
    Chebyshev fit, fractional error < 1.2e-7; :func:`exp_nonpos`): ``1 + erf(x)`` is
    ``erfc(-x)``, so the negative side keeps its small values; no branches."""
    x = abs(z) * np.float32(0.70710678118654752)
    t = np.float32(1) / (np.float32(1) + np.float32(0.5) * x)
    p = np.float32(0.17087277)
    p = p * t + np.float32(-0.82215223)
    p = p * t + np.float32(1.48851587)
    p = p * t + np.float32(-1.13520398)
    p = p * t + np.float32(0.27886807)
    p = p * t + np.float32(-0.18628806)
    p = p * t + np.float32(0.09678418)
    p = p * t + np.float32(0.37409196)
    p = p * t + np.float32(1.00002368)
    c = t * exp_nonpos(min(-x * x - np.float32(1.26551223) + t * p, np.float32(0)))  # erfc(x)
    return np.float32(0.5) * z * (np.float32(2) - c if z >= np.float32(0) else c)


@njit(**_FLAGS)
def _gelu_tanh(z):
    """GELU's tanh form ``0.5 z (1 + tanh(a))``, ``a = sqrt(2 / pi) (z + 0.044715 z^3)``,
    as ``z sigmoid(2a)`` (float32, branch-free)."""
    return _times_sigmoid(z, np.float32(1.5957691216057308) * (z + np.float32(0.044715) * z * z * z))


@njit(**_FLAGS)
def activation(z, kind, t):
    """The activation ``kind`` of a float32 pre-activation ``z``, in float32 (the smooth
    ones within 2e-6 relative for ``|z| < 4``, 1e-5 in the far tails:
    :func:`_times_sigmoid`, :func:`_gelu_erf`)."""
    if kind == RELU:
        return z if z > np.float32(0) else np.float32(0)
    if kind == FATRELU:
        return z if z > t else np.float32(0)
    if kind == SILU:
        return _times_sigmoid(z, z)
    return _gelu_erf(z) if kind == GELU else _gelu_tanh(z)


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
    bits = _f32_bits(v)
    bits = (bits + np.uint32(0xFFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return _bits_f32(bits)


@intrinsic
def _f32_bits(typingctx, v):
    """The IEEE bits of a float32 as uint32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return nbtypes.uint32(nbtypes.float32), codegen


@intrinsic
def _bits_f32(typingctx, b):
    """The float32 with IEEE bits ``b`` (uint32)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return nbtypes.float32(nbtypes.uint32), codegen


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


@njit(cache=True, nogil=True)
def roundtrip_q8_0_rows(X, out):
    """``out[t] = `` the Q8_0 of ``X[t]`` decoded: what the quantized kernels see of each
    token's input (``X [T, k]`` C-contiguous, ``k`` a multiple of 32; ``out`` likewise).
    Bit for bit ``quant.roundtrip(X, "q8_0")``, about 7x faster on 1024 x 384."""
    k = X.shape[1]
    xq = np.empty(k, np.int8)
    xd = np.empty(k // QK, np.float32)
    for t in range(X.shape[0]):
        quantize_q8_0_into(X[t], xq, xd)
        for j in range(k):
            out[t, j] = xd[j // QK] * np.float32(xq[j])


@njit(**_FLAGS)
def _scale(w, p, lut):
    return lut[(np.int32(w[p]) & 255) | ((np.int32(w[p + 1]) & 255) << 8)]


# ----------------------------------------------------- x86 vector IR (AVX2 / VNNI)
# Intrinsics emitting LLVM vector IR for one 32-value block; Numba inlines them into the
# calling row loop, so the <8 x float> accumulators (allocas) live in registers. Only
# reached through ``if SIMD ...`` branches, which Numba prunes on other CPUs.
_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_V16I8, _V32I8 = ir.VectorType(_I8, 16), ir.VectorType(_I8, 32)
_V16I16, _V8I32, _V8F32, _V32F32 = ir.VectorType(_I16, 16), ir.VectorType(_I32, 8), ir.VectorType(_F32, 8), \
    ir.VectorType(_F32, 32)
_V4F32 = ir.VectorType(_F32, 4)
# The bit matrices of ``vgf2p8affineqb`` (one per 64-bit lane; result bit i of a byte x is
# the parity of ``matrix byte 7-i & x``): the low 128 bits keep x's low nibble, the high
# 128 bits shift x right by 4.
_NIBBLE_MATRIX = ir.Constant(_V32I8, [0, 0, 0, 0, 0x08, 0x04, 0x02, 0x01] * 2
                             + [0, 0, 0, 0, 0x80, 0x40, 0x20, 0x10] * 2)


def _ir_fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _ir_elem(context, builder, arrty, arr, idx):
    """Pointer to ``arr[idx]`` (1-d array)."""
    return builder.gep(context.make_array(arrty)(context, builder, arr).data, [idx])


def _ir_load(builder, ptr, vty):
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)


def _ir_splat(builder, val, vty):
    el = vty.element
    if isinstance(el, ir.IntType) and val.type.width != el.width:
        val = builder.trunc(val, el) if val.type.width > el.width else builder.sext(val, el)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), val, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


def _ir_scale(context, builder, arrty, w, p):
    """The fp16 block scale at ``w[p:p+2]`` as float32: ``vmovd`` from a general register
    then ``vcvtph2ps``, as inline assembly. Written as IR (``fpext half``), LLVM loads the
    16 bits with ``vpinsrw``, which merges into a register it sometimes shares with an
    accumulator: every block then waits for the previous blocks' multiply-adds."""
    h = builder.load(builder.bitcast(_ir_elem(context, builder, arrty, w, p), _I16.as_pointer()), align=1)
    cvt = ir.InlineAsm(ir.FunctionType(_V4F32, [_I32]), "vmovd $1, $0\n\tvcvtph2ps $0, $0", "=x,r")
    return builder.extract_element(builder.call(cvt, [builder.zext(h, _I32)]), ir.Constant(_I32, 0))


def _ir_nibbles(builder, ptr):
    """16 bytes of Q4_0 nibbles -> ``<32 x i8>`` values 0..15 in element order (low
    nibbles are elements 0-15, high nibbles 16-31). With GFNI the bytes are loaded into
    both 128-bit halves (``vbroadcasti128``, a load) and one ``vgf2p8affineqb`` keeps the
    low nibbles in the low half and shifts the high ones down in the high half
    (:data:`_NIBBLE_MATRIX`); otherwise ``vpand``, a byte shift and ``vinserti128``."""
    nib = _ir_load(builder, ptr, _V16I8)
    if GFNI:
        both = builder.shuffle_vector(nib, ir.Constant(_V16I8, ir.Undefined),
                                      ir.Constant(ir.VectorType(_I32, 32), list(range(16)) * 2))
        affine = _ir_fn(builder, "llvm.x86.vgf2p8affineqb.256", _V32I8, [_V32I8, _V32I8, _I8])
        return builder.call(affine, [both, _NIBBLE_MATRIX, ir.Constant(_I8, 0)])
    lo = builder.and_(nib, ir.Constant(_V16I8, [15] * 16))
    hi = builder.lshr(nib, ir.Constant(_V16I8, [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))


def _ir_dot4(builder, u8, s8, init):
    """``init + sum of 4 adjacent u8 x s8 products`` per int32 lane (``<8 x i32>``)."""
    if SIMD == SIMD_VNNI:
        f = _ir_fn(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32, [_V8I32, _V8I32, _V8I32])
        return builder.call(f, [init, builder.bitcast(u8, _V8I32), builder.bitcast(s8, _V8I32)])
    # AVX2: pairwise int16 sums (no saturation: |u8 x s8 pair| <= 2 * 127 * 127 here)
    t = builder.call(_ir_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8]), [u8, s8])
    t = builder.call(_ir_fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16]),
                     [t, ir.Constant(_V16I16, [1] * 16)])
    return builder.add(t, init)


def _ir_acc_fma(builder, accp, lanes_i32, scale):
    """``acc[0:8] += float(lanes) * scale``."""
    accp = builder.bitcast(accp, _V8F32.as_pointer())
    fma = _ir_fn(builder, "llvm.fma.v8f32", _V8F32, [_V8F32, _V8F32, _V8F32])
    acc = builder.load(accp, align=4)
    builder.store(builder.call(fma, [builder.sitofp(lanes_i32, _V8F32), _ir_splat(builder, scale, _V8F32), acc]),
                  accp, align=4)


def _ir_xd(context, builder, arrty, xd, b, nb):
    """``(xd[b], xd[nb + b])`` of the input operand (:func:`prepare_input`): the
    activation block scale (float32) and minus the block sum (int32 bits), loaded
    through a pointer (Numba's indexing adds a negative-index fix-up per read)."""
    xs = builder.load(_ir_elem(context, builder, arrty, xd, b))
    bits = builder.bitcast(_ir_elem(context, builder, arrty, xd, builder.add(nb, b)), _I32.as_pointer())
    return xs, builder.load(bits)


@intrinsic
def _simd_q4_0_block(typingctx, acc, w, p, xq, xd, b, nb):
    """``acc[0:8] += d_w * xd[b] * lanes(sum_k (q_k - 8) x_k)`` for the Q4_0 block at
    ``w[p:p+18]`` and the activations ``xq[32 b:32 b+32]``; ``xd[nb + b]`` holds
    ``-sum_k x_k`` (int32 bits), which seeds every lane, so the eight lanes add up to the
    -8 offset (``q`` stays unsigned: u8 x s8)."""
    def codegen(context, builder, signature, args):
        accp, w_, p_, xq_, xd_, b_, nb_ = args
        xs, neg = _ir_xd(context, builder, signature.args[4], xd_, b_, nb_)
        sc = builder.fmul(_ir_scale(context, builder, signature.args[1], w_, p_), xs)
        q = _ir_nibbles(builder, _ir_elem(context, builder, signature.args[1], w_,
                                          builder.add(p_, ir.Constant(p_.type, 2))))
        xo = builder.mul(b_, ir.Constant(b_.type, QK))
        x = _ir_load(builder, _ir_elem(context, builder, signature.args[3], xq_, xo), _V32I8)
        _ir_acc_fma(builder, accp, _ir_dot4(builder, q, x, _ir_splat(builder, neg, _V8I32)), sc)
        return context.get_dummy_value()
    return nbtypes.void(acc, w, p, xq, xd, b, nb), codegen


@intrinsic
def _simd_q8_0_block(typingctx, acc, w, p, xq, xd, b, nb):
    """``acc[0:8] += d_w * xd[b] * lanes(sum_k w_k x_k)`` for the Q8_0 block at
    ``w[p:p+34]`` and activations ``xq[32 b:32 b+32]`` (magnitudes at ``xq[32 (nb + b):]``,
    minus the block sum at ``xd[nb + b]``). VNNI: ``(w + 128)`` as u8 times ``x``, lanes
    seeded with ``-16 sum x`` (eight lanes: ``-128 sum x``); AVX2: ``|x|`` times ``w``
    with the sign of ``x`` (ggml's Q8_0 keeps |w| <= 127)."""
    def codegen(context, builder, signature, args):
        accp, w_, p_, xq_, xd_, b_, nb_ = args
        xs, neg = _ir_xd(context, builder, signature.args[4], xd_, b_, nb_)
        sc = builder.fmul(_ir_scale(context, builder, signature.args[1], w_, p_), xs)
        wv = _ir_load(builder, _ir_elem(context, builder, signature.args[1], w_,
                                        builder.add(p_, ir.Constant(p_.type, 2))), _V32I8)
        xo = builder.mul(b_, ir.Constant(b_.type, QK))
        x = _ir_load(builder, _ir_elem(context, builder, signature.args[3], xq_, xo), _V32I8)
        if SIMD == SIMD_VNNI:
            seed = builder.mul(_ir_splat(builder, neg, _V8I32), ir.Constant(_V8I32, [16] * 8))
            lanes = _ir_dot4(builder, builder.xor(wv, ir.Constant(_V32I8, [0x80] * 32)), x, seed)
        else:
            xao = builder.mul(builder.add(nb_, b_), ir.Constant(b_.type, QK))
            xa = _ir_load(builder, _ir_elem(context, builder, signature.args[3], xq_, xao), _V32I8)
            signed = builder.call(_ir_fn(builder, "llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8]), [wv, x])
            lanes = _ir_dot4(builder, xa, signed, ir.Constant(_V8I32, [0] * 8))
        _ir_acc_fma(builder, accp, lanes, sc)
        return context.get_dummy_value()
    return nbtypes.void(acc, w, p, xq, xd, b, nb), codegen


def _ir_axpy_term(context, builder, wty, w, p, h, acc, q4):
    """``acc + h * d_w * q`` (``<32 x float>``) for the block at ``w[p:]``: Q4_0 nibbles
    minus 8 (``q4``) or Q8_0 int8 values."""
    sc = builder.fmul(_ir_scale(context, builder, wty, w, p), h)
    src = _ir_elem(context, builder, wty, w, builder.add(p, ir.Constant(p.type, 2)))
    q = builder.sub(_ir_nibbles(builder, src), ir.Constant(_V32I8, [8] * 32)) if q4 else _ir_load(builder, src, _V32I8)
    fma = _ir_fn(builder, "llvm.fma.v32f32", _V32F32, [_V32F32, _V32F32, _V32F32])
    return builder.call(fma, [builder.sitofp(q, _V32F32), _ir_splat(builder, sc, _V32F32), acc])


def _simd_axpy_block(q4: bool):
    """Intrinsic ``(y, yo, w, p, h)``: ``y[yo:yo+32] += h * d_w * q`` for the block at
    ``w[p:]``: Q4_0 nibbles minus 8 (``q4``) or Q8_0 int8 values."""
    def typer(typingctx, y, yo, w, p, h):
        def codegen(context, builder, signature, args):
            y_, yo_, w_, p_, h_ = args
            yp = builder.bitcast(_ir_elem(context, builder, signature.args[0], y_, yo_), _V32F32.as_pointer())
            acc = _ir_axpy_term(context, builder, signature.args[2], w_, p_, h_, builder.load(yp, align=4), q4)
            builder.store(acc, yp, align=4)
            return context.get_dummy_value()
        return nbtypes.void(y, yo, w, p, h), codegen
    typer.__name__ = f"_simd_axpy_{'q4_0' if q4 else 'q8_0'}_block"
    return intrinsic(typer)


_simd_axpy_q8_0_block = _simd_axpy_block(False)
_simd_axpy_q4_0_block = _simd_axpy_block(True)


@intrinsic
def _simd_axpy4_q8_0_block(typingctx, y, yo, w1, w2, w3, w4, p, h1, h2, h3, h4):
    """``y[yo:yo+32] += sum_k h_k * d_wk * q_k`` for the Q8_0 blocks at ``w_k[p:]``, four
    rows: one load and one store of ``y`` for four multiply-adds, chained in row order
    (the floats of four :func:`_simd_axpy_block` calls)."""
    def codegen(context, builder, signature, args):
        y_, yo_, *ws, p_, h1_, h2_, h3_, h4_ = args
        yp = builder.bitcast(_ir_elem(context, builder, signature.args[0], y_, yo_), _V32F32.as_pointer())
        acc = builder.load(yp, align=4)
        for k, (w_, h_) in enumerate(zip(ws, (h1_, h2_, h3_, h4_))):
            acc = _ir_axpy_term(context, builder, signature.args[2 + k], w_, p_, h_, acc, False)
        builder.store(acc, yp, align=4)
        return context.get_dummy_value()
    return nbtypes.void(y, yo, w1, w2, w3, w4, p, h1, h2, h3, h4), codegen


def _prefetch_into(locality: int):
    """Intrinsic ``(arr, idx)``: prefetch the cache line of ``arr[idx]`` (1-d) for reading,
    LLVM ``locality`` 3 into L1 (``prefetcht0`` / ``prfm pldl1keep``), 2 into L2
    (``prefetcht1`` / ``prfm pldl2keep``)."""
    def typer(typingctx, arr, idx):
        def codegen(context, builder, signature, args):
            ptr = builder.bitcast(_ir_elem(context, builder, signature.args[0], *args), _I8.as_pointer())
            f = _ir_fn(builder, "llvm.prefetch.p0", ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
            builder.call(f, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, locality), ir.Constant(_I32, 1)])
            return context.get_dummy_value()
        return nbtypes.void(arr, idx), codegen
    typer.__name__ = f"_prefetch_l{4 - locality}"
    return intrinsic(typer)


# Quantized rows are prefetched into L2: measured on Zen 4 (kernels.py, 7B shapes, 10%),
# sparse Q4_0 rows 0.38 -> 0.30 ms and Q8_0 rows 0.62-0.78 -> 0.41-0.46 ms against
# prefetching into L1, which made float32 rows slower (0.76-0.92 -> 1.04-1.19 ms)
_prefetch_l2 = _prefetch_into(2)


@intrinsic
def _acc8(typingctx):
    """A zeroed ``<8 x float>`` accumulator on the stack (pointer to its float32 lanes):
    an ``alloca`` in the entry block, so LLVM keeps it in a vector register."""
    def codegen(context, builder, signature, args):
        p = cgutils.alloca_once(builder, _V8F32)
        builder.store(ir.Constant(_V8F32, None), p)
        return builder.bitcast(p, _F32.as_pointer())
    return nbtypes.CPointer(nbtypes.float32)(), codegen


@intrinsic
def _acc_sum4(typingctx, a0, a1, a2, a3):
    """The sum of all lanes of four :func:`_acc8` accumulators."""
    def codegen(context, builder, signature, args):
        v = [builder.load(builder.bitcast(a, _V8F32.as_pointer())) for a in args]
        t = builder.fadd(builder.fadd(v[0], v[1]), builder.fadd(v[2], v[3]))
        s = builder.extract_element(t, ir.Constant(_I32, 0))
        for lane in range(1, _V8F32.count):
            s = builder.fadd(s, builder.extract_element(t, ir.Constant(_I32, lane)))
        return s
    return nbtypes.float32(a0, a1, a2, a3), codegen


# ----------------------------------------------------------------- per-row primitives
# Lengths come from the callers: the chunk loops below fold ``SPEC_D`` into ``d``, the
# predictor kernels pass their own (rank, neuron count).
@njit(**_FLAGS)
def dot_f32(w, off, x, d):
    """``sum_k w[off + k] * x[k]`` for a float32 row."""
    seg = w[off:off + d]
    s = np.float32(0)
    for k in range(d):
        s += seg[k] * x[k]
    return s


@njit(**_FLAGS)
def dot4_f32(w1, w2, w3, w4, off, x, d):
    """Four rows' :func:`dot_f32` in one loop: four streams of reads in flight."""
    s1 = w1[off:off + d]
    s2 = w2[off:off + d]
    s3 = w3[off:off + d]
    s4 = w4[off:off + d]
    a1 = a2 = a3 = a4 = np.float32(0)
    for k in range(d):
        xk = x[k]
        a1 += s1[k] * xk
        a2 += s2[k] * xk
        a3 += s3[k] * xk
        a4 += s4[k] * xk
    return a1, a2, a3, a4


@njit(**_FLAGS)
def dot8_f32(w1, w2, w3, w4, w5, w6, w7, w8, off, x, d):
    """Eight rows' :func:`dot_f32` in one loop: eight streams of reads in flight. The row
    gather reads scattered rows faster the more it reads at once (Llama-2-7B shape, f32,
    10%, alternating in one process: pairs 0.69-0.78 ms, fours 0.61-0.73 ms, eights
    0.55-0.71 ms against fours' 0.64-0.82 ms)."""
    s1 = w1[off:off + d]
    s2 = w2[off:off + d]
    s3 = w3[off:off + d]
    s4 = w4[off:off + d]
    s5 = w5[off:off + d]
    s6 = w6[off:off + d]
    s7 = w7[off:off + d]
    s8 = w8[off:off + d]
    a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = np.float32(0)
    for k in range(d):
        xk = x[k]
        a1 += s1[k] * xk
        a2 += s2[k] * xk
        a3 += s3[k] * xk
        a4 += s4[k] * xk
        a5 += s5[k] * xk
        a6 += s6[k] * xk
        a7 += s7[k] * xk
        a8 += s8[k] * xk
    return a1, a2, a3, a4, a5, a6, a7, a8


@njit(**_FLAGS)
def dot4x4_f32(w1, w2, w3, w4, x1, x2, x3, x4, d):
    """The 16 dots of four float32 rows with four inputs in one loop (``[x1 . w1, x1 .
    w2, ..., x4 . w4]``): each element loaded serves four products."""
    a1 = a2 = a3 = a4 = b1 = b2 = b3 = b4 = np.float32(0)
    c1 = c2 = c3 = c4 = e1 = e2 = e3 = e4 = np.float32(0)
    for k in range(d):
        p, q, s, u = x1[k], x2[k], x3[k], x4[k]
        v1, v2, v3, v4 = w1[k], w2[k], w3[k], w4[k]
        a1 += v1 * p
        a2 += v2 * p
        a3 += v3 * p
        a4 += v4 * p
        b1 += v1 * q
        b2 += v2 * q
        b3 += v3 * q
        b4 += v4 * q
        c1 += v1 * s
        c2 += v2 * s
        c3 += v3 * s
        c4 += v4 * s
        e1 += v1 * u
        e2 += v2 * u
        e3 += v3 * u
        e4 += v4 * u
    return a1, a2, a3, a4, b1, b2, b3, b4, c1, c2, c3, c4, e1, e2, e3, e4


@njit(**_FLAGS)
def dot_q8_0(w, off, xq, xd, lut, nb):
    """Dot of a Q8_0 row (int8 view, byte offset ``off``) with Q8_0 activations (the ARM
    form: a per-block int8 reduction LLVM turns into two ``sdot`` + ``addv``)."""
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


@njit(inline="always", **_FLAGS)
def _q8_0_step(acc, w, off, xq, xd, nb, b):
    _simd_q8_0_block(acc, w, off + b * Q8_BYTES, xq, xd, b, nb)


@njit(inline="always", **_FLAGS)
def _q4_0_step(acc, w, off, xq, xd, nb, b):
    _simd_q4_0_block(acc, w, off + b * Q4_BYTES, xq, xd, b, nb)


# The sparse loops prefetch the next row they will read (another neuron's part: not
# adjacent, so the hardware prefetcher does not follow) into L2 while they compute the
# current one. On the x86 vector path the prefetches are spread over the current row's
# blocks, one per ``PF_STEP`` bytes of the block stride: issued all at once before the row
# (18 lines per Q4_0 part at d 2048), they fill the miss buffers and stall the loop.
# Measured on the TinyLlama-shape Q4_0 decode (10% density, tokens alternating in one
# process): the sparse FFN 5.6-6.4 -> 4.1-4.8 ms per token. The row gather
# (``_rows_chunk``) reads quantized rows in pairs (:func:`_dot2_simd`), prefetching the
# next pair's rows along the way: one row at a time, the spread prefetch was slower than a
# burst right after a cache flush (Llama-2-7B shape, Q4_0, 10%: best 295-321 us against
# 264-267 us); in pairs, over 40 random row sets, 152-155 us against the burst's 192-195
# us (TinyLlama shape: 46-56 against 60-73 us; rows in L2: 39-47 against 50-56 us).
PF_STEP = 48


@njit(inline="always", **_FLAGS)
def _pf_blocks(pw, off, b, nblocks, bb):
    """Prefetch ``pw[off + b bb : off + (b + nblocks) bb]`` (``bb`` bytes per block; 0:
    nothing) into L2, one prefetch per :data:`PF_STEP` bytes."""
    for k in range(0, nblocks * bb, PF_STEP):
        _prefetch_l2(pw, off + b * bb + k)


@njit(inline="always", **_FLAGS)
def _dot_simd(step, w, off, xq, xd, nb, pw, bb):
    """A row's dot product from ``step`` (one block into an accumulator), blocks ``b mod 4``
    into four accumulators; prefetching the same part ``pw[off:]`` of another row (``bb``
    bytes per block, 0: none) along the way (:func:`_pf_blocks`)."""
    a0, a1, a2, a3 = _acc8(), _acc8(), _acc8(), _acc8()
    n4 = nb - nb % 4
    for b in range(0, n4, 4):
        _pf_blocks(pw, off, b, 4, bb)
        step(a0, w, off, xq, xd, nb, b)
        step(a1, w, off, xq, xd, nb, b + 1)
        step(a2, w, off, xq, xd, nb, b + 2)
        step(a3, w, off, xq, xd, nb, b + 3)
    _pf_blocks(pw, off, n4, nb - n4, bb)
    for b in range(n4, nb):
        step(a0, w, off, xq, xd, nb, b)
    return _acc_sum4(a0, a1, a2, a3)


@njit(inline="always", **_FLAGS)
def dot_q8_0_simd(w, off, xq, xd, nb, pw, bb):
    """:func:`dot_q8_0` on x86 AVX2 / VNNI (:func:`_simd_q8_0_block`), prefetching
    ``pw[off:]`` along the way (``bb``: :func:`_dot_simd`)."""
    return _dot_simd(_q8_0_step, w, off, xq, xd, nb, pw, bb)


@njit(inline="always", **_FLAGS)
def dot_q4_0_simd(w, off, xq, xd, nb, pw, bb):
    """:func:`dot_q4_0` on x86 AVX2 / VNNI (:func:`_simd_q4_0_block`), prefetching
    ``pw[off:]`` along the way (``bb``: :func:`_dot_simd`)."""
    return _dot_simd(_q4_0_step, w, off, xq, xd, nb, pw, bb)


@njit(inline="always", **_FLAGS)
def _dot2_simd(step, w1, w2, off, xq, xd, nb, n1, n2, bb):
    """Two rows' :func:`_dot_simd` in one loop (their blocks interleaved, four accumulators
    each: the activation blocks are loaded once for both), prefetching the same part of
    rows ``n1`` and ``n2`` along the way."""
    a0, a1, a2, a3 = _acc8(), _acc8(), _acc8(), _acc8()
    c0, c1, c2, c3 = _acc8(), _acc8(), _acc8(), _acc8()
    n4 = nb - nb % 4
    for b in range(0, n4, 4):
        _pf_blocks(n1, off, b, 4, bb)
        _pf_blocks(n2, off, b, 4, bb)
        step(a0, w1, off, xq, xd, nb, b)
        step(c0, w2, off, xq, xd, nb, b)
        step(a1, w1, off, xq, xd, nb, b + 1)
        step(c1, w2, off, xq, xd, nb, b + 1)
        step(a2, w1, off, xq, xd, nb, b + 2)
        step(c2, w2, off, xq, xd, nb, b + 2)
        step(a3, w1, off, xq, xd, nb, b + 3)
        step(c3, w2, off, xq, xd, nb, b + 3)
    _pf_blocks(n1, off, n4, nb - n4, bb)
    _pf_blocks(n2, off, n4, nb - n4, bb)
    for b in range(n4, nb):
        step(a0, w1, off, xq, xd, nb, b)
        step(c0, w2, off, xq, xd, nb, b)
    return _acc_sum4(a0, a1, a2, a3), _acc_sum4(c0, c1, c2, c3)


@njit(**_FLAGS)
def axpy_f32(w, off, h, y, d):
    """``y[k] += h * w[off + k]``."""
    seg = w[off:off + d]
    for k in range(d):
        y[k] += h * seg[k]


@njit(**_FLAGS)
def axpy4_f32(w1, w2, w3, w4, off, h1, h2, h3, h4, y, d):
    """``y[k] += h1 w1[off + k] + ... + h4 w4[off + k]``: four rows, one pass over ``y``."""
    s1 = w1[off:off + d]
    s2 = w2[off:off + d]
    s3 = w3[off:off + d]
    s4 = w4[off:off + d]
    for k in range(d):
        y[k] += h1 * s1[k] + h2 * s2[k] + h3 * s3[k] + h4 * s4[k]


@njit(**_FLAGS)
def axpy_q8_0(w, off, h, y, lut, nb):
    for b in range(nb):
        p = off + b * Q8_BYTES
        s = h * _scale(w, p, lut)
        for k in range(QK):
            y[b * QK + k] += s * np.float32(w[p + 2 + k])


@njit(**_FLAGS)
def axpy_q4_0(w, off, h, y, lut, nb):
    for b in range(nb):
        p = off + b * Q4_BYTES
        s = h * _scale(w, p, lut)
        for j in range(QK // 2):
            q = np.int32(w[p + 2 + j])
            y[b * QK + j] += s * np.float32((q & 15) - 8)
            y[b * QK + QK // 2 + j] += s * np.float32(((q >> 4) & 15) - 8)


@njit(**_FLAGS)
def axpy_q8_0_simd(w, off, h, y, nb, pw, bb):
    """:func:`axpy_q8_0` on x86 AVX2: one 32-wide int8 -> float multiply-add per block;
    prefetching ``pw[off:]`` along the way (``bb``: :func:`_dot_simd`)."""
    n2 = nb - nb % 2
    for b in range(0, n2, 2):
        _pf_blocks(pw, off, b, 2, bb)
        _simd_axpy_q8_0_block(y, b * QK, w, off + b * Q8_BYTES, h)
        _simd_axpy_q8_0_block(y, (b + 1) * QK, w, off + (b + 1) * Q8_BYTES, h)
    if n2 < nb:
        _pf_blocks(pw, off, n2, 1, bb)
        _simd_axpy_q8_0_block(y, n2 * QK, w, off + n2 * Q8_BYTES, h)


@njit(**_FLAGS)
def axpy_q4_0_simd(w, off, h, y, nb, pw, bb):
    """:func:`axpy_q4_0` on x86 AVX2 (:func:`axpy_q8_0_simd`)."""
    n2 = nb - nb % 2
    for b in range(0, n2, 2):
        _pf_blocks(pw, off, b, 2, bb)
        _simd_axpy_q4_0_block(y, b * QK, w, off + b * Q4_BYTES, h)
        _simd_axpy_q4_0_block(y, (b + 1) * QK, w, off + (b + 1) * Q4_BYTES, h)
    if n2 < nb:
        _pf_blocks(pw, off, n2, 1, bb)
        _simd_axpy_q4_0_block(y, n2 * QK, w, off + n2 * Q4_BYTES, h)


@njit(inline="always", **_FLAGS)
def _qdot(fmt, w, off, xq, xd, lut, nb, pw, pf):
    """A quantized row's dot product; with ``pf`` it prefetches the same part of the row
    ``pw`` into L2: spread over the blocks on the x86 vector path (:data:`PF_STEP`), up
    front elsewhere."""
    if SIMD > 0:
        if fmt == Q8_0:
            return dot_q8_0_simd(w, off, xq, xd, nb, pw, Q8_BYTES if pf else 0)
        return dot_q4_0_simd(w, off, xq, xd, nb, pw, Q4_BYTES if pf else 0)
    if pf:
        prefetch_bytes(pw, off, nb * (Q8_BYTES if fmt == Q8_0 else Q4_BYTES))
    if fmt == Q8_0:
        return dot_q8_0(w, off, xq, xd, lut, nb)
    return dot_q4_0(w, off, xq, xd, lut, nb)


@njit(inline="always", **_FLAGS)
def _qaxpy(fmt, w, off, h, y, lut, nb, pw, pf):
    """``y += h * row`` for a quantized row, prefetching ``pw`` like :func:`_qdot`."""
    if SIMD > 0:
        if fmt == Q8_0:
            axpy_q8_0_simd(w, off, h, y, nb, pw, Q8_BYTES if pf else 0)
        else:
            axpy_q4_0_simd(w, off, h, y, nb, pw, Q4_BYTES if pf else 0)
        return
    if pf:
        prefetch_bytes(pw, off, nb * (Q8_BYTES if fmt == Q8_0 else Q4_BYTES))
    if fmt == Q8_0:
        axpy_q8_0(w, off, h, y, lut, nb)
    else:
        axpy_q4_0(w, off, h, y, lut, nb)


@njit(**_FLAGS)
def row_dot(fmt, wf, wq, i, off, x, xq, xd, lut, d):
    """Row ``i``'s part at ``off`` dotted with the input (``x`` for float32 rows, the
    quantized operand ``xq``/``xd`` otherwise)."""
    if fmt == F32:
        return dot_f32(wf[i], off, x, d)
    return _qdot(fmt, wq[i], off, xq, xd, lut, d // QK, wq[i], False)


@njit(inline="always", **_FLAGS)
def row_dot_next(fmt, wf, wq, i, j, off, x, xq, xd, lut, d):
    """:func:`row_dot` of row ``i`` that also prefetches the same part of row ``j`` (the
    next one a sparse loop reads) into L2 (:func:`_qdot`). float32 rows prefetch nothing
    here (long rows: the hardware prefetcher follows them)."""
    if fmt == F32:
        return dot_f32(wf[i], off, x, d)
    return _qdot(fmt, wq[i], off, xq, xd, lut, d // QK, wq[j], True)


@njit(**_FLAGS)
def row_axpy(fmt, wf, wq, i, off, h, y, lut, d):
    """``y += h * (row i's part at off)``."""
    if fmt == F32:
        axpy_f32(wf[i], off, h, y, d)
    else:
        _qaxpy(fmt, wq[i], off, h, y, lut, d // QK, wq[i], False)


@njit(inline="always", **_FLAGS)
def row_axpy_next(fmt, wf, wq, i, j, off, h, y, lut, d):
    """:func:`row_axpy` that prefetches row ``j`` like :func:`row_dot_next`."""
    if fmt == F32:
        axpy_f32(wf[i], off, h, y, d)
    else:
        _qaxpy(fmt, wq[i], off, h, y, lut, d // QK, wq[j], True)


@njit(inline="always", **_FLAGS)
def qrow_dot2_next(fmt, wq, i, j, ni, nj, off, xq, xd, lut, d):
    """:func:`row_dot` of quantized rows ``i`` and ``j`` read together, prefetching the
    same part of rows ``ni`` and ``nj`` (the next pair a sparse loop reads): on the x86
    vector path :func:`_dot2_simd`, elsewhere one row after the other."""
    nb = d // QK
    if SIMD > 0:
        if fmt == Q8_0:
            return _dot2_simd(_q8_0_step, wq[i], wq[j], off, xq, xd, nb, wq[ni], wq[nj], Q8_BYTES)
        return _dot2_simd(_q4_0_step, wq[i], wq[j], off, xq, xd, nb, wq[ni], wq[nj], Q4_BYTES)
    return (_qdot(fmt, wq[i], off, xq, xd, lut, nb, wq[ni], True),
            _qdot(fmt, wq[j], off, xq, xd, lut, nb, wq[nj], True))


@njit(**_FLAGS)
def qrows_dot(fmt, wq, lo, hi, shift, xq, xd, lut, d, out):
    """``out[r + shift] = row r . x`` for the quantized rows ``lo..hi`` of ``wq``, read in
    pairs from the two halves of the range (two sequential streams), the next pair
    prefetched along the way (:func:`qrow_dot2_next`); an odd last row alone."""
    half = (hi - lo) // 2
    for r in range(lo, lo + half):
        nr = min(r + 1, lo + half - 1)
        out[r + shift], out[r + half + shift] = qrow_dot2_next(fmt, wq, r, r + half, nr, nr + half, 0, xq, xd,
                                                               lut, d)
    if (hi - lo) % 2:
        out[hi - 1 + shift] = _qdot(fmt, wq[hi - 1], 0, xq, xd, lut, d // QK, wq[hi - 1], False)


@njit(**_FLAGS)
def part_size(fmt, d):
    """Elements of one part in its array view (float32 for f32, bytes otherwise)."""
    if fmt == F32:
        return d
    return (d // QK) * (Q8_BYTES if fmt == Q8_0 else Q4_BYTES)


@njit(**_FLAGS)
def prefetch_bytes(row, off, nbytes):
    """Prefetch ``row[off:off + nbytes]`` of a 1-d int8 view, every cache line of it, into L2."""
    for k in range(off, off + nbytes, 64):
        _prefetch_l2(row, k)


@njit(**_FLAGS)
def prefetch_part(fmt, wq, i, off, d):
    """Prefetch one quantized part (gate, up or down row) of bundle ``i``: the next row of
    a quantized row loop, where the hardware prefetcher does not follow (rows that are
    not adjacent: sparse indices, or one part of each bundle). float32 rows are long
    enough for the hardware prefetcher."""
    prefetch_bytes(wq[i], off, part_size(fmt, d))


@njit(**_FLAGS)
def _spec(spec, value):
    return spec if spec >= 0 else value


@njit(cache=True, nogil=True)
def prepare_input(fmt, x, xq, xd):
    """The quantized input operand of one token (see the module docstring): Q8_0 of
    ``x[d]`` into ``xq[:d]`` / ``xd[:d/32]``; for the x86 vector paths also magnitudes
    into ``xq[d:]`` and minus the block sums (int32 bits) into ``xd[d/32:]``. Nothing for f32."""
    if fmt == F32:
        return
    d = x.shape[0]
    nb = d // QK
    quantize_q8_0_into(x, xq[:d], xd[:nb])
    if SIMD == 0:
        return
    for b in range(nb):
        t = np.int32(0)
        for k in range(QK):
            v = np.int32(xq[b * QK + k])
            t += v
            xq[d + b * QK + k] = np.int8(v if v >= 0 else -v)
        xd[nb + b] = _bits_f32(np.uint32(-t))


@njit(**_FLAGS)
def _gate(g, bg, i, act, act_t, use_gpre):
    """Gate activation of neuron ``i`` from its pre-activation ``g`` (bias added unless
    ``g`` came precomputed, bias included)."""
    if bg.shape[0] > 0 and not use_gpre:
        g += bg[i]
    return activation(g, act, act_t)


@njit(**_FLAGS)
def _finish(a, u, bu, i, gated, act, act_t, up_relu, out_t):
    """``h`` of neuron ``i`` from its gate activation ``a`` (gated FFNs) and up
    pre-activation ``u`` (bias not yet added)."""
    if bu.shape[0] > 0:
        u += bu[i]
    if gated:
        if up_relu and u < np.float32(0):
            u = np.float32(0)
        h = a * u
    else:
        h = activation(u, act, act_t)
    if out_t > np.float32(0) and abs(h) <= out_t:
        h = np.float32(0)
    return h


@njit(**_FLAGS)
def neuron(fmt, wf, wq, i, x, xq, xd, lut, d, gated, act, act_t, up_relu, out_t, po_g, po_u, bg, bu, gpre, use_gpre):
    """Activation ``h`` of neuron ``i`` (gate first; up skipped when the gate decides)."""
    a = np.float32(1)
    if gated:
        g = gpre if use_gpre else row_dot(fmt, wf, wq, i, po_g, x, xq, xd, lut, d)
        a = _gate(g, bg, i, act, act_t, use_gpre)
        if a == np.float32(0) and gate_can_skip(act):
            return np.float32(0)
    u = row_dot(fmt, wf, wq, i, po_u, x, xq, xd, lut, d)
    return _finish(a, u, bu, i, gated, act, act_t, up_relu, out_t)


@njit(**_FLAGS)
def neurons4_f32(wf, idx, p, x, d, gated, act, act_t, up_relu, out_t, po_g, po_u, po_d, bg, bu, gpre, use_gpre,
                 h_out, acc):
    """Float32 neurons ``idx[p:p+4]``: ``h_out[p:p+4]`` and ``acc += sum h down``, each
    part of the four bundles read together (:func:`dot4_f32`, :func:`axpy4_f32`: four
    streams of reads in flight); when a ReLU-family gate zeroes one of them, the others'
    up and down rows go one at a time, and when an activation is zero (a ReLU up
    projection, the output threshold), the others' down rows."""
    r1, r2, r3, r4 = wf[idx[p]], wf[idx[p + 1]], wf[idx[p + 2]], wf[idx[p + 3]]
    a1 = a2 = a3 = a4 = np.float32(1)
    if gated:
        if use_gpre:
            g1, g2, g3, g4 = gpre[p], gpre[p + 1], gpre[p + 2], gpre[p + 3]
        else:
            g1, g2, g3, g4 = dot4_f32(r1, r2, r3, r4, po_g, x, d)
        a1 = _gate(g1, bg, idx[p], act, act_t, use_gpre)
        a2 = _gate(g2, bg, idx[p + 1], act, act_t, use_gpre)
        a3 = _gate(g3, bg, idx[p + 2], act, act_t, use_gpre)
        a4 = _gate(g4, bg, idx[p + 3], act, act_t, use_gpre)
        zero = np.float32(0)
        if gate_can_skip(act) and (a1 == zero or a2 == zero or a3 == zero or a4 == zero):
            for q, a in enumerate((a1, a2, a3, a4)):
                h = zero
                if a != zero:
                    h = _finish(a, dot_f32(wf[idx[p + q]], po_u, x, d), bu, idx[p + q], gated, act, act_t,
                                up_relu, out_t)
                    if h != zero:
                        axpy_f32(wf[idx[p + q]], po_d, h, acc, d)
                h_out[p + q] = h
            return
    u1, u2, u3, u4 = dot4_f32(r1, r2, r3, r4, po_u, x, d)
    h1 = _finish(a1, u1, bu, idx[p], gated, act, act_t, up_relu, out_t)
    h2 = _finish(a2, u2, bu, idx[p + 1], gated, act, act_t, up_relu, out_t)
    h3 = _finish(a3, u3, bu, idx[p + 2], gated, act, act_t, up_relu, out_t)
    h4 = _finish(a4, u4, bu, idx[p + 3], gated, act, act_t, up_relu, out_t)
    h_out[p], h_out[p + 1], h_out[p + 2], h_out[p + 3] = h1, h2, h3, h4
    zero = np.float32(0)
    if h1 != zero and h2 != zero and h3 != zero and h4 != zero:
        axpy4_f32(r1, r2, r3, r4, po_d, h1, h2, h3, h4, acc, d)
        return
    for q, h in enumerate((h1, h2, h3, h4)):  # skip the down rows of the zeros
        if h != zero:
            axpy_f32(wf[idx[p + q]], po_d, h, acc, d)


# ---------------------------------------------------------------------- decode kernels
# Each decode kernel is a per-chunk body plus two drivers: ``*_par`` runs the chunks on
# the thread pool (prange), ``*_ser`` in the calling thread (small work: a fork/join costs
# more than it saves, and much more on a loaded machine).
@njit(**_FLAGS)
def _prefetch_bundle(fmt, wq, i, gate, po_g, po_u, po_d, d):
    """Prefetch bundle ``i``'s up and down parts, and its gate part if ``gate``."""
    if gate:
        prefetch_part(fmt, wq, i, po_g, d)
    prefetch_part(fmt, wq, i, po_u, d)
    prefetch_part(fmt, wq, i, po_d, d)


@njit(**_FLAGS)
def _ffn_chunk(x, xq, xd, wf, wq, idx, lo, hi, fmt, d, gated, act, act_t, up_relu, out_t, po_g, po_u, po_d,
               bg, bu, lut, gpre, h_out, acc):
    fmt = _spec(SPEC_FMT, fmt)
    d = _spec(SPEC_D, d)
    gated = _spec(SPEC_GATED, gated)
    act = _spec(SPEC_ACT, act)
    up_relu = _spec(SPEC_UP_RELU, up_relu)
    use_gpre = gpre.shape[0] > 0
    if fmt == F32:  # neurons in fours: four streams of reads in flight (see neurons4_f32)
        p = lo
        while p + 3 < hi:
            neurons4_f32(wf, idx, p, x, d, gated, act, act_t, up_relu, out_t, po_g, po_u, po_d, bg, bu, gpre,
                         use_gpre, h_out, acc)
            p += 4
        for p in range(p, hi):  # the rest one at a time
            h = neuron(fmt, wf, wq, idx[p], x, xq, xd, lut, d, gated, act, act_t, up_relu, out_t, po_g, po_u,
                       bg, bu, gpre[p] if use_gpre else np.float32(0), use_gpre)
            h_out[p] = h
            if h != np.float32(0):
                axpy_f32(wf[idx[p]], po_d, h, acc, d)
        return
    # quantized: each part read prefetches the same part of the next neuron
    if lo < hi:
        _prefetch_bundle(fmt, wq, idx[lo], gated and not use_gpre, po_g, po_u, po_d, d)
    for p in range(lo, hi):
        i = idx[p]
        j = idx[p + 1] if p + 1 < hi else i
        a = np.float32(1)
        if gated:
            g = gpre[p] if use_gpre else row_dot_next(fmt, wf, wq, i, j, po_g, x, xq, xd, lut, d)
            a = _gate(g, bg, i, act, act_t, use_gpre)
            if a == np.float32(0) and gate_can_skip(act):
                h_out[p] = np.float32(0)
                if j != i:
                    _prefetch_bundle(fmt, wq, j, False, po_g, po_u, po_d, d)
                continue
        u = row_dot_next(fmt, wf, wq, i, j, po_u, x, xq, xd, lut, d)
        h = _finish(a, u, bu, i, gated, act, act_t, up_relu, out_t)
        h_out[p] = h
        if h != np.float32(0):
            row_axpy_next(fmt, wf, wq, i, j, po_d, h, acc, lut, d)
        elif j != i:
            prefetch_part(fmt, wq, j, po_d, d)


@njit(**_FLAGS)
def _operand(x, fmt):
    """The input operand ``xq, xd`` of ``x`` for ``fmt`` (:func:`prepare_input`), not
    specialised: for matrices other than the FFN's (projections, predictors)."""
    d = x.shape[0]
    xq = np.empty(2 * d, np.int8)
    xd = np.empty(2 * max(d // QK, 1), np.float32)
    prepare_input(fmt, x, xq, xd)
    return xq, xd


@njit(**_FLAGS)
def _input(x, fmt):
    """:func:`_operand` for the FFN's format (specialised)."""
    return _operand(x, _spec(SPEC_FMT, fmt))


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
    xq, xd = _input(x, fmt)
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
    xq, xd = _input(x, fmt)
    part = np.zeros((1, y.shape[0]), np.float32)
    _ffn_chunk(x, xq, xd, wf, wq, idx, 0, idx.shape[0], fmt, d, gated, act, act_t, up_relu, out_t, po_g, po_u,
               po_d, bg, bu, lut, gpre, h_out, part[0])
    _reduce(part, bd, y)


@njit(**_FLAGS)
def _rows_chunk(x, xq, xd, wf, wq, idx, lo, hi, fmt, d, po, bias, lut, out):
    fmt = _spec(SPEC_FMT, fmt)
    d = _spec(SPEC_D, d)
    has_bias = bias.shape[0] > 0
    p = lo
    if fmt == F32:  # rows in eights (dot8_f32); the hardware prefetcher follows them
        while p + 7 < hi:
            v = dot8_f32(wf[idx[p]], wf[idx[p + 1]], wf[idx[p + 2]], wf[idx[p + 3]], wf[idx[p + 4]],
                         wf[idx[p + 5]], wf[idx[p + 6]], wf[idx[p + 7]], po, x, d)
            for q in range(8):
                out[p + q] = v[q] + bias[idx[p + q]] if has_bias else v[q]
            p += 8
    else:  # quantized rows in pairs, the next pair prefetched along the way
        if p + 1 < hi:
            prefetch_part(fmt, wq, idx[p], po, d)
            prefetch_part(fmt, wq, idx[p + 1], po, d)
        while p + 1 < hi:
            i, j = idx[p], idx[p + 1]
            ni, nj = (idx[p + 2], idx[p + 3]) if p + 3 < hi else (i, j)
            u, v = qrow_dot2_next(fmt, wq, i, j, ni, nj, po, xq, xd, lut, d)
            out[p] = u + bias[i] if has_bias else u
            out[p + 1] = v + bias[j] if has_bias else v
            p += 2
    for p in range(p, hi):  # the rows left over
        i = idx[p]
        v = row_dot(fmt, wf, wq, i, po, x, xq, xd, lut, d)
        out[p] = v + bias[i] if has_bias else v


@njit(parallel=True, **_FLAGS)
def rows_sparse_par(x, wf, wq, idx, fmt, d, po, bias, lut, nchunks, out):
    """``out[p] = row(idx[p]) . x (+ bias)`` for one part (gate/up): the row-gather matvec."""
    xq, xd = _input(x, fmt)
    cnt = idx.shape[0]
    for c in prange(nchunks):
        _rows_chunk(x, xq, xd, wf, wq, idx, (c * cnt) // nchunks, ((c + 1) * cnt) // nchunks, fmt, d, po, bias,
                    lut, out)


@njit(**_FLAGS)
def rows_sparse_ser(x, wf, wq, idx, fmt, d, po, bias, lut, nchunks, out):
    xq, xd = _input(x, fmt)
    _rows_chunk(x, xq, xd, wf, wq, idx, 0, idx.shape[0], fmt, d, po, bias, lut, out)


@njit(**_FLAGS)
def _stacked_row(wfs, r):
    """Row ``r`` of float32 matrices stacked one after another."""
    for m in range(len(wfs)):
        if r < wfs[m].shape[0]:
            return wfs[m][r]
        r -= wfs[m].shape[0]
    return wfs[0][0]  # not reached: callers pass r < the total row count


@njit(**_FLAGS)
def _matvec_chunk(x, xq, xd, wfs, wqs, fmt, d, lo, hi, lut, out):
    """Rows ``lo..hi`` of the stacked matrices (``out`` indexes them one after another).
    float32 rows are read four at a time, one from each quarter of the range
    (:func:`dot4_f32`): four sequential streams, each followed by the hardware prefetcher.
    Over 2560 x 2048 matrices on a 2-core Zen 4, one stream per thread read 15-22 GB/s,
    two 28-31. On a 2-vCPU Xeon, in the TinyLlama-shape f32 decode (the kernels alternating
    token by token): two streams 14.0-14.3 ms per token for o_proj, 17.4 for q/k/v, 9.7-9.9
    for the LM head; four 12.8-13.3, 16.6-17.1, 8.6-8.9; eight (:func:`dot8_f32`) 13.5-13.9,
    17.4-18.2, 8.8-9.0. Quantized rows go in pairs from the two halves of each matrix's
    part of the range (:func:`qrow_dot2_next`, the next pair prefetched): 11008 x 4096 from
    DRAM on the 2-vCPU Xeon, Q8_0 2.38 -> 1.38 ms, Q4_0 (the per-row kernel) 1.88 -> 0.79 ms;
    without the prefetch 1.73 and 2.06 ms."""
    if fmt == F32:
        q = (hi - lo) // 4
        for r in range(lo, lo + q):
            v = dot4_f32(_stacked_row(wfs, r), _stacked_row(wfs, r + q), _stacked_row(wfs, r + 2 * q),
                         _stacked_row(wfs, r + 3 * q), 0, x, d)
            for k in range(4):
                out[r + k * q] = v[k]
        for r in range(lo + 4 * q, hi):
            out[r] = dot_f32(_stacked_row(wfs, r), 0, x, d)
        return
    base = 0
    for m in range(len(wqs)):
        rows = wqs[m].shape[0]
        a = max(lo, base)
        b = max(a, min(hi, base + rows))  # a == b: none of matrix m's rows in this chunk
        qrows_dot(fmt, wqs[m], a - base, b - base, base, xq, xd, lut, d, out)
        base += rows


@njit(parallel=True, **_FLAGS)
def matvec_par(x, wfs, wqs, fmt, lut, nchunks, out):
    """Dense matvecs of one input ``x [d]`` by several whole matrices in one call (e.g.
    the q, k and v projections): ``wfs`` (f32) or ``wqs`` (Q8_0/Q4_0, int8 views) a tuple
    of ``[rows_m, d]`` matrices (the other tuple, as long, holds dummies); ``out [sum rows_m]``
    receives ``W_0 x``, then ``W_1 x``, ... The rows are split evenly over the chunks."""
    d = x.shape[0]
    xq, xd = _operand(x, fmt)
    total = out.shape[0]
    for c in prange(nchunks):
        _matvec_chunk(x, xq, xd, wfs, wqs, fmt, d, (c * total) // nchunks, ((c + 1) * total) // nchunks, lut, out)


@njit(**_FLAGS)
def matvec_ser(x, wfs, wqs, fmt, lut, nchunks, out):
    """:func:`matvec_par` in the calling thread."""
    d = x.shape[0]
    xq, xd = _operand(x, fmt)
    _matvec_chunk(x, xq, xd, wfs, wqs, fmt, d, 0, out.shape[0], lut, out)


@njit(parallel=True, **_FLAGS)
def matmul_q_par(X, wq, fmt, lut, nchunks, out):
    """``out [T, rows] = X W^T`` for the tokens ``X [T, d]`` (float32) and one quantized
    matrix ``wq [rows, d/32 * block bytes]`` (Q8_0/Q4_0, int8 view): each token's input
    quantized once, then, per pair of rows (from the two halves of each chunk's range,
    as :func:`qrows_dot` reads them, the next pair prefetched), every token in turn, so
    the pair comes from memory once and from L1 for the other tokens. Each token's row
    sums agree with :func:`matvec_par`'s to the last bit or so (LLVM compiles the same
    dot differently inside the token loop)."""
    T, d = X.shape
    XQ = np.empty((T, 2 * d), np.int8)
    XD = np.empty((T, 2 * max(d // QK, 1)), np.float32)
    for t in range(T):
        prepare_input(fmt, X[t], XQ[t], XD[t])
    rows = wq.shape[0]
    for c in prange(nchunks):
        lo, hi = (c * rows) // nchunks, ((c + 1) * rows) // nchunks
        half = (hi - lo) // 2
        for r in range(lo, lo + half):
            nr = min(r + 1, lo + half - 1)
            for t in range(T):
                out[t, r], out[t, r + half] = qrow_dot2_next(fmt, wq, r, r + half, nr, nr + half, 0, XQ[t], XD[t],
                                                             lut, d)
        if (hi - lo) % 2:
            for t in range(T):
                out[t, hi - 1] = _qdot(fmt, wq[hi - 1], 0, XQ[t], XD[t], lut, d // QK, wq[hi - 1], False)


@njit(parallel=True, **_FLAGS)
def matmul_f32_par(X, w, nchunks, out):
    """``out [T, rows] = X W^T`` for the tokens ``X [T, d]`` and one float32 matrix
    ``w [rows, d]``: four rows at a time (from memory once, 32 KB at d = 2048, then from
    L1) times four tokens at a time (:func:`dot4x4_f32`). 22 matrices of 2048 x 2048
    from memory, 2 threads on the 2-vCPU Xeon, 4 / 16 / 32 / 128 / 256 tokens: 11.7 /
    24.8 / 40.7 / 121 / 328 ms against sgemm on one BLAS thread's 57 / 69 / 87 / 181 /
    304 ms."""
    T, d = X.shape
    rows = w.shape[0]
    for c in prange(nchunks):
        lo, hi = (c * rows) // nchunks, ((c + 1) * rows) // nchunks
        r = lo
        while r + 4 <= hi:
            t = 0
            while t + 4 <= T:
                v = dot4x4_f32(w[r], w[r + 1], w[r + 2], w[r + 3], X[t], X[t + 1], X[t + 2], X[t + 3], d)
                for j in range(4):
                    for k in range(4):
                        out[t + j, r + k] = v[4 * j + k]
                t += 4
            while t < T:
                out[t, r], out[t, r + 1], out[t, r + 2], out[t, r + 3] = dot4_f32(w[r], w[r + 1], w[r + 2],
                                                                                  w[r + 3], 0, X[t], d)
                t += 1
            r += 4
        while r < hi:
            for t in range(T):
                out[t, r] = dot_f32(w[r], 0, X[t], d)
            r += 1


@njit(**_FLAGS)
def _axpy_chunk(h, wf, wq, idx, lo, hi, fmt, d, po, lut, acc):
    fmt = _spec(SPEC_FMT, fmt)
    d = _spec(SPEC_D, d)
    for p in range(lo, hi):
        if h[p] != np.float32(0):
            j = idx[p + 1] if fmt != F32 and p + 1 < hi else idx[p]
            row_axpy_next(fmt, wf, wq, idx[p], j, po, h[p], acc, lut, d)


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


@njit(**_FLAGS)
def _q8_0_hidden(x, xq, xd, q1, b1, lut, lo, hi, hidden):
    """``hidden[j] = relu(W1[j] . x + b1[j])`` for rows ``lo..hi`` of the Q8_0 ``q1``, read
    in pairs from the two halves of the range (two streams; the next pair prefetched):
    22 cold 256 x 2048 layers on 2 threads took 25-28 us each, one row at a time 40-48."""
    qrows_dot(Q8_0, q1, lo, hi, 0, xq, xd, lut, x.shape[0], hidden)
    for j in range(lo, hi):
        v = hidden[j] + b1[j] if b1.shape[0] > 0 else hidden[j]
        hidden[j] = v if v > np.float32(0) else np.float32(0)


@njit(**_FLAGS)
def _positive(hidden, pos, vals):
    """The positive ``hidden`` units: their indices into ``pos``, values into ``vals``
    (ascending); returns their count."""
    m = 0
    for j in range(hidden.shape[0]):
        if hidden[j] > np.float32(0):
            pos[m] = j
            vals[m] = hidden[j]
            m += 1
    return m


@njit(**_FLAGS)
def _q8_0_select_slice(pos, vals, m, q2t, b2, n, t, lut, blo, bhi, acc, idx_out):
    """Neurons ``32 blo .. 32 bhi`` (blocks of the Q8_0 ``W2^T`` rows): logits ``acc[i] =
    b2[i] + sum_s vals[s] W2^T[pos[s], i]`` over the ``m`` positive hidden units
    (:func:`_positive`); the neurons ``i < n`` with ``acc[i] >= t`` go to ``idx_out`` from
    position ``32 blo`` on; returns their count. On the x86 vector path the rows are
    read four at a time (:func:`_simd_axpy4_q8_0_block`, the next four prefetched along
    the way): 22 cold TinyLlama-shape layers (r 256, n 5632, 127 positive) on 2 threads
    took 47-52 us each, one row at a time 55-66."""
    lo, hi = blo * QK, bhi * QK
    seg = acc[lo:hi]
    for i in range(hi - lo):
        seg[i] = np.float32(0)
    wf = np.empty((1, 1), np.float32)
    off = blo * Q8_BYTES
    m4 = m - m % 4 if SIMD > 0 else 0
    for s in range(0, m4, 4):
        ns = s + 4 if s + 4 < m4 else s
        w1, w2, w3, w4 = q2t[pos[s]], q2t[pos[s + 1]], q2t[pos[s + 2]], q2t[pos[s + 3]]
        n1, n2, n3, n4 = q2t[pos[ns]], q2t[pos[ns + 1]], q2t[pos[ns + 2]], q2t[pos[ns + 3]]
        for b in range(bhi - blo):
            p = off + b * Q8_BYTES
            if b % 2 == 0:
                _prefetch_l2(n1, p)
                _prefetch_l2(n2, p)
                _prefetch_l2(n3, p)
                _prefetch_l2(n4, p)
            _simd_axpy4_q8_0_block(seg, b * QK, w1, w2, w3, w4, p, vals[s], vals[s + 1], vals[s + 2], vals[s + 3])
    for s in range(m4, m):
        nxt = pos[s + 1] if s + 1 < m else pos[s]
        row_axpy_next(Q8_0, wf, q2t, pos[s], nxt, off, vals[s], seg, lut, hi - lo)
    c = 0
    for i in range(lo, min(hi, n)):
        if b2.shape[0] > 0:
            acc[i] += b2[i]
        if acc[i] >= t:
            idx_out[lo + c] = i
            c += 1
    return c


@njit(**_FLAGS)
def _compact(idx_out, starts, counts):
    """Move the slices' selections ``idx_out[starts[s]:starts[s] + counts[s]]`` together
    (ascending: the slices are in order); returns the total."""
    m = 0
    for s in range(starts.shape[0]):
        for k in range(counts[s]):
            idx_out[m + k] = idx_out[starts[s] + k]
        m += counts[s]
    return m


@njit(parallel=True, **_FLAGS)
def predictor_select_q8_0_par(x, q1, b1, q2t, b2, n, t, lut, nchunks, hidden, acc, idx_out):
    """A Q8_0 predictor plus threshold selection for one token, in one call.

    ``x [d]`` float32 (quantized to Q8_0 here); ``q1`` the Q8_0 rows of ``W1 [r, d]``,
    ``q2t`` those of ``W2^T [r, n_pad]`` (``n_pad`` = ``n`` rounded up to 32; int8
    views); ``b1 [r]``, ``b2 [n]`` or empty. Computes ``hidden [r]`` (the ReLU'd first
    layer), the logits into ``acc [n_pad]`` (axpys of ``W2^T`` rows for the positive
    hidden units, each thread over its own range of neurons: no reduction), and the
    indices ``i < n`` with ``logit >= t`` into ``idx_out`` (ascending); returns their count."""
    r = q1.shape[0]
    xq, xd = _operand(x, Q8_0)
    for c in prange(nchunks):
        _q8_0_hidden(x, xq, xd, q1, b1, lut, (c * r) // nchunks, ((c + 1) * r) // nchunks, hidden)
    pos = np.empty(r, np.int64)
    vals = np.empty(r, np.float32)
    m = _positive(hidden, pos, vals)
    nbk = q2t.shape[1] // Q8_BYTES
    starts = np.empty(nchunks, np.int64)
    counts = np.empty(nchunks, np.int64)
    for c in prange(nchunks):
        blo, bhi = (c * nbk) // nchunks, ((c + 1) * nbk) // nchunks
        starts[c] = blo * QK
        counts[c] = _q8_0_select_slice(pos, vals, m, q2t, b2, n, t, lut, blo, bhi, acc, idx_out)
    return _compact(idx_out, starts, counts)


@njit(**_FLAGS)
def predictor_select_q8_0_ser(x, q1, b1, q2t, b2, n, t, lut, nchunks, hidden, acc, idx_out):
    """:func:`predictor_select_q8_0_par` in the calling thread."""
    xq, xd = _operand(x, Q8_0)
    r = q1.shape[0]
    _q8_0_hidden(x, xq, xd, q1, b1, lut, 0, r, hidden)
    pos = np.empty(r, np.int64)
    vals = np.empty(r, np.float32)
    m = _positive(hidden, pos, vals)
    return _q8_0_select_slice(pos, vals, m, q2t, b2, n, t, lut, 0, q2t.shape[1] // Q8_BYTES, acc, idx_out)


@njit(parallel=True, **_FLAGS)
def predictor_logits_q8_0_batch(X, q1, b1, q2t, b2, n, lut, nchunks, step_bytes, logits):
    """The Q8_0 predictor of :func:`predictor_select_q8_0_par` for the tokens ``X [T, d]``
    (a prompt): ``logits [T, n_pad]`` (``n_pad`` the width of ``q2t``'s rows), each
    token's through the one-token kernel's functions (the same floats, unless a step
    splits the first layer's pairs of rows differently). The weights are read in steps
    of about ``step_bytes`` (rows of ``W1``; blocks of the
    ``W2^T`` rows, sized for all ``r`` of them), each step for every token in turn, so
    that it comes from memory once and from the core's cache for the other tokens
    (TinyLlama shape, r 256, 2 threads, BLAS on one: 16 / 64 tokens 0.65 / 2.61 ms per
    layer token by token, 2.63 ms at 64 through decoded rows and sgemm, 0.57 / 2.22 ms
    this way; sgemm is ahead from about 100 tokens)."""
    T = X.shape[0]
    r, d = q1.shape[0], X.shape[1]
    xq = np.empty((T, 2 * d), np.int8)
    xd = np.empty((T, 2 * max(d // QK, 1)), np.float32)
    for t in prange(T):
        prepare_input(Q8_0, X[t], xq[t], xd[t])
    hidden = np.empty((T, r), np.float32)
    rows = max(2, step_bytes // q1.shape[1])
    for c in prange(nchunks):
        for a in range((c * r) // nchunks, ((c + 1) * r) // nchunks, rows):
            b = min(a + rows, ((c + 1) * r) // nchunks)
            for t in range(T):
                _q8_0_hidden(X[t], xq[t], xd[t], q1, b1, lut, a, b, hidden[t])
    pos = np.empty((T, r), np.int64)
    vals = np.empty((T, r), np.float32)
    m = np.empty(T, np.int64)
    for t in prange(T):
        m[t] = _positive(hidden[t], pos[t], vals[t])
    nbk = q2t.shape[1] // Q8_BYTES
    blocks = max(1, step_bytes // (max(r, 1) * Q8_BYTES))
    idx = np.empty(nbk * QK, np.int64)  # the slices' selections (logits >= +inf), not read
    for c in prange(nchunks):
        for s in range((c * nbk) // nchunks, ((c + 1) * nbk) // nchunks, blocks):
            e = min(s + blocks, ((c + 1) * nbk) // nchunks)
            for t in range(T):
                _q8_0_select_slice(pos[t], vals[t], m[t], q2t, b2, n, np.float32(np.inf), lut, s, e, logits[t], idx)


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
                       bg, bu, bd, lut, nchunks, gwf, gwq, gate_apart, Y):
    """T tokens: every neuron of ``union`` is read once and applied to the tokens whose
    ``mask[t, i]`` is set (``mask`` empty: every token). ``gate_apart``: the gate rows are
    rows of ``gwf`` / ``gwq`` (at ``po_g``), not parts of the bundles (otherwise ``gwf`` /
    ``gwq`` are ``wf`` / ``wq``, as :class:`~.runtime.LayerKernels` passes them).

    Neuron by neuron (the union split over the chunks), the activations of the listed
    tokens, the gate and up parts read from memory once for all of them. A float32 layer
    adds each activation times the neuron's down row to its chunk's partial sum of the
    token at once (``[nchunks, T, d]``, added in chunk order at the end: the long down row
    is read once). A quantized layer prefetches the next neuron's gate and up parts into
    L2 and keeps the activations (``H [T, len(union)]``); then, token by token
    (:func:`_prefill_down_token`), ``Y[t] = bd + sum_p H[t, p] down[union[p]]``: the
    token's sum stays in L1 and the short quantized down rows come from the caches
    (TinyLlama shape Q4_0, 16 / 64 / 256 tokens: 2.5 / 7.5 / 32 -> 2.1 / 6.7 / 26.5 ms per
    layer against the float32 scheme; float32 rows read twice this way were slower)."""
    fmt = _spec(SPEC_FMT, fmt)
    d = _spec(SPEC_D, d)
    gated = _spec(SPEC_GATED, gated)
    act = _spec(SPEC_ACT, act)
    up_relu = _spec(SPEC_UP_RELU, up_relu)
    T = X.shape[0]
    nb = d // QK
    XQ = np.empty((T, 2 * d), np.int8)
    XD = np.empty((T, 2 * max(nb, 1)), np.float32)
    for t in range(T):
        prepare_input(fmt, X[t], XQ[t], XD[t])
    has_mask = mask.shape[0] > 0
    cnt = union.shape[0]
    f32 = fmt == F32
    part = np.zeros((nchunks if f32 else 0, T, d), np.float32)
    H = np.zeros((0 if f32 else T, cnt), np.float32)
    for c in prange(nchunks):
        tokens = np.empty(T, np.int64)
        for p in range((c * cnt) // nchunks, ((c + 1) * cnt) // nchunks):
            i = union[p]
            if not f32 and p + 1 < cnt:
                if gated:
                    prefetch_part(fmt, gwq, union[p + 1], po_g, d)
                prefetch_part(fmt, wq, union[p + 1], po_u, d)
            m = 0
            for t in range(T):
                if not has_mask or mask[t, i]:
                    tokens[m] = t
                    m += 1
            for k in range(m):
                t = tokens[k]
                g = np.float32(0)
                if gate_apart:
                    g = row_dot(fmt, gwf, gwq, i, po_g, X[t], XQ[t], XD[t], lut, d)
                    if bg.shape[0] > 0:
                        g += bg[i]
                h = neuron(fmt, wf, wq, i, X[t], XQ[t], XD[t], lut, d, gated, act, act_t, up_relu, out_t,
                           po_g, po_u, bg, bu, g, gate_apart)
                if not f32:
                    H[t, p] = h
                elif h != np.float32(0):
                    row_axpy(fmt, wf, wq, i, po_d, h, part[c, t], lut, d)
    if not f32:
        for t in prange(T):
            _prefill_down_token(H[t], wf, wq, union, fmt, d, po_d, bd, lut, Y[t])
        return
    for t in range(T):
        for k in range(d):
            Y[t, k] = bd[k] if bd.shape[0] > 0 else np.float32(0)
    for c in range(nchunks):
        for t in range(T):
            for k in range(d):
                Y[t, k] += part[c, t, k]


@njit(**_FLAGS)
def _prefill_down_token(h, wf, wq, union, fmt, d, po_d, bd, lut, y):
    """``y = bd + sum_p h[p] down[union[p]]`` over the nonzero ``h [len(union)]``, in
    order, each next down row prefetched (:func:`row_axpy_next`)."""
    cnt = union.shape[0]
    pos = np.empty(cnt, np.int64)
    m = 0
    for p in range(cnt):
        if h[p] != np.float32(0):
            pos[m] = p
            m += 1
    for k in range(d):
        y[k] = bd[k] if bd.shape[0] > 0 else np.float32(0)
    for s in range(m):
        nxt = union[pos[s + 1]] if s + 1 < m else union[pos[s]]
        row_axpy_next(fmt, wf, wq, union[pos[s]], nxt, po_d, h[pos[s]], y, lut, d)


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


@njit(**_FLAGS)
def _activate_row(g, u, gated, act, act_t, up_relu):
    """``u = act(g) * u`` (gated; ``u`` clamped at 0 first with ``up_relu``) or
    ``act(u)``, in place over one row. The ReLU family gets loops of its own with the
    choices made outside them, so that they vectorise (gated dReLU over 1024 x 512 on one
    thread: 0.26 ms, against 1.06 ms element by element through :func:`activation`;
    LLVM had already vectorised plain ReLU). The smooth ones too, each in a loop of its
    own over the branch-free float32 forms (gated, 2048 x 2048, 2 threads: SiLU 10.7 ->
    0.9 ms, GELU 38.3 -> 1.8, GELU tanh 43.2 -> 1.0, through libm in float64 before)."""
    n = u.shape[0]
    if act == RELU or act == FATRELU:
        t = act_t if act == FATRELU else np.float32(0)
        if not gated:
            for i in range(n):
                u[i] = u[i] if u[i] > t else np.float32(0)
        elif up_relu:
            for i in range(n):
                v = u[i] if u[i] > np.float32(0) else np.float32(0)
                u[i] = (g[i] if g[i] > t else np.float32(0)) * v
        else:
            for i in range(n):
                u[i] = (g[i] if g[i] > t else np.float32(0)) * u[i]
        return
    if gated:
        _smooth_gated(g, u, act, np.float32(0) if up_relu else np.float32(-np.inf))
        return
    if act == SILU:
        for i in range(n):
            u[i] = _times_sigmoid(u[i], u[i])
    elif act == GELU:
        for i in range(n):
            u[i] = _gelu_erf(u[i])
    else:
        for i in range(n):
            u[i] = _gelu_tanh(u[i])


@njit(**_FLAGS)
def _smooth_gated(g, u, act, lo):
    """``u = act(g) * max(u, lo)`` over a row for the smooth activations, a loop per kind
    (a choice inside the loop keeps LLVM from vectorising it)."""
    if act == SILU:
        for i in range(u.shape[0]):
            u[i] = _times_sigmoid(g[i], g[i]) * max(u[i], lo)
    elif act == GELU:
        for i in range(u.shape[0]):
            u[i] = _gelu_erf(g[i]) * max(u[i], lo)
    else:
        for i in range(u.shape[0]):
            u[i] = _gelu_tanh(g[i]) * max(u[i], lo)


@njit(parallel=True, **_FLAGS)
def apply_activation_2d(G, U, mask, gated, act, act_t, up_relu, out_t):
    """``H = act(G) * U`` (or ``act(U)``) in place into ``U [T, n]``, zeroed where
    ``mask [T, n]`` is false (``[0, 0]``: no mask) and where ``|H| <= out_t`` (when > 0)."""
    T, n = U.shape
    has_mask = mask.shape[0] > 0
    for t in prange(T):
        _activate_row(G[t], U[t], gated, act, act_t, up_relu)
        if has_mask or out_t > np.float32(0):
            for i in range(n):
                if (has_mask and not mask[t, i]) or (out_t > np.float32(0) and abs(U[t, i]) <= out_t):
                    U[t, i] = np.float32(0)


@njit  # not cached: it reads the threading layer through ctypes pointers
def num_threads():
    """Numba's thread count (``numba.get_num_threads()``), read in compiled code: called
    from Python, ``get_num_threads`` takes two locks each time (2-6 us; a decode step asks
    for it once per kernel call, 67 times per TinyLlama-shaped token)."""
    return numba.get_num_threads()


@njit(cache=True)
def indices_within(idx, n):
    """Whether every entry of ``idx`` (1-d int64) is in ``[0, n)``: one pass (numpy's
    ``min`` and ``max`` cost 3-6 us each on a few hundred indices)."""
    for i in range(idx.shape[0]):
        if idx[i] < 0 or idx[i] >= n:
            return False
    return True


def default_chunks() -> int:
    """Work chunks per parallel kernel: a few per thread for balance."""
    return max(1, 4 * num_threads())
