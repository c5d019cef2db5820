"""Layer-streamed conversion (issue #9): quantized weights kept encoded on disk, per-layer
reorder and pack."""
from __future__ import annotations

import numpy as np

from sparseforge.passes.profile import Profile, ProfileOptions
from sparseforge.passes.quantize import Quantize, QuantizeOptions
from sparseforge.passes.reorder import Reorder
from sparseforge.kernels import quant
from sparseforge.toolchain.frontends import load_model
from sparseforge.toolchain.ir import ModelIR
from sparseforge.toolchain.pass_base import PassContext


def test_quantized_weights_stay_encoded_on_disk(tiny_model, tmp_path):
    ckpt, _ = tiny_model("llama")
    ir = load_model(ckpt)
    out = Quantize(QuantizeOptions(ffn="q4_0", attention="q8_0", embeddings="q8_0", other="f16"))(
        ir, PassContext(work_dir=tmp_path / "q", seed=0)).ir
    assert out.store.overlay_names() == []  # nothing held in memory
    b = out.blocks[0]
    raw, fmt, transpose = out.store.encoded(b.down)
    assert fmt == "q4_0" and transpose and raw.dtype == np.uint8  # down columns are the encoded rows
    x = ir.store.get_f32(b.down)
    np.testing.assert_array_equal(out.store.get_f32(b.down), quant.roundtrip(x.T, "q4_0").T)
    assert out.store.shape(b.down) == x.shape and out.store.dtype(b.down) == np.float32
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(out.store.get(q), quant.roundtrip(ir.store.get_f32(q), "q8_0"))
    # saved and loaded: the task files move into the IR directory, references follow
    out.save(tmp_path / "ir")
    back = ModelIR.load(tmp_path / "ir")
    assert back.store.ref(b.down).file.startswith(str(tmp_path / "ir" / "tensor-files"))
    np.testing.assert_array_equal(back.store.get_f32(b.down), out.store.get_f32(b.down))
    assert back.content_hash() == out.content_hash()


def test_reorder_permutes_encoded_rows(tiny_model, tmp_path):
    ckpt, _ = tiny_model("llama")
    ir = load_model(ckpt)
    ids = np.random.default_rng(0).integers(0, 128, size=(8, 16))
    np.save(tmp_path / "ids.npy", ids)
    prof = Profile(ProfileOptions(calib=str(tmp_path / "ids.npy"), seq_len=16, num_sequences=6, max_samples=20))(
        ir, PassContext(work_dir=tmp_path / "p", seed=0)).ir
    q = Quantize(QuantizeOptions(ffn="q4_0"))(prof, PassContext(work_dir=tmp_path / "q", seed=0)).ir
    r = Reorder()(q, PassContext(work_dir=tmp_path / "r", seed=0)).ir
    for b in r.blocks:
        perm = np.asarray(q.store.get(b.annotations["profile"]["tensors"]["rank"]))
        assert r.store.encoded(b.gate) is not None and r.store.encoded(b.down)[2]
        np.testing.assert_array_equal(r.store.get_f32(b.gate), q.store.get_f32(b.gate)[perm])
        np.testing.assert_array_equal(r.store.get_f32(b.down), q.store.get_f32(b.down)[:, perm])
    assert not any(n in r.store.overlay_names() for b in r.blocks for n in (b.gate, b.up, b.down))
