"""Numba FFN kernels (kernels.ffn via kernels.runtime) against numpy references.

References use the bundles' decoded weights (unpack_bundles); quantized kernels are
compared with the activation's Q8_0 quantization emulated in numpy.
"""
import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gg_dequantize
from gguf.quants import quantize as gg_quantize

from sparseforge.kernels import ffn, quant
from sparseforge.kernels.bundle import BundleLayout, encode_gate, pack_bundles, unpack_bundles
from sparseforge.kernels.runtime import (CROSSOVER_TOKENS, PREDICTOR_BATCH_MAX, TILE_NEURONS, LayerKernels,
                                         Predictor, Scratch, measure_crossover, predictor_logits_numpy)

D, N = 96, 80


def _act(z, kind, t=0.0):
    z = z.astype(np.float64)
    if kind == "relu":
        return np.maximum(z, 0)
    if kind == "fatrelu":
        return np.where(z > t, z, 0)
    if kind == "silu":
        return z / (1 + np.exp(-z))
    if kind == "gelu":
        return 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    return 0.5 * z * (1 + np.tanh(0.7978845608028654 * (z + 0.044715 * z ** 3)))


@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("gated", [False, True])
def test_smooth_activations_against_float64(kind, gated):
    """SiLU, GELU (erf) and GELU's tanh form in the kernels' branch-free float32 (the
    loops of a prompt's FFN) against float64 over [-30, 30] and tiny values: within
    1e-5 relative (2e-6 within |z| < 4), 1e-12
    absolute; the gated form times the up value clamped at 0 (dReLU-style) or not."""
    z = np.concatenate([np.linspace(-30, 30, 6001), [0.0, 1e-30, -1e-30, 1e-6, -1e-6]]).astype(np.float32)
    up = np.random.default_rng(0).standard_normal(z.size).astype(np.float32)
    zz = z.astype(np.float64)
    with np.errstate(over="ignore"):
        want = {"silu": zz / (1 + np.exp(-zz)), "gelu": 0.5 * zz * np.vectorize(math.erfc)(-zz / math.sqrt(2)),
                "gelu_tanh": zz / (1 + np.exp(-2 * 0.7978845608028654 * (zz + 0.044715 * zz ** 3)))}[kind]
    code = {"silu": ffn.SILU, "gelu": ffn.GELU, "gelu_tanh": ffn.GELU_TANH}[kind]
    for up_relu in (False, True) if gated else (False,):
        u = up.copy() if gated else z.copy()
        ffn.apply_activation_2d(z[None], u[None], np.zeros((0, 0), np.bool_), gated, code, np.float32(0), up_relu,
                                np.float32(0))
        ref = want * (np.maximum(up, 0) if up_relu else up) if gated else want
        np.testing.assert_allclose(u, ref, rtol=1e-5, atol=1e-12)
        core = np.abs(z) < 4
        np.testing.assert_allclose(u[core], ref[core], rtol=2e-6, atol=1e-12)


def _layer(fmt, gated, seed=0, bias=False):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((N, D)).astype(np.float32) / 8 if gated else None
    u = rng.standard_normal((N, D)).astype(np.float32) / 8
    dn = rng.standard_normal((D, N)).astype(np.float32) / 8
    lay = BundleLayout(fmt, D, N, gated)
    blob = pack_bundles(g, u, dn, lay)
    b = {}
    if bias:
        b = {"up_bias": rng.standard_normal(N).astype(np.float32) / 10,
             "down_bias": rng.standard_normal(D).astype(np.float32) / 10}
        if gated:
            b["gate_bias"] = rng.standard_normal(N).astype(np.float32) / 10
    return blob, lay, b


