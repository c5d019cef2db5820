"""Row-interleaved Q4_0 and Q8_0 matrices and their dense matvec (the x86 vector paths).

The artifact keeps ggml's row layouts: per row, ``d/32`` blocks of an fp16 scale and 16
bytes of nibbles (Q4_0) or 32 int8 values (Q8_0). One row at a time, each 32-value block
costs a scalar scale conversion, an unpacking and a horizontal accumulation for one
``vpdpbusd``, and the dense kernels are bound by those instructions (Q4_0: about 15 GB/s
at d 2048 on a 2-core Zen 4, half the memory bandwidth; Q8_0 times 16 tokens: 117 GOP/s
on the 2-vCPU Xeon). The runtime re-lays each quantized matrix once, on first use
(:func:`pack_x8`), in tiles of 8 rows, as llama.cpp's repacked CPU formats do, so one
vector instruction serves all eight rows:

    tile t (rows 8t..8t+7), block b: B bytes at ((t * nb) + b) * B
      [0:16]    the 8 rows' fp16 block scales (row order)
      Q4_0 (B = 144): [16:144] 4 chunks of 32 bytes; byte 4r + j of chunk c holds value
                4c + j of row r in its low nibble and value 4(c + 4) + j in its high nibble
      Q8_0 (B = 272): [16:272] 8 chunks of 32 bytes; byte 4r + j of chunk c holds value
                4c + j of row r (int8)

A block is then 4 (Q4_0) or 8 (Q8_0) loads, 8 ``vpdpbusd`` (``vpmaddubsw`` +
``vpmaddwd`` without VNNI) against the input's 4-value groups broadcast to the eight
int32 lanes (lane r = row r), one ``vcvtph2ps`` of the 8 scales and one multiply-add.
The u8 operand of each product: Q4_0 nibbles with the -8 offset as the lane seed ``-8 *
sum(x_block)``; Q8_0 values with VNNI as ``q + 128`` (one ``vpxor``) and the seed ``-128 *
sum(x_block)``, on AVX2 the input's magnitudes times the values carrying its signs
(``vpsignb``: the int16 pair sums of ``vpmaddubsw`` cannot saturate). The seeds are
``prepare_input``'s minus-block-sums shifted left. Rows are padded with zero rows to a
multiple of 8.

:func:`matvec_x8_par` multiplies one token (a decode step's projections),
:func:`matmul_x8_par` several (a decoder's prompt), reading each tile once for all and
unpacking each block once for four tokens.

Only on x86 with AVX2/FMA/F16C (:data:`SUPPORTED`; the row kernels of :mod:`.ffn`
everywhere else). Not part of the emitted kernels module: the runtime packs at load.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types as nbtypes
from numba.extending import intrinsic

from . import ffn
from .ffn import (_FLAGS, _I32, _V8F32, _V8I32, _V32I8, Q4_0, Q4_BYTES, Q8_0, Q8_BYTES, QK, _acc8, _ir_dot4,
                  _ir_elem, _ir_fn, _ir_load, _ir_splat, _ir_xd)

#: rows per tile (the int32 lanes of one 256-bit vector)
TILE = 8
#: bytes of one (tile, block) per format code: 8 fp16 scales and 8 rows' values
TILE_BLOCK_BYTES = {Q4_0: TILE * Q4_BYTES, Q8_0: TILE * Q8_BYTES}
#: whether this CPU runs the tiled kernels (the x86 vector path of :mod:`.ffn`)
SUPPORTED = bool(ffn.SIMD)

_V8F16 = ir.VectorType(ir.HalfType(), 8)


def pack_x8(q: np.ndarray, fmt: int) -> np.ndarray:
    """The tiled layout (module docstring) of a ggml Q4_0 or Q8_0 matrix (``fmt`` the
    kernels' format code) ``q [rows, d/32 * block bytes]`` (uint8 or int8 bytes): int8
    ``[ceil(rows/8) * d/32 * TILE_BLOCK_BYTES[fmt]]``. Numpy; the rows of the last tile
    beyond ``rows`` are zero (they multiply to 0)."""
    if fmt not in TILE_BLOCK_BYTES:
        raise ValueError(f"no tiled layout for format code {fmt}")
    block = TILE_BLOCK_BYTES[fmt] // TILE
    name = "Q4_0" if fmt == Q4_0 else "Q8_0"
    q = np.asarray(q).view(np.uint8)
    if q.ndim != 2 or q.shape[1] % block:
        raise ValueError(f"expected {name} rows [rows, d/32 * {block}] bytes, got {q.shape}")
    rows, nb = q.shape[0], q.shape[1] // block
    blocks = q.reshape(rows, nb, block)
    pad = -rows % TILE
    if pad:
        blocks = np.concatenate([blocks, np.zeros((pad, nb, block), np.uint8)])
    tiles = blocks.shape[0] // TILE
    scales = blocks[:, :, :2].reshape(tiles, TILE, nb, 2).transpose(0, 2, 1, 3).reshape(tiles, nb, 2 * TILE)
    if fmt == Q4_0:
        nib = blocks[:, :, 2:]
        values = np.concatenate([nib & 15, nib >> 4], axis=2)  # [rows, nb, 32] in element order
    else:
        values = blocks[:, :, 2:]
    groups = values.reshape(tiles, TILE, nb, 8, 4).transpose(0, 2, 3, 1, 4)  # [tile, block, group, row, 4]
    chunks = groups[:, :, :4] | (groups[:, :, 4:] << 4) if fmt == Q4_0 else groups
    out = np.concatenate([scales, chunks.reshape(tiles, nb, -1)], axis=2)
    return np.ascontiguousarray(out).reshape(-1).view(np.int8)


def _ir_tile_scales(context, builder, wty, w, p, xs):
    """The 8 rows' fp16 scales at ``w[p:p+16]`` as float32, times the input's block scale ``xs``."""
    scales = builder.fpext(_ir_load(builder, _ir_elem(context, builder, wty, w, p), _V8F16), _V8F32)
    return builder.fmul(scales, _ir_splat(builder, xs, _V8F32))


def _ir_x4(context, builder, xqty, xq, o):
    """``xq[o:o+4]`` (int8) broadcast to every int32 lane, as ``<32 x i8>``."""
    x4 = builder.load(builder.bitcast(_ir_elem(context, builder, xqty, xq, o), _I32.as_pointer()), align=1)
    return builder.bitcast(_ir_splat(builder, x4, _V8I32), _V32I8)


def _ir_tile_fma(builder, accp, chains, scales):
    """``acc[0:8] += float(chains[0] + chains[1]) * scales``."""
    lanes = builder.sitofp(builder.add(chains[0], chains[1]), _V8F32)
    accv = builder.bitcast(accp, _V8F32.as_pointer())
    fma = _ir_fn(builder, "llvm.fma.v8f32", _V8F32, [_V8F32, _V8F32, _V8F32])
    builder.store(builder.call(fma, [lanes, scales, builder.load(accv, align=4)]), accv, align=4)


def _ir_x8_block(context, builder, q8, wty, w, p, toks, b, nb):
    """IR of one tiled block (``q8``: Q8_0, else Q4_0) at ``w[p:]`` times block ``b`` of
    each token in ``toks`` (``(acc, xq, xq type, xd, xd type)``): ``acc[0:8] += d_w[r] *
    xd[b] * sum_k q_rk x_k`` (lane r = row r). The weight chunks are loaded and unpacked
    once for all the tokens; per token two int32 chains of four dot steps each (Q4_0: low
    and high nibbles, the first seeded with ``-8 sum x``; Q8_0: even and odd chunks, with
    VNNI ``(q + 128)`` as u8 times ``x``, the first seeded with ``-128 sum x``, on AVX2
    ``|x|`` times ``q`` with the sign of ``x``)."""
    vnni = ffn.SIMD == ffn.SIMD_VNNI
    zero = ir.Constant(_V8I32, [0] * 8)
    xo = builder.mul(b, ir.Constant(b.type, QK))
    xao = builder.mul(builder.add(nb, b), ir.Constant(b.type, QK))
    states = []
    for acc, xq, xqty, xd, xdty in toks:
        xs, neg = _ir_xd(context, builder, xdty, xd, b, nb)
        shift = 7 if q8 else 3
        seed = builder.shl(_ir_splat(builder, neg, _V8I32), ir.Constant(_V8I32, [shift] * 8))
        states.append((acc, xq, xqty, _ir_tile_scales(context, builder, wty, w, p, xs),
                       [seed if vnni or not q8 else zero, zero]))

    def x4(xq, xqty, base, group):
        return _ir_x4(context, builder, xqty, xq, builder.add(base, ir.Constant(base.type, 4 * group)))

    sign = _ir_fn(builder, "llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8])
    low_mask = ir.Constant(_V32I8, [15] * 32)
    for c in range(8 if q8 else 4):
        v = _ir_load(builder, _ir_elem(context, builder, wty, w, builder.add(p, ir.Constant(p.type, 16 + 32 * c))),
                     _V32I8)
        if q8:
            u8 = builder.xor(v, ir.Constant(_V32I8, [0x80] * 32))
            for _, xq, xqty, _, chains in states:
                xb = x4(xq, xqty, xo, c)
                if vnni:
                    chains[c % 2] = _ir_dot4(builder, u8, xb, chains[c % 2])
                else:
                    chains[c % 2] = _ir_dot4(builder, x4(xq, xqty, xao, c), builder.call(sign, [v, xb]), chains[c % 2])
        else:
            halves = (builder.and_(v, low_mask),
                      builder.and_(builder.lshr(v, ir.Constant(_V32I8, [4] * 32)), low_mask))
            for _, xq, xqty, _, chains in states:
                for h, group in enumerate((c, c + 4)):
                    chains[h] = _ir_dot4(builder, halves[h], x4(xq, xqty, xo, group), chains[h])
    for acc, _, _, scales, chains in states:
        _ir_tile_fma(builder, acc, chains, scales)


def _x8_block(q8: bool):
    """Intrinsic ``(acc, w, p, xq, xd, b, nb)``: the tiled block at ``w[p:]`` (Q8_0 when
    ``q8``, else Q4_0) times block ``b`` of one token's operand ``xq, xd``
    (:func:`_ir_x8_block`)."""
    def typer(typingctx, acc, w, p, xq, xd, b, nb):
        def codegen(context, builder, signature, args):
            acc_, w_, p_, xq_, xd_, b_, nb_ = args
            _ir_x8_block(context, builder, q8, signature.args[1], w_, p_,
                         [(acc_, xq_, signature.args[3], xd_, signature.args[4])], b_, nb_)
            return context.get_dummy_value()
        return nbtypes.void(acc, w, p, xq, xd, b, nb), codegen
    typer.__name__ = f"_simd_{'q8_0' if q8 else 'q4_0'}x8_block"
    return intrinsic(typer)


def _x8_block4(q8: bool):
    """Intrinsic ``(a1, a2, a3, a4, w, p, xq1, xd1, ..., xq4, xd4, b, nb)``: the tiled
    block at ``w[p:]`` times block ``b`` of four tokens' operands, token k into ``a_k``:
    the floats of four :func:`_x8_block` calls, the weights loaded and unpacked once."""
    def typer(typingctx, a1, a2, a3, a4, w, p, xq1, xd1, xq2, xd2, xq3, xd3, xq4, xd4, b, nb):
        def codegen(context, builder, signature, args):
            ty = signature.args
            toks = [(args[k], args[6 + 2 * k], ty[6 + 2 * k], args[7 + 2 * k], ty[7 + 2 * k]) for k in range(4)]
            _ir_x8_block(context, builder, q8, ty[4], args[4], args[5], toks, args[14], args[15])
            return context.get_dummy_value()
        return nbtypes.void(a1, a2, a3, a4, w, p, xq1, xd1, xq2, xd2, xq3, xd3, xq4, xd4, b, nb), codegen
    typer.__name__ = f"_simd_{'q8_0' if q8 else 'q4_0'}x8_block4"
    return intrinsic(typer)


_simd_q4_0x8_block, _simd_q8_0x8_block = _x8_block(False), _x8_block(True)
_simd_q4_0x8_block4, _simd_q8_0x8_block4 = _x8_block4(False), _x8_block4(True)


@intrinsic
def _store_sum8(typingctx, a0, a1, out, o):
    """``out[o:o+8] = a0[0:8] + a1[0:8]`` (two :func:`~.ffn._acc8` accumulators)."""
    def codegen(context, builder, signature, args):
        a0, a1, out_, o_ = args
        v = builder.fadd(*(builder.load(builder.bitcast(a, _V8F32.as_pointer()), align=4) for a in (a0, a1)))
        dst = builder.bitcast(_ir_elem(context, builder, signature.args[2], out_, o_), _V8F32.as_pointer())
        builder.store(v, dst, align=4)
        return context.get_dummy_value()
    return nbtypes.void(a0, a1, out, o), codegen


@njit(**_FLAGS)
def _block_bytes(fmt):
    """:data:`TILE_BLOCK_BYTES` of format code ``fmt`` (Q4_0 or Q8_0)."""
    return TILE * (Q8_BYTES if fmt == Q8_0 else Q4_BYTES)


@njit(inline="always", **_FLAGS)
def _block(fmt, acc, w, p, xq, xd, b, nb):
    """The tiled block at ``w[p:]`` times the input's block ``b`` into ``acc``."""
    if fmt == Q8_0:
        _simd_q8_0x8_block(acc, w, p, xq, xd, b, nb)
    else:
        _simd_q4_0x8_block(acc, w, p, xq, xd, b, nb)


@njit(inline="always", **_FLAGS)
def _tile_blocks(fmt, a0, a1, w, base, xq, xd, b, nb):
    """Blocks ``b`` and ``b + 1`` (when ``< nb``) of the tile at ``w[base:]``: the even
    block into ``a0``, the odd one into ``a1``."""
    bb = _block_bytes(fmt)
    _block(fmt, a0, w, base + b * bb, xq, xd, b, nb)
    if b + 1 < nb:
        _block(fmt, a1, w, base + (b + 1) * bb, xq, xd, b + 1, nb)


@njit(**_FLAGS)
def _tile(fmt, w, t, xq, xd, nb, tmp):
    """Tile ``t`` of a packed matrix times the input: its 8 row sums into ``tmp[0:8]``
    (even blocks in one accumulator, odd in another)."""
    a0, a1 = _acc8(), _acc8()
    base = t * nb * _block_bytes(fmt)
    for b in range(0, nb, 2):
        _tile_blocks(fmt, a0, a1, w, base, xq, xd, b, nb)
    _store_sum8(a0, a1, tmp, 0)


@njit(**_FLAGS)
def _tiles4(fmt, w0, t0, w1, t1, w2, t2, w3, t3, xq, xd, nb, tmp):
    """Four tiles (``w_k``'s tile ``t_k``) times the input in one loop over the blocks,
    each summed as :func:`_tile` does (same result): four sequential streams of reads in
    flight. Their row sums go to ``tmp[8k:8k+8]``."""
    a0, a1, c0, c1 = _acc8(), _acc8(), _acc8(), _acc8()
    e0, e1, g0, g1 = _acc8(), _acc8(), _acc8(), _acc8()
    span = nb * _block_bytes(fmt)
    for b in range(0, nb, 2):
        _tile_blocks(fmt, a0, a1, w0, t0 * span, xq, xd, b, nb)
        _tile_blocks(fmt, c0, c1, w1, t1 * span, xq, xd, b, nb)
        _tile_blocks(fmt, e0, e1, w2, t2 * span, xq, xd, b, nb)
        _tile_blocks(fmt, g0, g1, w3, t3 * span, xq, xd, b, nb)
    _store_sum8(a0, a1, tmp, 0)
    _store_sum8(c0, c1, tmp, TILE)
    _store_sum8(e0, e1, tmp, 2 * TILE)
    _store_sum8(g0, g1, tmp, 3 * TILE)


@njit(inline="always", **_FLAGS)
def _block4(fmt, a1, a2, a3, a4, w, p, q1, d1, q2, d2, q3, d3, q4, d4, b, nb):
    """The tiled block at ``w[p:]`` times block ``b`` of four tokens' operands (``q_k``,
    ``d_k``), token k into ``a_k``."""
    if fmt == Q8_0:
        _simd_q8_0x8_block4(a1, a2, a3, a4, w, p, q1, d1, q2, d2, q3, d3, q4, d4, b, nb)
    else:
        _simd_q4_0x8_block4(a1, a2, a3, a4, w, p, q1, d1, q2, d2, q3, d3, q4, d4, b, nb)


@njit(**_FLAGS)
def _tile_tokens4(fmt, w, k, xq, xd, t, nb, tmp):
    """Tile ``k`` of a packed matrix times tokens ``t..t+3`` (rows of the operands ``xq
    [T, 2d]``, ``xd``), each summed as :func:`_tile` does (even blocks in one accumulator,
    odd in another: the same floats): the row sums of token ``t + j`` into
    ``tmp[8j:8j+8]``. Each block's weights are loaded and unpacked once for the four
    (2048 x 2048 from L3, 2 threads, 16 / 64 tokens, Q8_0: 262 / 286 -> 395 / 430 GOP/s
    against one token at a time)."""
    a0, a1, c0, c1 = _acc8(), _acc8(), _acc8(), _acc8()
    e0, e1, g0, g1 = _acc8(), _acc8(), _acc8(), _acc8()
    bb = _block_bytes(fmt)
    base = k * nb * bb
    q1, q2, q3, q4 = xq[t], xq[t + 1], xq[t + 2], xq[t + 3]
    d1, d2, d3, d4 = xd[t], xd[t + 1], xd[t + 2], xd[t + 3]
    for b in range(0, nb, 2):
        _block4(fmt, a0, c0, e0, g0, w, base + b * bb, q1, d1, q2, d2, q3, d3, q4, d4, b, nb)
        if b + 1 < nb:
            _block4(fmt, a1, c1, e1, g1, w, base + (b + 1) * bb, q1, d1, q2, d2, q3, d3, q4, d4, b + 1, nb)
    _store_sum8(a0, a1, tmp, 0)
    _store_sum8(c0, c1, tmp, TILE)
    _store_sum8(e0, e1, tmp, 2 * TILE)
    _store_sum8(g0, g1, tmp, 3 * TILE)


@njit(**_FLAGS)
def _locate(rows, t):
    """Tile ``t`` of the stacked matrices (tile numbers run on from one matrix to the
    next; ``rows [m]`` their row counts): ``(matrix, its tile, first output row, rows of
    the tile that exist)``."""
    tile0, row0 = 0, 0
    for m in range(rows.shape[0]):
        tiles = (rows[m] + TILE - 1) // TILE
        if t < tile0 + tiles:
            r = (t - tile0) * TILE
            return m, t - tile0, row0 + r, min(TILE, rows[m] - r)
        tile0 += tiles
        row0 += rows[m]
    return 0, 0, 0, 0  # not reached: callers pass t < _tile_count(rows)


@njit(**_FLAGS)
def _put(tmp, k, out, o, n):
    """``out[o:o+n] = tmp[8k:8k+n]``."""
    for i in range(n):
        out[o + i] = tmp[k * TILE + i]


@njit(**_FLAGS)
def _matvec_chunk(fmt, ws, rows, xq, xd, nb, lo, hi, out):
    """Tiles ``lo..hi`` of the stacked matrices (``out`` rows in the same order). The range
    is read in quarters, tile ``lo + k`` of each quarter together (:func:`_tiles4`),
    the remainder one at a time: over a TinyLlama-shape decode's projections (2048 x 2048
    and 2560 x 2048, from DRAM, 2 threads) one stream per thread read about 17 GB/s, four
    about 24 (o_proj 138 -> 101 us, q/k/v 173 -> 124 us per layer)."""
    tmp = np.empty(4 * TILE, np.float32)
    q = (hi - lo) // 4
    for k in range(lo, lo + q):
        m0, t0, o0, n0 = _locate(rows, k)
        m1, t1, o1, n1 = _locate(rows, k + q)
        m2, t2, o2, n2 = _locate(rows, k + 2 * q)
        m3, t3, o3, n3 = _locate(rows, k + 3 * q)
        _tiles4(fmt, ws[m0], t0, ws[m1], t1, ws[m2], t2, ws[m3], t3, xq, xd, nb, tmp)
        _put(tmp, 0, out, o0, n0)
        _put(tmp, 1, out, o1, n1)
        _put(tmp, 2, out, o2, n2)
        _put(tmp, 3, out, o3, n3)
    for t in range(lo + 4 * q, hi):
        m0, t0, o0, n0 = _locate(rows, t)
        _tile(fmt, ws[m0], t0, xq, xd, nb, tmp)
        _put(tmp, 0, out, o0, n0)


@njit(**_FLAGS)
def _tile_count(rows):
    """Tiles of all the matrices (``rows [m]`` their row counts)."""
    total = 0
    for m in range(rows.shape[0]):
        total += (rows[m] + TILE - 1) // TILE
    return total


@njit(parallel=True, **_FLAGS)
def matvec_x8_par(x, ws, rows, fmt, nchunks, out):
    """Dense matvecs of one input ``x [d]`` (float32, d a multiple of 32) by several
    packed matrices of format code ``fmt`` (:func:`pack_x8`; ``ws`` a tuple, ``rows [m]``
    int64 their row counts) in one call: ``out [sum rows]`` receives ``W_0 x``, then ``W_1 x``, ...
    The input is quantized to Q8_0 once; the tiles are split evenly over the chunks."""
    nb = x.shape[0] // QK
    xq, xd = ffn._operand(x, fmt)
    total = _tile_count(rows)
    for c in prange(nchunks):
        _matvec_chunk(fmt, ws, rows, xq, xd, nb, (c * total) // nchunks, ((c + 1) * total) // nchunks, out)


@njit(**_FLAGS)
def matvec_x8_ser(x, ws, rows, fmt, nchunks, out):
    """:func:`matvec_x8_par` in the calling thread."""
    xq, xd = ffn._operand(x, fmt)
    _matvec_chunk(fmt, ws, rows, xq, xd, x.shape[0] // QK, 0, _tile_count(rows), out)


@njit(parallel=True, **_FLAGS)
def matmul_x8_par(X, w, rows, fmt, nchunks, out):
    """``out [T, rows] = X W^T`` for the tokens ``X [T, d]`` (float32, d a multiple of
    32) and one packed matrix ``w`` of format code ``fmt`` (:func:`pack_x8`; ``rows`` its
    row count): each token's input quantized to Q8_0 once, then per tile the tokens four
    at a time (:func:`_tile_tokens4`, the rest one at a time), so a tile (``d/32 *
    TILE_BLOCK_BYTES``: 9 KB in Q4_0, 17 KB in Q8_0 at d 2048) comes from memory once and
    from L1 for the other tokens. The tiles are split evenly over the chunks; each
    token's row sums are the same floats as :func:`matvec_x8_par`'s single-tile path."""
    T, d = X.shape
    nb = d // QK
    xq = np.empty((T, 2 * d), np.int8)
    xd = np.empty((T, 2 * max(nb, 1)), np.float32)
    for t in range(T):
        ffn.prepare_input(fmt, X[t], xq[t], xd[t])
    tiles = (rows + TILE - 1) // TILE
    for c in prange(nchunks):
        tmp = np.empty(4 * TILE, np.float32)
        for k in range((c * tiles) // nchunks, ((c + 1) * tiles) // nchunks):
            r0 = k * TILE
            n = min(TILE, rows - r0)
            t = 0
            while t + 4 <= T:
                _tile_tokens4(fmt, w, k, xq, xd, t, nb, tmp)
                for j in range(4):
                    _put(tmp, j, out[t + j], r0, n)
                t += 4
            while t < T:
                _tile(fmt, w, k, xq[t], xd[t], nb, tmp)
                _put(tmp, 0, out[t], r0, n)
                t += 1
