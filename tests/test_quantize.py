"""The quantize pass: ggml-exact bytes (checked against gguf-py), format choice, the IR
holding exactly what the artifact decodes to, SQNR on all-MiniLM-L6-v2."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gg_dequantize
from gguf.quants import quantize as gg_quantize

from sparseforge.kernels.bundle import unpack_bundles
from sparseforge.passes.pack import Pack
from sparseforge.passes.quantize import Quantize, QuantizeOptions, sqnr_db
from sparseforge.toolchain.artifact_format import bundle_name
from sparseforge.toolchain.artifact_reader import Artifact
from sparseforge.toolchain.errors import PassError
from sparseforge.toolchain.frontends import load_model
from sparseforge.toolchain.pass_manager import PassManager
from sparseforge.toolchain.reference import executor_for

GG = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


@pytest.fixture(scope="module")
def packed(tiny_model):
    """``packed(kind, **quantize options)`` -> (original IR, quantized IR, open Artifact)."""
    cache = {}

    def make(kind, **opts):
        key = (kind, tuple(sorted((k, str(v)) for k, v in opts.items())))
        if key not in cache:
            ir = load_model(tiny_model(kind)[0])
            res = PassManager([Quantize(QuantizeOptions(**opts)), Pack()]).run(ir)
            cache[key] = (ir, res.ir, Artifact.open(res.ir.files["pack/model.gguf"]), res)
        return cache[key][:3]

    return make


def test_q8_0_bytes_equal_gguf_quantize_of_the_original_weights(packed):
    ir, _, art = packed("bert")
    q8 = [n for n in art.tensor_names if art.format_of(n) == "q8_0"]
    assert len(q8) >= 8  # attention matrices and embeddings
    for name in q8:
        assert np.array_equal(art.tensor(name), gg_quantize(ir.store.get_f32(name), GG["q8_0"])), name


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_bundles_dequantize_to_ggufs_values_and_to_the_ir(packed, kind):
    ir, qir, art = packed(kind)
    for b, layout in zip(qir.blocks, art.layouts):
        assert layout.fmt == "q4_0" and b.annotations["quant"]["format"] == "q4_0"
        blob = art.bundles(b.layer)
        gate, up, down = unpack_bundles(blob, layout)
        for part, ours in (("gate", gate), ("up", up), ("down", down.T)):
            name = getattr(b, part)
            if name is None:
                continue
            off = layout.part_offset(part)
            raw = np.ascontiguousarray(blob[:, off:off + layout.part_bytes])
            theirs = gg_dequantize(raw, GG["q4_0"])
            assert np.array_equal(ours, theirs), name
            ir_rows = qir.store.get_f32(name)
            assert np.array_equal(theirs, ir_rows.T if part == "down" else ir_rows), name
            # bundle bytes are ggml's Q4_0 of the original rows (down: columns)
            orig = ir.store.get_f32(name)
            assert np.array_equal(raw, gg_quantize(orig.T if part == "down" else orig, GG["q4_0"])), name


def test_q4_0_matrices_outside_bundles(packed):
    ir, qir, art = packed("llama", attention="q4_0")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert art.format_of(name) == "q4_0"
    assert np.array_equal(gg_dequantize(art.tensor(name), GG["q4_0"]), qir.store.get_f32(name))
    assert np.array_equal(art.tensor(name), gg_quantize(ir.store.get_f32(name), GG["q4_0"]))


def test_ir_holds_what_the_artifact_decodes_to(packed):
    _, qir, art = packed("llama", ffn="q8_0", embeddings="f16")
    for name in art.tensor_names:
        if name.startswith("blk."):
            continue
        assert np.array_equal(art.weight(name), qir.store.get_f32(name)), name
    assert art.format_of("model.embed_tokens.weight") == "f16"
    assert art.format_of("model.norm.weight") == "f32"
    assert {lay.fmt for lay in art.layouts} == {"q8_0"}
    # the reference executor runs the quantized IR
    ids = np.arange(12).reshape(2, 6) % qir.spec.vocab_size
    assert np.isfinite(executor_for(qir).forward(ids)).all()


def test_format_choice_overrides_and_fallback(tiny_model):
    q = Quantize(QuantizeOptions(overrides={"*.q_proj.weight": "f16"}, ffn_layers={"1": "q8_0"}))
    assert q.tensor_format("model.layers.0.self_attn.q_proj.weight", (64, 64)) == ("f16", False)
    assert q.tensor_format("model.layers.0.self_attn.k_proj.weight", (32, 64)) == ("q8_0", False)
    assert q.tensor_format("model.embed_tokens.weight", (100, 64)) == ("q8_0", False)
    assert q.tensor_format("model.norm.weight", (64,)) == ("f32", False)
    assert q.tensor_format("lm_head.weight", (100, 40)) == ("f16", True)  # 40 is not a multiple of 32
    assert q.ffn_format(1, 64) == ("q8_0", False) and q.ffn_format(0, 64) == ("q4_0", False)
    assert q.ffn_format(0, 48) == ("f16", True)
    with pytest.raises(PassError, match="unknown weight format 'q5_1'"):
        Quantize(QuantizeOptions(ffn="q5_1")).check_options()
    with pytest.raises(PassError, match="fallback must be f32 or f16"):
        Quantize(QuantizeOptions(fallback="q8_0")).check_options()
    ir = load_model(tiny_model("llama")[0])
    with pytest.raises(PassError, match="ffn_layers names layer 5"):
        Quantize(QuantizeOptions(ffn_layers={"5": "f16"})).check_model(ir)


def test_stats_and_pack_refuses_changed_weights(packed, tmp_path):
    _, qir, _ = packed("bert")
    stats = qir.pass_log[-2]["stats"]
    assert stats["formats"]["q4_0"]["tensors"] == 4 and stats["formats"]["q8_0"]["tensors"] >= 8
    row = stats["per_tensor"]["encoder.layer.0.intermediate.dense.weight"]
    assert row["format"] == "q4_0" and row["bytes"] == 128 * 64 // 32 * 18 and 15 < row["sqnr_db"] < 30
    assert stats["per_tensor"]["embeddings.LayerNorm.weight"]["sqnr_db"] is None  # f32: exact
    changed = qir.evolve()
    name = "encoder.layer.0.attention.self.query.weight"
    changed.store.set(name, changed.store.get_f32(name) * np.float32(1.001))
    with pytest.raises(PassError, match="does not round-trip"):
        PassManager([Pack()]).run(changed)


def test_minilm_sqnr(minilm_dir):
    ir = load_model(minilm_dir)
    out = PassManager([Quantize()]).run(ir)
    f = out.records[0].stats["formats"]
    print("\nall-MiniLM-L6-v2 SQNR (dB):", {k: (round(v["min_sqnr_db"] or 0, 2), round(v["mean_sqnr_db"] or 0, 2))
                                             for k, v in f.items()}, "bytes:", out.records[0].stats["bytes"])
    assert f["q8_0"]["min_sqnr_db"] > 35 and f["q4_0"]["min_sqnr_db"] > 15
    assert f["q4_0"]["tensors"] == 12 and out.records[0].stats["fallbacks"] == []
    x = np.random.default_rng(0).standard_normal((64, 384)).astype(np.float32)
    assert sqnr_db(x, x) is None and sqnr_db(x, 0 * x) == pytest.approx(0.0)
