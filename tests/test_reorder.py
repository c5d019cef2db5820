"""The reorder pass: hot-first order, one permutation for every per-neuron tensor, the
model's outputs unchanged, repeat runs composing, sample masks following."""
from __future__ import annotations

import numpy as np
import pytest

from sparseforge.passes.profile import Profile, ProfileOptions
from sparseforge.passes.quantize import Quantize
from sparseforge.passes.reorder import Reorder, order_tensor
from sparseforge.toolchain.errors import PassError
from sparseforge.toolchain.frontends import load_model
from sparseforge.toolchain.ir import ANNOTATION_PREFIX
from sparseforge.toolchain.pass_manager import PassManager
from sparseforge.toolchain.reference import executor_for
from sparseforge.toolchain.samples import read_shards


@pytest.fixture(scope="module")
def profiled(tiny_model, tmp_path_factory):
    """``profiled(kind)``: the tiny model profiled on random ids, with a fake predictor
    (random w1/w2/b2) on layer 0 so its output rows must follow the permutation."""
    cache = {}

    def make(kind):
        if kind not in cache:
            d = tmp_path_factory.mktemp(f"reorder-{kind}")
            ir = load_model(tiny_model(kind)[0])
            np.save(d / "ids.npy", np.random.default_rng(1).integers(4, ir.spec.vocab_size, size=(40, 16)))
            po = ProfileOptions(calib=str(d / "ids.npy"), seq_len=16, num_sequences=30, max_samples=64, eps=0.1,
                                shard_size=40)
            ir = run([Profile(po)], ir).ir
            ir = ir.evolve()
            rng = np.random.default_rng(2)
            n, dm = ir.spec.intermediate_size, ir.spec.hidden_size
            names = {w: f"{ANNOTATION_PREFIX}predictor.0.{w}" for w in ("w1", "w2", "b2")}
            for w, shape in (("w1", (8, dm)), ("w2", (n, 8)), ("b2", (n,))):
                ir.store.set(names[w], rng.standard_normal(shape).astype(np.float32))
            ir.blocks[0].annotations["predictor"] = {"mode": "predictor", "rank": 8, "threshold": 0.0,
                                                     "tensors": names}
            cache[kind] = ir
        return cache[kind]

    return make


_KEEP = []  # pipeline results own the scratch directories their IRs' files live in


def run(passes, ir):
    res = PassManager(passes).run(ir)
    _KEEP.append(res)
    return res


def _outputs(ir):
    ids = (np.arange(20).reshape(2, 10) * 7) % ir.spec.vocab_size
    ex = executor_for(ir)
    return ex.forward(ids) if ir.spec.family == "llama" else ex(ids)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_outputs_unchanged_and_hot_first(profiled, kind):
    ir = profiled(kind)
    res = run([Reorder()], ir)
    out = res.ir
    np.testing.assert_allclose(_outputs(out), _outputs(ir), atol=1e-5, rtol=0)
    for b_old, b in zip(ir.blocks, out.blocks):
        counts = out.store.get(b.annotations["profile"]["tensors"]["count_active"])
        assert (np.diff(counts) <= 0).all()  # hot first
        perm = np.asarray(ir.store.get(b_old.annotations["profile"]["tensors"]["rank"]), dtype=np.int64)
        assert np.array_equal(out.store.get(order_tensor(b.layer)), perm)
        assert np.array_equal(out.store.get(b.annotations["profile"]["tensors"]["rank"]), np.arange(len(perm)))
        assert np.array_equal(out.store.get(b.up), ir.store.get(b.up)[perm])
        assert np.array_equal(out.store.get(b.down), ir.store.get(b.down)[:, perm])
        if b.up_bias:
            assert np.array_equal(out.store.get(b.up_bias), ir.store.get(b.up_bias)[perm])
        for what in ("mean_abs", "max_abs", "count_positive"):
            name = b.annotations["profile"]["tensors"][what]
            assert np.array_equal(out.store.get(name), ir.store.get(name)[perm])
    assert res.records[0].stats["moved"] > 0
    assert out.graph is None


def test_predictor_rows_and_sample_masks_follow(profiled):
    ir = profiled("llama")
    out = run([Reorder()], ir).ir
    b = out.blocks[0]
    perm = out.store.get(order_tensor(0))
    x = np.random.default_rng(3).standard_normal((5, ir.spec.hidden_size)).astype(np.float32)
    t = b.annotations["predictor"]["tensors"]

    def logits(m):
        h = np.maximum(x @ m.store.get(t["w1"]).T, 0)
        return h @ m.store.get(t["w2"]).T + m.store.get(t["b2"])

    np.testing.assert_allclose(logits(out), logits(ir)[:, perm], rtol=1e-6)
    n = ir.spec.intermediate_size
    keys = b.annotations["profile"]["sample_shards"]
    _, m_old, tok_old = read_shards([ir.files[k] for k in keys], n)
    _, m_new, tok_new = read_shards([out.files[k] for k in keys], n)
    assert len(keys) >= 2 and np.array_equal(tok_old, tok_new) and np.array_equal(m_new, m_old[:, perm])


def test_second_run_composes_and_quantize_commutes(profiled):
    ir = profiled("bert")
    once = run([Reorder()], ir).ir
    twice = run([Reorder()], once)
    assert twice.records[0].stats["moved"] == 0
    for b in once.blocks:
        assert np.array_equal(twice.ir.store.get(order_tensor(b.layer)), once.store.get(order_tensor(b.layer)))
    # quantizing before or after reordering gives the same weights (per-neuron blocks)
    a = run([Quantize(), Reorder()], ir).ir
    c = run([Reorder(), Quantize()], ir).ir
    for b in a.blocks:
        for name in b.weight_names():
            assert np.array_equal(a.store.get(name), c.store.get(name)), name


def test_requires_a_profile(tiny_model):
    with pytest.raises(PassError, match="no activation profile"):
        PassManager([Reorder()]).run(load_model(tiny_model("bert")[0]))
