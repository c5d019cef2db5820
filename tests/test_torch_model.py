"""The torch twin of an IR (toolchain.torch_model): parity with the numpy reference
executors, FFN semantics of evolved blocks, the to_ir round trip and gradients."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sparseforge.toolchain.frontends.hf import load_hf_checkpoint
from sparseforge.toolchain.reference import executor_for
from sparseforge.toolchain.torch_model import BertTorch, LlamaTorch, build_torch_model, to_ir

TOL = 1e-4
KINDS = ["bert", "llama", "llama3", "mistral", "mistral-swa", "qwen2", "qwen3", "phi3", "phi3-longrope", "phi4-mini", "granite", "gemma2", "gemma3"]


def _batch(vocab: int, lengths=(12, 7), seed: int = 0):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = np.zeros((len(lengths), T), np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(3, vocab, n)
        mask[b, :n] = 1
    return ids, mask


def _reference(ir, ids, mask):
    """(output, [h per layer, real tokens only]) of the numpy reference executor."""
    hs: dict[int, np.ndarray] = {}
    ex = executor_for(ir)
    cap = lambda layer, x, h: hs.__setitem__(layer, h.copy())  # noqa: E731
    if ir.family == "bert":
        out = ex.hidden_states(ids, mask, capture=cap)
    else:
        out = ex.forward(ids, attention_mask=mask, capture=cap)
    return out, [hs[i] for i in range(ir.spec.num_layers)]


def _torch(model, ids, mask):
    with torch.no_grad():
        out, hs = model(torch.tensor(ids), torch.tensor(mask), return_ffn=True)
    real = mask.astype(bool)
    return out.numpy(), [h.numpy()[real] for h in hs]


def _check_parity(ir, ids, mask):
    model = build_torch_model(ir)
    ref, ref_h = _reference(ir, ids, mask)
    out, hs = _torch(model, ids, mask)
    real = mask.astype(bool)
    assert out.shape == ref.shape
    assert np.abs(out - ref)[real].max() <= TOL
    for a, b in zip(hs, ref_h):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= TOL
    return model, hs


@pytest.fixture(scope="module")
def tiny_ir(tiny_model):
    return lambda kind: load_hf_checkpoint(tiny_model(kind)[0])


@pytest.fixture(scope="module")
def minilm_ir(minilm_dir):
    return load_hf_checkpoint(minilm_dir)


def _gap_threshold(values: np.ndarray, lo: float, hi: float) -> float:
    """A threshold midway across the widest gap between the ``lo`` and ``hi`` quantiles
    of ``values``, so none sits on it (float rounding could otherwise flip one)."""
    v = np.sort(values)
    a, b = int(lo * v.size), int(hi * v.size)
    i = a + int(np.argmax(np.diff(v[a:b])))
    return float((v[i] + v[i + 1]) / 2)


def _evolve_sparse(ir, ids, mask):
    """ReLU / fatrelu(t > 0) (+ dReLU when gated), then an output threshold near the median |h|."""
    new = ir.evolve()
    for b in new.blocks:
        b.activation = "relu"
        if b.gate:
            b.up_activation = "relu"
    _, hs = _reference(new, ids, mask)
    for b, h in zip(new.blocks, hs):
        if b.gate:  # the threshold applies to the gate, which h does not show
            b.activation, b.activation_threshold = "fatrelu", 0.002
        elif b.layer % 2 == 0:  # h = relu(z): cut the smallest quarter of the positive z
            b.activation, b.activation_threshold = "fatrelu", _gap_threshold(h[h > 0], 0.15, 0.35)
    _, hs = _reference(new, ids, mask)
    for b, h in zip(new.blocks, hs):
        b.output_threshold = _gap_threshold(np.abs(h[h != 0]), 0.4, 0.6)
    new.graph = None
    return new


@pytest.mark.parametrize("kind", KINDS)
def test_parity_original(tiny_ir, kind):
    ir = tiny_ir(kind)
    ids, mask = _batch(ir.spec.vocab_size)
    model, _ = _check_parity(ir, ids, mask)
    assert isinstance(model, BertTorch if kind == "bert" else LlamaTorch)
    weights = [n for n in ir.store.names() if not n.startswith("pooler.")]  # BERT's pooler is unused
    assert sorted(model.param_names.values()) == weights


@pytest.mark.parametrize("kind", KINDS)
def test_parity_sparse_ffn(tiny_ir, kind):
    ir = tiny_ir(kind)
    ids, mask = _batch(ir.spec.vocab_size)
    sparse = _evolve_sparse(ir, ids, mask)
    _, hs = _check_parity(sparse, ids, mask)
    for b, h in zip(sparse.blocks, hs):
        zero = (h == 0).mean()
        assert 0.5 <= zero < 0.95  # the output threshold removed about half of the non-zeros
        assert np.all((h == 0) | (np.abs(h) > b.output_threshold))


def test_parity_minilm(minilm_ir):
    ir = minilm_ir
    ids, mask = _batch(ir.spec.vocab_size, lengths=(24, 11))
    ids[:, 0] = 101  # [CLS]
    model, _ = _check_parity(ir, ids, mask)
    emb = model.embed(torch.tensor(ids), torch.tensor(mask)).detach().numpy()
    ref = executor_for(ir).embed(ids, mask)
    assert np.abs(emb - ref).max() <= 1e-5
    sparse = _evolve_sparse(ir, ids, mask)
    assert [b.activation for b in sparse.blocks[:2]] == ["fatrelu", "relu"]
    _, hs = _check_parity(sparse, ids, mask)
    assert all(0.9 < (h == 0).mean() < 1.0 for h in hs)


@pytest.mark.parametrize("kind", ["bert", "qwen2", "llama"])
def test_to_ir_round_trip(tiny_ir, kind):
    ir = tiny_ir(kind)
    ids, mask = _batch(ir.spec.vocab_size)
    model = build_torch_model(ir)
    changed = model.layers[0].ffn.up.weight
    with torch.no_grad():
        changed.add_(0.01)
    new = to_ir(model, ir)
    assert new.graph is None and new is not ir
    assert new.store.names() == ir.store.names()  # tied embeddings stay one tensor
    assert set(new.store.overlay_names()) == set(model.param_names.values())
    for name in ir.store.names():
        a, b = new.store.get(name), ir.store.get_f32(name)
        assert a.dtype == np.float32
        if name == ir.blocks[0].up:
            assert np.array_equal(a, changed.detach().numpy()) and not np.array_equal(a, b)
        else:
            assert np.array_equal(a.view(np.uint32), np.ascontiguousarray(b).view(np.uint32)), name
    assert ir.store.overlay_names() == []  # the source IR is untouched
    again = build_torch_model(new)
    with torch.no_grad():
        x = model(torch.tensor(ids), torch.tensor(mask))
        y = again(torch.tensor(ids), torch.tensor(mask))
    assert torch.equal(x, y)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    # the numpy reference agrees with the module on the written-back IR
    ref, _ = _reference(new, ids, mask)
    assert np.abs(ref - x.numpy())[mask.astype(bool)].max() <= TOL
    only = to_ir(model, ir, changed_only=True)
    assert only.store.overlay_names() == [ir.blocks[0].up]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_gradients_reach_ffn(tiny_ir, kind):
    ir = tiny_ir(kind)
    ids, mask = _batch(ir.spec.vocab_size)
    model = build_torch_model(_evolve_sparse(ir, ids, mask))
    out, hs = model(torch.tensor(ids), torch.tensor(mask), return_ffn=True)
    assert len(hs) == ir.spec.num_layers
    assert hs[0].shape == (*ids.shape, ir.store.shape(ir.blocks[0].up)[0])
    loss = out.square().mean() + sum(h.abs().mean() for h in hs)
    loss.backward()
    ffn = [n for n, _ in model.named_parameters() if ".ffn." in n]
    assert len(ffn) == len(model.ffn_parameters()) >= 2 * ir.spec.num_layers
    for name, p in model.named_parameters():
        if ".ffn." in name:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_unknown_activation_is_rejected(tiny_ir):
    ir = tiny_ir("bert").evolve()
    ir.blocks[1].activation = "mystery"
    with pytest.raises(ValueError, match="mystery"):
        build_torch_model(ir)