def _ref(blob, lay, x, kind, up_relu=False, t=0.0, out_t=0.0, idx=None, bias=None):
    bias = bias or {}
    g, u, dn = unpack_bundles(blob, lay)
    xx = quant.roundtrip(x, "q8_0") if lay.fmt in quant.QUANTIZED else x
    U = u.astype(np.float64) @ xx + bias.get("up_bias", 0)
    if lay.gated:
        G = g.astype(np.float64) @ xx + bias.get("gate_bias", 0)
        h = _act(G, kind, t) * (np.maximum(U, 0) if up_relu else U)
    else:
        h = _act(U, kind, t)
    if out_t > 0:
        h = np.where(np.abs(h) <= out_t, 0, h)
    mask = np.zeros(lay.n_neurons, bool)
    mask[np.arange(lay.n_neurons) if idx is None else idx] = True
    h = np.where(mask, h, 0)
    return dn.astype(np.float64) @ h + bias.get("down_bias", 0), h


def _close(a, b, tol=2e-4):
    scale = max(1e-3, float(np.abs(b).max(initial=0)))
    np.testing.assert_allclose(a, b, atol=tol * scale, rtol=0)


@pytest.mark.parametrize("fmt", ["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("kind,gated,up_relu", [("relu", False, False), ("relu", True, True), ("fatrelu", True, False),
                                                ("silu", True, False), ("gelu", False, False),
                                                ("gelu_tanh", False, False)])
def test_sparse_and_dense_forward(fmt, kind, gated, up_relu):
    blob, lay, bias = _layer(fmt, gated, bias=kind in ("gelu", "silu"))
    t = 0.05 if kind == "fatrelu" else 0.0
    k = LayerKernels(blob, lay, activation=kind, up_activation="relu" if up_relu else None,
                     activation_threshold=t, **bias)
    x = np.random.default_rng(1).standard_normal(D).astype(np.float32)
    idx = np.sort(np.random.default_rng(2).choice(N, 17, replace=False))
    for sel in (None, idx, idx[:0]):
        y, h = k.forward(x, sel, return_h=True)
        yr, hr = _ref(blob, lay, x, kind, up_relu, t, idx=sel, bias=bias)
        _close(y, yr)
        _close(h, hr[np.arange(N) if sel is None else sel])
    if bias:  # the row gather adds the bias; 17 rows: float32 in eights, quantized in pairs, one left over
        _, u, _ = unpack_bundles(blob, lay)
        xx = quant.roundtrip(x, "q8_0") if lay.fmt in quant.QUANTIZED else x
        _close(k.rows(x, "up", idx), (u.astype(np.float64) @ xx + bias["up_bias"])[idx])
    if gated and kind in ("relu", "fatrelu"):  # a prompt's gate-first masks: the gates above t
        _gate_masks_exact(k, blob, lay, kind, up_relu, t, bias)


def _gate_masks_exact(k, blob, lay, kind, up_relu, t, bias, out_t=0.0):
    """``k.gate_masks`` of 6 tokens against numpy's gates (where they are not within
    rounding of ``t``), and the prefill on them against the reference without masks."""
    X = np.random.default_rng(12).standard_normal((6, D)).astype(np.float32)
    Xq = quant.roundtrip(X, "q8_0") if lay.fmt in quant.QUANTIZED else X
    G = Xq.astype(np.float64) @ unpack_bundles(blob, lay)[0].T.astype(np.float64) + bias.get("gate_bias", 0)
    masks = k.gate_masks(X)
    clear = np.abs(G - t) > 1e-5
    assert clear.mean() > 0.99 and 0.2 < masks.mean() < 0.8
    np.testing.assert_array_equal(masks[clear], (G > t)[clear])
    want = np.stack([_ref(blob, lay, X[i], kind, up_relu, t, out_t, bias=bias)[0] for i in range(6)])
    for mode in ("sparse", "dense"):
        _close(k.prefill(X, masks, mode=mode), want, tol=1e-3)


