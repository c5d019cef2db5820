"""kernels.row_tiles: the 8-row tiled Q4_0 and Q8_0 layouts (checked against gguf-py's
values), their dense matvec and multi-token matmul (against numpy on gguf-py-dequantized
weights), and the runtime's LinearGroup using them."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gg_dequantize
from gguf.quants import quantize as gg_quantize

from sparseforge.kernels import ffn, quant, row_tiles
from sparseforge.toolchain.runtime_load import Linear, LinearGroup

pytestmark = pytest.mark.skipif(not row_tiles.SUPPORTED, reason="tiled kernels run on the x86 vector paths only")
GG = {ffn.Q4_0: GGMLQuantizationType.Q4_0, ffn.Q8_0: GGMLQuantizationType.Q8_0}
FMTS = pytest.mark.parametrize("fmt", [ffn.Q4_0, ffn.Q8_0], ids=["q4_0", "q8_0"])


def _matrix(rows, d, seed, fmt=ffn.Q4_0):
    w = np.random.default_rng(seed).standard_normal((rows, d)).astype(np.float32)
    return gg_quantize(w, GG[fmt])  # uint8 [rows, d/32 * block bytes]


def _dequantized(q, fmt):
    return gg_dequantize(q, GG[fmt]).astype(np.float64)


def test_pack_layout_matches_documented_offsets():
    rows, d = 11, 96
    q = _matrix(rows, d, 0)
    packed = row_tiles.pack_x8(q, ffn.Q4_0).view(np.uint8)
    nb = d // 32
    bb = row_tiles.TILE_BLOCK_BYTES[ffn.Q4_0]
    assert bb == 144 and packed.size == 2 * nb * bb  # 11 rows -> 2 tiles
    # the nibble values and scales as gguf-py encodes them: values[r, k] in element order
    blocks = q.reshape(rows, nb, 18)
    values = np.concatenate([blocks[:, :, 2:] & 15, blocks[:, :, 2:] >> 4], axis=2)
    for r in range(16):
        t, i = divmod(r, 8)
        for b in range(nb):
            base = (t * nb + b) * bb
            scale = packed[base + 2 * i: base + 2 * i + 2].view(np.float16)[0]
            # value k = 4c + j (c < 4) is the low nibble of byte 4i + j of chunk c; value
            # 16 + 4c + j its high nibble
            got = [(packed[base + 16 + 32 * (k % 16 // 4) + 4 * i + k % 4] >> (4 * (k // 16))) & 15 for k in range(32)]
            if r < rows:
                assert scale == blocks[r, b, :2].view(np.float16)[0]
                assert got == list(values[r, b])
            else:  # padding rows are zero
                assert scale == 0 and not any(got)


def test_pack_q8_0_layout_matches_documented_offsets():
    rows, d = 13, 64
    q = _matrix(rows, d, 1, ffn.Q8_0)
    packed = row_tiles.pack_x8(q, ffn.Q8_0).view(np.uint8)
    nb = d // 32
    bb = row_tiles.TILE_BLOCK_BYTES[ffn.Q8_0]
    assert bb == 272 and packed.size == 2 * nb * bb
    blocks = q.reshape(rows, nb, 34)
    for r in range(16):
        t, i = divmod(r, 8)
        for b in range(nb):
            base = (t * nb + b) * bb
            scale = packed[base + 2 * i: base + 2 * i + 2].view(np.float16)[0]
            # value k = 4c + j is byte 4i + j of chunk c
            got = [packed[base + 16 + 32 * (k // 4) + 4 * i + k % 4] for k in range(32)]
            if r < rows:
                assert scale == blocks[r, b, :2].view(np.float16)[0]
                assert got == list(blocks[r, b, 2:])
            else:
                assert scale == 0 and not any(got)


@FMTS
@pytest.mark.parametrize("kernel", [row_tiles.matvec_x8_par, row_tiles.matvec_x8_ser])
def test_matvec_matches_numpy(kernel, fmt):
    d = 256
    mats = [_matrix(r, d, s, fmt) for s, r in enumerate((20, 8, 37))]
    x = np.random.default_rng(9).standard_normal(d).astype(np.float32)
    xq = quant.roundtrip(x, "q8_0").astype(np.float64)  # the kernel's Q8_0 input
    want = np.concatenate([_dequantized(m, fmt) @ xq for m in mats])
    out = np.full(want.size, np.nan, np.float32)
    kernel(x, tuple(row_tiles.pack_x8(m, fmt) for m in mats), np.array([20, 8, 37], np.int64), fmt, 3, out)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(want).max())


@FMTS
def test_matvec_same_result_for_any_chunking(fmt):
    """A chunk reads its tiles four at a time (from its quarters) and the rest one at a
    time; tiles crossing matrix boundaries land in the right output rows, and every
    chunking gives the same floats (each tile is summed the same way on both paths)."""
    d = 96  # 3 blocks: an odd block count
    shapes = (61, 8, 100, 24)  # 8 + 1 + 13 + 3 = 25 tiles
    mats = [_matrix(r, d, 40 + s, fmt) for s, r in enumerate(shapes)]
    x = np.random.default_rng(5).standard_normal(d).astype(np.float32)
    xq = quant.roundtrip(x, "q8_0").astype(np.float64)
    want = np.concatenate([_dequantized(m, fmt) @ xq for m in mats])
    tiles, rows = tuple(row_tiles.pack_x8(m, fmt) for m in mats), np.array(shapes, np.int64)
    outs = []
    for nchunks in (1, 2, 3, 7):
        out = np.full(want.size, np.nan, np.float32)
        row_tiles.matvec_x8_par(x, tiles, rows, fmt, nchunks, out)
        outs.append(out)
    np.testing.assert_allclose(outs[0], want, rtol=0, atol=1e-5 * np.abs(want).max())
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


@FMTS
@pytest.mark.parametrize("T", [1, 5, 33])
def test_matmul_matches_numpy_and_matvec(T, fmt):
    """The multi-token kernel: every token against numpy on gguf-py's dequantized weights
    (odd block count, rows not a multiple of 8) and bit for bit the matvec of that token,
    for any chunking."""
    d, rows = 96, 61
    q = _matrix(rows, d, 7, fmt)
    tiles = row_tiles.pack_x8(q, fmt)
    X = np.random.default_rng(T).standard_normal((T, d)).astype(np.float32)
    want = quant.roundtrip(X, "q8_0").astype(np.float64) @ _dequantized(q, fmt).T
    per_token = np.empty((T, rows), np.float32)
    for t in range(T):
        row_tiles.matvec_x8_par(X[t], (tiles,), np.array([rows], np.int64), fmt, 3, per_token[t])
    for nchunks in (1, 2, 7):
        out = np.full((T, rows), np.nan, np.float32)
        row_tiles.matmul_x8_par(X, tiles, rows, fmt, nchunks, out)
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(want).max())
        np.testing.assert_array_equal(out, per_token)


@FMTS
def test_linear_group_uses_tiles_and_matches_row_kernel(fmt):
    d = 128
    name = "q4_0" if fmt == ffn.Q4_0 else "q8_0"
    lins = [Linear(_matrix(r, d, 20 + r, fmt), name, (r, d), dequantize=False) for r in (64, 16, 16)]
    group = LinearGroup(lins)
    x = np.random.default_rng(4).standard_normal(d).astype(np.float32)
    got = np.concatenate(group.matvec(x))
    assert all(lin.tiled for lin in lins)
    rows = np.empty(got.size, np.float32)
    ffn.matvec_ser(x, (np.zeros((1, 1), np.float32),) * 3, tuple(lin.q for lin in lins), fmt,
                   quant.F16_TO_F32, 1, rows)
    np.testing.assert_allclose(got, rows, rtol=0, atol=1e-5 * np.abs(rows).max())


def test_pack_rejects_bad_rows_and_formats():
    with pytest.raises(ValueError, match="Q4_0 rows"):
        row_tiles.pack_x8(np.zeros((4, 17), np.uint8), ffn.Q4_0)
    with pytest.raises(ValueError, match="Q8_0 rows"):
        row_tiles.pack_x8(np.zeros((4, 18), np.uint8), ffn.Q8_0)
    with pytest.raises(ValueError, match="no tiled layout"):
        row_tiles.pack_x8(np.zeros((4, 16), np.uint8), ffn.F32)
