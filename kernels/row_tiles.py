"""Row-interleaved Q4_0 matrices and their dense matvec (the x86 vector paths).

The artifact keeps ggml's Q4_0 row layout: per row, ``d/32`` blocks of an fp16 scale and
16 bytes of nibbles. One row at a time, each 32-value block costs a scalar scale
conversion and a nibble shuffle for one ``vpdpbusd``, and the dense matvec is bound by
those instructions (about 15 GB/s at d 2048 on a 2-core Zen 4, half the memory
bandwidth). For the decode step's dense projections the runtime re-lays each Q4_0 matrix
once at load (:func:`pack_q4_0x8`) in tiles of 8 rows, as llama.cpp's repacked CPU
formats do, so one vector instruction serves all eight rows:

    tile t (rows 8t..8t+7), block b: 144 bytes at ((t * nb) + b) * 144
      [0:16]    the 8 rows' fp16 block scales (row order)
      [16:144]  4 chunks of 32 bytes; byte 4r + j of chunk c holds value 4c + j of row r
                in its low nibble and value 4(c + 4) + j in its high nibble

A block is then 4 loads, 8 masks or shifts, 8 ``vpdpbusd`` (``vpmaddubsw`` +
``vpmaddwd`` without VNNI) against the input's 4-value groups broadcast to the eight
int32 lanes (lane r = row r), one ``vcvtph2ps`` of the 8 scales and one multiply-add:
about a third of the instructions per row-block. Rows are padded with zero rows to a
multiple of 8; the -8 offset of the nibbles is the lane seed ``-8 * sum(x_block)``
(``prepare_input``'s minus-block-sum, shifted left by 3).

:func:`matvec_q4_0x8_par` multiplies one token (a decode step's projections),
:func:`matmul_q4_0x8_par` several (a decoder's prompt), reading each tile once for all.

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
from .ffn import (_FLAGS, _I32, _V8F32, _V8I32, _V32I8, QK, Q4_BYTES, _acc8, _ir_dot4, _ir_elem, _ir_fn, _ir_load,
                  _ir_splat, _ir_xd)

#: rows per tile (the int32 lanes of one 256-bit vector)
TILE = 8
#: bytes of one (tile, block): 8 fp16 scales + 8 x 16 bytes of nibbles
TILE_BLOCK_BYTES = TILE * Q4_BYTES
#: whether this CPU runs the tiled kernels (the x86 vector path of :mod:`.ffn`)
SUPPORTED = bool(ffn.SIMD)

_V8F16 = ir.VectorType(ir.HalfType(), 8)


def pack_q4_0x8(q: np.ndarray) -> np.ndarray:
    """The tiled layout (module docstring) of a ggml Q4_0 matrix ``q [rows, d/32 * 18]``
    (uint8 or int8 bytes): int8 ``[ceil(rows/8) * d/32 * 144]``. Numpy; the rows of the
    last tile beyond ``rows`` are zero (they multiply to 0)."""
    q = np.asarray(q).view(np.uint8)
    if q.ndim != 2 or q.shape[1] % Q4_BYTES:
        raise ValueError(f"expected Q4_0 rows [rows, d/32 * {Q4_BYTES}] bytes, got {q.shape}")
    rows, nb = q.shape[0], q.shape[1] // Q4_BYTES
    blocks = q.reshape(rows, nb, Q4_BYTES)
    pad = -rows % TILE
    if pad:
        blocks = np.concatenate([blocks, np.zeros((pad, nb, Q4_BYTES), np.uint8)])
    tiles = blocks.shape[0] // TILE
    scales = blocks[:, :, :2].reshape(tiles, TILE, nb, 2).transpose(0, 2, 1, 3).reshape(tiles, nb, 2 * TILE)
    nib = blocks[:, :, 2:]
    values = np.concatenate([nib & 15, nib >> 4], axis=2)  # [rows, nb, 32] in element order
    groups = values.reshape(tiles, TILE, nb, 8, 4).transpose(0, 2, 3, 1, 4)  # [tile, block, group, row, 4]
    chunks = groups[:, :, :4] | (groups[:, :, 4:] << 4)  # [tile, block, chunk, row, 4]
    out = np.concatenate([scales, chunks.reshape(tiles, nb, 4 * TILE * 4)], axis=2)
    return np.ascontiguousarray(out).reshape(-1).view(np.int8)


@intrinsic
def _simd_q4_0x8_block(typingctx, acc, w, p, xq, xd, b, nb):
    """``acc[0:8] += d_w[r] * xd[b] * sum_k (q_rk - 8) x_k`` for the 8 rows of the tiled
    block at ``w[p:p+144]`` and the activations ``xq[32 b:32 b+32]`` (lane r = row r).
    Two int32 chains (low and high nibbles) of four dot steps each."""
    def codegen(context, builder, signature, args):
        accp, w_, p_, xq_, xd_, b_, nb_ = args
        wty, xqty, xdty = signature.args[1], signature.args[3], signature.args[4]
        xs, neg = _ir_xd(context, builder, xdty, xd_, b_, nb_)
        seed = builder.shl(_ir_splat(builder, neg, _V8I32), ir.Constant(_V8I32, [3] * 8))
        scales = builder.fpext(_ir_load(builder, _ir_elem(context, builder, wty, w_, p_), _V8F16), _V8F32)
        scales = builder.fmul(scales, _ir_splat(builder, xs, _V8F32))
        xo = builder.mul(b_, ir.Constant(b_.type, QK))
        low_mask = ir.Constant(_V32I8, [15] * 32)
        chains = [seed, ir.Constant(_V8I32, [0] * 8)]
        for c in range(4):
            v = _ir_load(builder, _ir_elem(context, builder, wty, w_, builder.add(p_, ir.Constant(p_.type, 16 + 32 * c))),
                         _V32I8)
            halves = (builder.and_(v, low_mask),
                      builder.and_(builder.lshr(v, ir.Constant(_V32I8, [4] * 32)), low_mask))
            for h, group in enumerate((c, c + 4)):
                xp = _ir_elem(context, builder, xqty, xq_, builder.add(xo, ir.Constant(xo.type, 4 * group)))
                x4 = builder.load(builder.bitcast(xp, _I32.as_pointer()), align=1)
                chains[h] = _ir_dot4(builder, halves[h], builder.bitcast(_ir_splat(builder, x4, _V8I32), _V32I8),
                                     chains[h])
        lanes = builder.sitofp(builder.add(chains[0], chains[1]), _V8F32)
        accv = builder.bitcast(accp, _V8F32.as_pointer())
        fma = _ir_fn(builder, "llvm.fma.v8f32", _V8F32, [_V8F32, _V8F32, _V8F32])
        builder.store(builder.call(fma, [lanes, scales, builder.load(accv, align=4)]), accv, align=4)
        return context.get_dummy_value()
    return nbtypes.void(acc, w, p, xq, xd, b, nb), codegen


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


@njit(inline="always", **_FLAGS)
def _tile_blocks(a0, a1, w, base, xq, xd, b, nb):
    """Blocks ``b`` and ``b + 1`` (when ``< nb``) of the tile at ``w[base:]``: the even
    block into ``a0``, the odd one into ``a1``."""
    _simd_q4_0x8_block(a0, w, base + b * TILE_BLOCK_BYTES, xq, xd, b, nb)
    if b + 1 < nb:
        _simd_q4_0x8_block(a1, w, base + (b + 1) * TILE_BLOCK_BYTES, xq, xd, b + 1, nb)


@njit(**_FLAGS)
def _tile(w, t, xq, xd, nb, tmp):
    """Tile ``t`` of a packed matrix times the input: its 8 row sums into ``tmp[0:8]``
    (even blocks in one accumulator, odd in another)."""
    a0, a1 = _acc8(), _acc8()
    base = t * nb * TILE_BLOCK_BYTES
    for b in range(0, nb, 2):
        _tile_blocks(a0, a1, w, base, xq, xd, b, nb)
    _store_sum8(a0, a1, tmp, 0)


@njit(**_FLAGS)
def _tiles4(w0, t0, w1, t1, w2, t2, w3, t3, xq, xd, nb, tmp):
    """Four tiles (``w_k``'s tile ``t_k``) times the input in one loop over the blocks,
    each summed as :func:`_tile` does (same result): four sequential streams of reads in
    flight. Their row sums go to ``tmp[8k:8k+8]``."""
    a0, a1, c0, c1 = _acc8(), _acc8(), _acc8(), _acc8()
    e0, e1, g0, g1 = _acc8(), _acc8(), _acc8(), _acc8()
    span = nb * TILE_BLOCK_BYTES
    for b in range(0, nb, 2):
        _tile_blocks(a0, a1, w0, t0 * span, xq, xd, b, nb)
        _tile_blocks(c0, c1, w1, t1 * span, xq, xd, b, nb)
        _tile_blocks(e0, e1, w2, t2 * span, xq, xd, b, nb)
        _tile_blocks(g0, g1, w3, t3 * span, xq, xd, b, nb)
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
def _matvec_chunk(ws, rows, xq, xd, nb, lo, hi, out):
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
        _tiles4(ws[m0], t0, ws[m1], t1, ws[m2], t2, ws[m3], t3, xq, xd, nb, tmp)
        _put(tmp, 0, out, o0, n0)
        _put(tmp, 1, out, o1, n1)
        _put(tmp, 2, out, o2, n2)
        _put(tmp, 3, out, o3, n3)
    for t in range(lo + 4 * q, hi):
        m0, t0, o0, n0 = _locate(rows, t)
        _tile(ws[m0], t0, xq, xd, nb, tmp)
        _put(tmp, 0, out, o0, n0)


@njit(**_FLAGS)
def _tile_count(rows):
    """Tiles of all the matrices (``rows [m]`` their row counts)."""
    total = 0
    for m in range(rows.shape[0]):
        total += (rows[m] + TILE - 1) // TILE
    return total


@njit(parallel=True, **_FLAGS)
def matvec_q4_0x8_par(x, ws, rows, nchunks, out):
    """Dense matvecs of one input ``x [d]`` (float32, d a multiple of 32) by several
    packed Q4_0 matrices (:func:`pack_q4_0x8`; ``ws`` a tuple, ``rows [m]`` int64 their
    row counts) in one call: ``out [sum rows]`` receives ``W_0 x``, then ``W_1 x``, ...
    The input is quantized to Q8_0 once; the tiles are split evenly over the chunks."""
    nb = x.shape[0] // QK
    xq, xd = ffn._operand(x, ffn.Q4_0)
    total = _tile_count(rows)
    for c in prange(nchunks):
        _matvec_chunk(ws, rows, xq, xd, nb, (c * total) // nchunks, ((c + 1) * total) // nchunks, out)


@njit(**_FLAGS)
def matvec_q4_0x8_ser(x, ws, rows, nchunks, out):
    """:func:`matvec_q4_0x8_par` in the calling thread."""
    xq, xd = ffn._operand(x, ffn.Q4_0)
    _matvec_chunk(ws, rows, xq, xd, x.shape[0] // QK, 0, _tile_count(rows), out)


@njit(parallel=True, **_FLAGS)
def matmul_q4_0x8_par(X, w, rows, nchunks, out):
    """``out [T, rows] = X W^T`` for the tokens ``X [T, d]`` (float32, d a multiple of
    32) and one packed Q4_0 matrix ``w`` (:func:`pack_q4_0x8`; ``rows`` its row count):
    each token's input quantized to Q8_0 once, then per tile every token in turn, so a
    tile (``d/32 * 144`` bytes: 9 KB at d 2048) comes from memory once and from L1 for
    the other tokens. The tiles are split evenly over the chunks; each token's row sums
    are the same floats as :func:`matvec_q4_0x8_par`'s single-tile path."""
    T, d = X.shape
    nb = d // QK
    xq = np.empty((T, 2 * d), np.int8)
    xd = np.empty((T, 2 * max(nb, 1)), np.float32)
    for t in range(T):
        ffn.prepare_input(ffn.Q4_0, X[t], xq[t], xd[t])
    tiles = (rows + TILE - 1) // TILE
    for c in prange(nchunks):
        tmp = np.empty(TILE, np.float32)
        for k in range((c * tiles) // nchunks, ((c + 1) * tiles) // nchunks):
            r0 = k * TILE
            n = min(TILE, rows - r0)
            for t in range(T):
                _tile(w, k, xq[t], xd[t], nb, tmp)
                for i in range(n):
                    out[t, r0 + i] = tmp[i]