@pytest.mark.parametrize("fmt", ["f32", "q8_0", "q4_0"])
def test_rows_axpy_output_threshold_and_gate_first(fmt):
    blob, lay, _ = _layer(fmt, True, seed=3)
    g, u, dn = unpack_bundles(blob, lay)
    x = np.random.default_rng(4).standard_normal(D).astype(np.float32)
    xx = quant.roundtrip(x, "q8_0") if fmt != "f32" else x
    k = LayerKernels(blob, lay, activation="drelu", output_threshold=0.002, serial_below=0)  # thread-pool path
    idx = np.array([0, 5, 6, 40, 79])
    _close(k.rows(x, "gate", idx), (g @ xx)[idx])
    _close(k.rows(x, "up"), u @ xx)
    hv = np.random.default_rng(5).standard_normal(5).astype(np.float32)
    _close(k.axpy(hv, idx), dn[:, idx] @ hv)
    yr, _ = _ref(blob, lay, x, "relu", True, out_t=0.002)
    _close(k.forward(x), yr)
    y, pos = k.gate_first(x, return_idx=True)
    _close(y, yr)
    np.testing.assert_array_equal(pos, np.flatnonzero(g.astype(np.float64) @ xx > 0))
    with pytest.raises(ValueError, match="rows"):
        k.rows(x, "down")
    with pytest.raises(ValueError, match="gate-first"):
        LayerKernels(*_layer(fmt, False)[:2]).gate_first(x)
    with pytest.raises(ValueError, match="gate-first"):
        LayerKernels(*_layer(fmt, False)[:2]).gate_masks(x[None])
    _gate_masks_exact(k, blob, lay, "relu", True, 0.0, {}, out_t=0.002)
    _close(k.forward(x, [0, N - 1]), _ref(blob, lay, x, "relu", True, out_t=0.002, idx=np.array([0, N - 1]))[0])
    for bad in ([0, N], [-1, 3], [[1, 2]]):  # neuron indices outside [0, N), or not 1-D
        with pytest.raises(ValueError, match="neuron indices"):
            k.forward(x, bad)


@pytest.mark.parametrize("fmt", ["f32", "f16", "q8_0", "q4_0"])
def test_gate_apart_layout(fmt):
    """A gate-apart layer (bundles of up and down, the gate a matrix of its own) against
    the numpy reference of the same weights: one token dense, sparse and gate-first, the
    gate rows, a ``gate_matvec`` hook, and prefill (the sparse kernel and dense tiles,
    with and without masks)."""
    blob, lay, bias = _layer(fmt, True, seed=6, bias=True)
    g, u, dn = unpack_bundles(blob, lay)
    apart = BundleLayout(fmt, D, N, True, gate_apart=True)
    assert apart.parts == ("up", "down") and BundleLayout.from_dict(apart.to_dict()) == apart
    assert "gate_apart" not in lay.to_dict()  # layouts written before the field read the same
    k = LayerKernels(pack_bundles(None, u, dn, apart), apart, activation="drelu", gate=encode_gate(g, apart), **bias)
    x = np.random.default_rng(7).standard_normal(D).astype(np.float32)
    xx = quant.roundtrip(x, "q8_0") if fmt in quant.QUANTIZED else x
    idx = np.sort(np.random.default_rng(8).choice(N, 23, replace=False))
    for sel in (None, idx):
        _close(k.forward(x, sel), _ref(blob, lay, x, "relu", True, idx=sel, bias=bias)[0])
    gates = g.astype(np.float64) @ xx + bias["gate_bias"]
    _close(k.rows(x, "gate", idx), gates[idx])
    y, pos = k.gate_first(x, return_idx=True)
    _close(y, _ref(blob, lay, x, "relu", True, bias=bias)[0])
    np.testing.assert_array_equal(pos, np.flatnonzero(gates > 0))
    k.gate_matvec = lambda v: (g.astype(np.float64) @ v).astype(np.float32)  # the runtime's tiled matvec goes here
    _close(k.gates(xx), gates)
    X = np.random.default_rng(9).standard_normal((6, D)).astype(np.float32)
    masks = np.random.default_rng(10).random((6, N)) < 0.3
    for m in (None, masks):
        want = np.stack([_ref(blob, lay, X[t], "relu", True, idx=None if m is None else np.flatnonzero(m[t]),
                              bias=bias)[0] for t in range(6)])
        for mode in ("sparse", "dense"):
            _close(k.prefill(X, m, mode=mode), want, tol=1e-3)
    _gate_masks_exact(k, blob, lay, "relu", True, 0.0, bias)  # the gates read from their own matrix
    with pytest.raises(ValueError, match="gate_apart"):
        LayerKernels(pack_bundles(None, u, dn, apart), apart, activation="drelu")
    with pytest.raises(ValueError, match="gated"):
        BundleLayout(fmt, D, N, False, gate_apart=True)


