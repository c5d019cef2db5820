"""kernels.quant (ggml Q8_0/Q4_0 byte-exact with gguf-py) and kernels.bundle."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gg_dequantize
from gguf.quants import quantize as gg_quantize

from sparseforge.kernels import quant
from sparseforge.kernels.bundle import BundleLayout, pack_bundles, unpack_bundles


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 10, size=shape[:-1] + (1,)).astype(np.float32)
    x.reshape(-1, 32)[::7] = 0.0                       # all-zero blocks
    x.reshape(-1)[5::97] = np.float32(0.5) * x.reshape(-1)[5::97].round()  # exact halves
    return x


@pytest.mark.parametrize("fmt,qtype,enc,dec", [
    ("q8_0", GGMLQuantizationType.Q8_0, quant.quantize_q8_0, quant.dequantize_q8_0),
    ("q4_0", GGMLQuantizationType.Q4_0, quant.quantize_q4_0, quant.dequantize_q4_0),
])
def test_quant_matches_gguf_bytes(fmt, qtype, enc, dec):
    x = _data((5, 7, 256))
    ours = enc(x)
    assert ours.dtype == np.uint8 and ours.shape == (5, 7, 8 * quant.BLOCK_BYTES[fmt])
    np.testing.assert_array_equal(ours, gg_quantize(x, qtype))
    np.testing.assert_array_equal(dec(ours), gg_dequantize(ours, qtype))
    assert dec(ours).dtype == np.float32 and dec(ours).shape == x.shape


def test_quant_exact_ties_and_extremes():
    x = np.array([[127 * 0.5 / 127 * k for k in range(-16, 16)]], np.float32)  # many .5 ratios
    x = np.concatenate([x, -x, np.full((1, 32), 3.0, np.float32), np.eye(32, dtype=np.float32)[:1] * -7])
    for qtype, enc in ((GGMLQuantizationType.Q8_0, quant.quantize_q8_0), (GGMLQuantizationType.Q4_0, quant.quantize_q4_0)):
        np.testing.assert_array_equal(enc(x), gg_quantize(x, qtype))


def test_quant_error_bounds_and_helpers():
    x = _data((3, 64), seed=1)
    for fmt, tol in (("q8_0", 1 / 127), ("q4_0", 1 / 7), ("f16", 1e-3), ("f32", 0)):
        y = quant.roundtrip(x, fmt)
        amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
        assert np.all(np.abs(y - x).reshape(-1, 32) <= tol * amax + 1e-6)
        assert quant.encode(x, fmt.upper()).shape[-1] == quant.row_bytes(fmt, 64)
    np.testing.assert_array_equal(quant.decode(quant.encode(x, "f32"), "f32"), x)
    assert quant.F16_TO_F32[0x3C00] == 1.0 and quant.F16_TO_F32.shape == (65536,)
    q, d = quant.quantize_activation_q8_0(x)
    np.testing.assert_array_equal((q.reshape(3, 2, 32) * d[..., None]).reshape(3, 64), quant.roundtrip(x, "q8_0"))
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize_q4_0(np.zeros(48, np.float32))
    with pytest.raises(ValueError, match="unknown weight format"):
        quant.normalize_format("q5_k")


@pytest.mark.parametrize("fmt", ["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("gated", [True, False])
def test_bundle_roundtrip(fmt, gated):
    rng = np.random.default_rng(2)
    n, d = 40, 96
    gate = rng.standard_normal((n, d)).astype(np.float32) if gated else None
    up = rng.standard_normal((n, d)).astype(np.float32)
    down = rng.standard_normal((d, n)).astype(np.float32)
    layout = BundleLayout(fmt, d, n, gated, align=64)
    blob = pack_bundles(gate, up, down, layout)
    assert blob.shape == (n, layout.stride) and layout.stride % 64 == 0
    assert layout.stride >= len(layout.parts) * layout.part_bytes > layout.stride - 64
    g2, u2, d2 = unpack_bundles(blob, layout)
    np.testing.assert_array_equal(u2, quant.roundtrip(up, fmt))
    np.testing.assert_array_equal(d2, quant.roundtrip(down.T, fmt).T)
    if gated:
        np.testing.assert_array_equal(g2, quant.roundtrip(gate, fmt))
        assert layout.part_offset("up") == layout.part_bytes
    else:
        assert g2 is None and layout.part_offset("up") == 0
    # bundle bytes: parts in order, zero padding, deterministic
    i = 7
    off = layout.part_offset("down")
    np.testing.assert_array_equal(blob[i, off:off + layout.part_bytes], quant.encode(down[:, i], fmt))
    assert not blob[:, len(layout.parts) * layout.part_bytes:].any()
    np.testing.assert_array_equal(blob, pack_bundles(gate, up, down, layout))
    assert BundleLayout.from_dict(layout.to_dict()) == layout


def test_bundle_layout_sizes_and_errors():
    lay = BundleLayout("Q4_0", 4096, 11008, True)
    assert lay.fmt == "q4_0" and lay.part_bytes == 128 * 18 and lay.stride == 6912
    assert BundleLayout("q8_0", 384, 1536, False).part_bytes == 12 * 34
    assert BundleLayout("f32", 256, 704, True, align=128).stride == 3072
    with pytest.raises(ValueError, match="multiple of 32"):
        BundleLayout("q8_0", 100, 4, False)
    with pytest.raises(ValueError, match="power of two"):
        BundleLayout("f32", 64, 4, False, align=48)
    with pytest.raises(ValueError, match="not in a non-gated"):
        BundleLayout("f32", 64, 4, False).part_offset("gate")
    lay = BundleLayout("f32", 64, 4, False)
    with pytest.raises(ValueError, match="shape"):
        pack_bundles(None, np.zeros((4, 64)), np.zeros((4, 64)), lay)
    with pytest.raises(ValueError, match="gate must be given"):
        pack_bundles(np.zeros((4, 64)), np.zeros((4, 64)), np.zeros((64, 4)), lay)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bundles(np.zeros(10, np.uint8), lay)
    with pytest.raises(ValueError, match="stride"):
        BundleLayout.from_dict({**lay.to_dict(), "stride": 1})