@pytest.mark.parametrize("fmt", ["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_matvec_of_stacked_matrices(fmt, chunks):
    """The dense matvec reads each chunk's float32 rows four at a time (one from each
    quarter) and quantized rows in pairs (from each matrix's two halves of the chunk), the
    rest one by one; rows of several matrices, chunks with and without a remainder, matrix
    boundaries inside a chunk. Quantized: against gguf-py's dequantized rows times the
    input's Q8_0 round trip."""
    rng = np.random.default_rng(9)
    d = 64
    ws = tuple(rng.standard_normal((rows, d)).astype(np.float32) for rows in (7, 3, 11, 19))
    x = rng.standard_normal(d).astype(np.float32)
    kinds = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
    if fmt == "f32":
        mats, dense, code, xr = ws, ws, ffn.F32, x.astype(np.float64)
        dummies = (np.zeros((1, 1), np.int8),) * 4
    else:
        qs = [gg_quantize(w, kinds[fmt]) for w in ws]
        mats, code = tuple(q.view(np.int8) for q in qs), ffn.FORMAT_CODES[fmt]
        dense = [gg_dequantize(q, kinds[fmt]) for q in qs]
        xr = quant.roundtrip(x, "q8_0").astype(np.float64)  # the kernels' Q8_0 input
        dummies = (np.zeros((1, 1), np.float32),) * 4
    want = np.concatenate([w.astype(np.float64) @ xr for w in dense])
    for kernel in (ffn.matvec_par, ffn.matvec_ser):
        out = np.full(40, np.nan, np.float32)
        if fmt == "f32":
            kernel(x, mats, dummies, code, quant.F16_TO_F32, chunks, out)
        else:
            kernel(x, dummies, mats, code, quant.F16_TO_F32, chunks, out)
        _close(out, want)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_matmul_of_quantized_rows(fmt):
    """The multi-token row kernel (a prompt's quantized projections): every token against
    gguf-py's dequantized rows times the token's Q8_0 round trip, and against the matvec;
    19 rows over 1 / 3 / 8 chunks (pairs from each chunk's halves, odd remainders)."""
    rng = np.random.default_rng(10)
    kind = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[fmt]
    q = gg_quantize(rng.standard_normal((19, 96)).astype(np.float32), kind)
    X = rng.standard_normal((6, 96)).astype(np.float32)
    want = quant.roundtrip(X, "q8_0").astype(np.float64) @ gg_dequantize(q, kind).astype(np.float64).T
    code = ffn.FORMAT_CODES[fmt]
    for chunks in (1, 3, 8):
        out = np.full((6, 19), np.nan, np.float32)
        ffn.matmul_q_par(X, q.view(np.int8), code, quant.F16_TO_F32, chunks, out)
        _close(out, want)
        for t in range(6):
            mv = np.empty(19, np.float32)
            ffn.matvec_ser(X[t], (np.zeros((1, 1), np.float32),), (q.view(np.int8),), code, quant.F16_TO_F32, 1, mv)
            _close(out[t], mv, tol=1e-6)


def test_matmul_of_f32_rows():
    """The float32 multi-token row kernel (a prompt's f32 projections) against numpy in
    float64: 19 rows (four at a time, three left over) times 1 / 3 / 4 / 6 / 9 tokens
    (four at a time, the rest one by one) over 1 / 3 / 8 chunks."""
    rng = np.random.default_rng(13)
    w = rng.standard_normal((19, 96)).astype(np.float32)
    for T in (1, 3, 4, 6, 9):
        X = rng.standard_normal((T, 96)).astype(np.float32)
        want = X.astype(np.float64) @ w.astype(np.float64).T
        for chunks in (1, 3, 8):
            out = np.full((T, 19), np.nan, np.float32)
            ffn.matmul_f32_par(X, w, chunks, out)
            _close(out, want, tol=1e-5)


def test_activation_quantization_matches_ggml():
    x = np.random.default_rng(6).standard_normal((8, 256)).astype(np.float32) * np.float32(3)
    x[0, :32] = 0
    x[1, 5] = 1e-7
    for row in x:
        xq, xd = np.empty(256, np.int8), np.empty(8, np.float32)
        ffn.quantize_q8_0_into(row, xq, xd)
        q, d = quant.quantize_activation_q8_0(row)
        np.testing.assert_array_equal(xq, q)
        np.testing.assert_array_equal(xd, d)


@pytest.mark.parametrize("kind", list(ffn.ACT_CODES))
@pytest.mark.parametrize("gated,up_relu", [(False, False), (True, False), (True, True)])
def test_apply_activation_2d_against_numpy(kind, gated, up_relu):
    """The dense prefill tiles' activation (ReLU family in loops of their own) with and
    without a mask and an output threshold."""
    rng = np.random.default_rng(10)
    G, U = rng.standard_normal((2, 6, 77)).astype(np.float32)
    mask = rng.random((6, 77)) < 0.6
    t = 0.25
    u = np.maximum(U, 0) if up_relu else U
    h = _act(G, kind, t) * u if gated else _act(U, kind, t)
    for m, out_t in ((None, 0.0), (mask, 0.0), (None, 0.1), (mask, 0.1)):
        want = np.where(np.abs(h) <= out_t, 0, h) if out_t else h
        want = np.where(m, want, 0) if m is not None else want
        got = U.copy()
        ffn.apply_activation_2d(G, got, np.zeros((0, 0), np.bool_) if m is None else m, gated, ffn.ACT_CODES[kind],
                                np.float32(t), up_relu, np.float32(out_t))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_token_rows_roundtrip_matches_numpy_bit_for_bit():
    """The dense prefill tiles' input quantization (Numba) against the numpy emulation."""
    x = np.random.default_rng(9).standard_normal((16, 128)).astype(np.float32) * np.float32(3)
    x[0, :32] = 0  # an all-zero block
    x[1, 40] = 1e-7
    x[2, :64] = np.round(x[2, :64] * 4) / 4  # exact halves after scaling: ties round away from 0
    want = quant.roundtrip(x, "q8_0")
    got = np.empty_like(x)
    ffn.roundtrip_q8_0_rows(x, got)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("fmt", ["f32", "q4_0"])
def test_prefill_sparse_dense_and_crossover(fmt):
    blob, lay, bias = _layer(fmt, True, seed=7, bias=True)
    k = LayerKernels(blob, lay, activation="silu", **bias)
    rng = np.random.default_rng(8)
    X = rng.standard_normal((5, D)).astype(np.float32)
    masks = rng.random((5, N)) < 0.3
    ref = np.stack([_ref(blob, lay, X[t], "silu", idx=np.flatnonzero(masks[t]), bias=bias)[0] for t in range(5)])
    for mode in ("sparse", "dense", "auto"):
        _close(k.prefill(X, masks, mode=mode), ref)
    _close(k._prefill_dense(X, masks, tile=32), ref)  # three tiles, the last one short
    ref_all = np.stack([_ref(blob, lay, X[t], "silu", bias=bias)[0] for t in range(5)])
    _close(k.prefill(X, None, mode="sparse"), ref_all)
    _close(k.prefill(X, None, mode="dense"), ref_all)
    c = measure_crossover(k, tokens=4, densities=(0.1, 0.5), repeat=1, threads=(1, 2))
    scale = (4 / CROSSOVER_TOKENS) ** k.slope * 2  # restated at CROSSOVER_TOKENS tokens, equal threads
    assert any(c == pytest.approx(v * scale) for v in (0.1, 0.5, 1.0)) and k.crossover == c
    assert k.dense_density(4, threads=(1, 2)) == pytest.approx(c / scale)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_prefill_dense_with_kept_float32_parts(fmt):
    """``keep_float32``: the dense tiles multiply float32 copies of the parts made once
    (each the part's rows decoded), in one tile, and give what the per-tile path gives."""
    blob, lay, bias = _layer(fmt, True, seed=11, bias=True)
    kept = LayerKernels(blob, lay, activation="silu", keep_float32=True, **bias)
    plain = LayerKernels(blob, lay, activation="silu", **bias)
    X = np.random.default_rng(12).standard_normal((6, D)).astype(np.float32)
    ref = np.stack([_ref(blob, lay, X[t], "silu", bias=bias)[0] for t in range(6)])
    _close(kept.prefill(X, None, mode="dense"), ref)
    np.testing.assert_allclose(kept.prefill(X, None, mode="dense"), plain._prefill_dense(X, None, tile=32),
                               rtol=1e-5, atol=1e-5)
    g, u, dn = unpack_bundles(blob, lay)  # numpy's decoding of the parts
    parts = {(kept.po_g, True): g, (kept.po["up"], False): u, (kept.po["down"], False): dn.T}
    assert set(kept._float32) == set(parts)
    for key, w in parts.items():
        np.testing.assert_array_equal(kept._float32[key], w)
    assert plain._float32 == {} and plain.dense_tile(6) == TILE_NEURONS
    assert kept.dense_tile(6) == N  # the whole layer in one tile


def test_prefill_auto_switches_on_mask_density_and_tokens(monkeypatch):
    """``auto`` runs dense tiles exactly when the mask density (pairs set / T n) reaches
    ``dense_density(T)``, which falls as the token count grows."""
    blob, lay, bias = _layer("f32", True, seed=7, bias=True)
    k = LayerKernels(blob, lay, activation="silu", crossover=0.4, **bias)
    dense_calls = []
    inner = k._prefill_dense
    monkeypatch.setattr(k, "_prefill_dense", lambda X, m: dense_calls.append(X.shape[0]) or inner(X, m))
    rng = np.random.default_rng(3)
    assert k.dense_density(CROSSOVER_TOKENS) == pytest.approx(0.4)
    assert k.dense_density(4) > 1.0 > k.dense_density(CROSSOVER_TOKENS) > k.dense_density(256)
    assert k.dense_density(256, threads=(2, 1)) == pytest.approx(4 * k.dense_density(256, threads=(1, 2)))
    X = rng.standard_normal((CROSSOVER_TOKENS, D)).astype(np.float32)
    every_neuron_sparse = np.zeros((CROSSOVER_TOKENS, N), bool)
    for j in range(3):  # three neurons per token, every neuron in the union: density 3/N
        every_neuron_sparse[np.arange(CROSSOVER_TOKENS), (3 * np.arange(CROSSOVER_TOKENS) + j) % N] = True
    assert every_neuron_sparse.any(axis=0).all()
    k.prefill(X, every_neuron_sparse)
    assert dense_calls == []  # a full union of sparse masks stays sparse
    k.prefill(X, rng.random((CROSSOVER_TOKENS, N)) < 0.6)
    assert dense_calls == [CROSSOVER_TOKENS]
    k.prefill(X[:4], None)  # every neuron, but few tokens: the sparse kernel
    assert dense_calls == [CROSSOVER_TOKENS]
    k.prefill(X, rng.random((CROSSOVER_TOKENS, N)) < 0.6, threads=(4, 1))  # sparse on 4 threads, sgemm on 1
    assert dense_calls == [CROSSOVER_TOKENS]


def test_predictor_eval_and_selection():
    rng = np.random.default_rng(9)
    r = 19  # odd: the first layer reads rows in pairs plus one; 9 positive hidden units here:
    # the second layer reads W2^T rows four at a time plus one on the x86 vector path
    w1, w2 = rng.standard_normal((r, D)).astype(np.float32), rng.standard_normal((N, r)).astype(np.float32)
    b1, b2 = rng.standard_normal(r).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    p = Predictor(w1, w2, threshold=0.5, b1=b1, b2=b2)
    x = rng.standard_normal(D).astype(np.float32)
    # D is a multiple of 32: Q8_0 x and W1 rows, Q8_0 rows of W2^T (N padded to 96), by gguf-py
    assert p.fmt == "q8_0" and p.nbytes < (w1.nbytes + w2.nbytes) / 3

    def gg_q8(a):
        return gg_dequantize(gg_quantize(np.ascontiguousarray(a), GGMLQuantizationType.Q8_0),
                             GGMLQuantizationType.Q8_0).astype(np.float64)

    assert p.w1 is None and p.w2 is None  # only the Q8_0 rows are kept

    def reference(w1, w2, b1, b2, X):
        hid = np.maximum(gg_q8(X) @ gg_q8(w1).T + b1, 0)
        return hid @ gg_q8(np.pad(w2.T, ((0, 0), (0, -w2.shape[0] % 32))))[:, :w2.shape[0]] + b2

    lg = reference(w1, w2, b1, b2, x[None])[0]
    _close(p.logits(x), lg, tol=1e-5)
    _close(Predictor(w1, w2, 0.5, b1, b2, serial_below=0).logits(x), lg, tol=1e-5)  # thread-pool path
    _close(predictor_logits_numpy(w1, w2, b1, b2, x[None])[0], lg, tol=1e-5)
    # prefill: the batch kernel, then (more tokens) the rows decoded into the shared
    # scratch buffers and sgemm; a predictor of another shape reuses the buffers
    X = rng.standard_normal((PREDICTOR_BATCH_MAX + 3, D)).astype(np.float32)
    scratch = Scratch()
    for T in (0, 2, PREDICTOR_BATCH_MAX, PREDICTOR_BATCH_MAX + 3):
        _close(p.logits_batch(X[:T], scratch), reference(w1, w2, b1, b2, X[:T]), tol=1e-5)
    # the batch kernel on one or three chunks, in steps of two W1 rows and one block of
    # W2^T, or of 12 rows and two blocks (steps that do not divide the ranges): each
    # token as the one-token kernel computes it
    one = np.stack([p.logits(x).copy() for x in X[:5]])
    for nchunks, step in ((1, 1), (1, 2 * r * 34), (3, 1), (3, 2 * r * 34)):
        Z = np.full((5, 96), np.nan, np.float32)
        ffn.predictor_logits_q8_0_batch(X[:5], p._q1, p.b1, p._q2t, p.b2, N, quant.F16_TO_F32, nchunks, step, Z)
        _close(Z[:, :N], one, tol=1e-6)
    for rr in (5, 40):
        w1b, w2b = rng.standard_normal((rr, D)).astype(np.float32), rng.standard_normal((N, rr)).astype(np.float32)
        _close(Predictor(w1b, w2b).logits_batch(X, scratch), reference(w1b, w2b, 0, 0, X), tol=1e-5)
    # a width that is not a multiple of 32 runs in float32
    pf = Predictor(w1[:, :40], w2, 0.5, b1, b2)
    assert pf.fmt == "f32"
    _close(pf.logits(x[:40]), np.maximum(w1[:, :40].astype(np.float64) @ x[:40] + b1, 0) @ w2.T + b2, tol=1e-5)
    sel = p.select(x)
    np.testing.assert_array_equal(sel, np.flatnonzero(p.logits(x) >= np.float32(0.5)))
    # thread-pool path: each thread selects in its own range of neurons, then compacted
    np.testing.assert_array_equal(Predictor(w1, w2, 0.5, b1, b2, serial_below=0).select(x), sel)
    top = p.select(x, top_k=10)
    np.testing.assert_array_equal(top, np.sort(np.argsort(-p.logits(x), kind="stable")[:10]))
    assert p.select(x, top_k=0).size == 0
    # exact threshold boundary: a logit equal to the threshold is selected
    p0 = Predictor(np.zeros((1, D), np.float32), np.zeros((N, 1), np.float32), threshold=0.0)
    assert p0.select(x).size == N


def test_input_errors():
    blob, lay, _ = _layer("f32", False)
    with pytest.raises(ValueError, match="drelu"):
        LayerKernels(blob, lay, activation="drelu")
    with pytest.raises(ValueError, match="unsupported activation"):
        LayerKernels(blob, lay, activation="swish")
    k = LayerKernels(blob, lay)
    with pytest.raises(ValueError, match="indices"):
        k.forward(np.zeros(D, np.float32), np.array([N]))
    with pytest.raises(ValueError, match="masks"):
        k.prefill(np.zeros((2, D), np.float32), np.zeros((3, N), bool))
