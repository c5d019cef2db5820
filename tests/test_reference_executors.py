"""Parity of the numpy reference executors with transformers (torch), onnxruntime and
themselves (KV cache), and of the FFN block / activations with direct computations."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sparseforge.toolchain.frontends.hf import load_hf_checkpoint
from sparseforge.toolchain.ir import FFNBlock
from sparseforge.toolchain.reference import (
    ACTIVATIONS, BertEncoder, KVCache, LlamaDecoder, executor_for, ffn_forward, register_activation,
)
from sparseforge.toolchain.reference.ffn import erf
from sparseforge.toolchain.tensors import TensorStore

TOL = 1e-4
DECODERS = ["llama", "mistral", "mistral-swa", "qwen2", "phi3", "granite", "gemma2", "gemma3", "qwen2-swa"]
KINDS = ["bert", *DECODERS]


def _batch(vocab: int, lengths=(12, 7), seed: int = 0, pad_id: int = 0):
    """Two sequences of different lengths, right-padded: ids [2, T] int64, mask [2, T] int64."""
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = np.full((len(lengths), T), pad_id, np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(3, vocab, n)
        mask[b, :n] = 1
    return ids, mask


def _max_err(a, b, mask=None) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if mask is not None:
        d = d[np.asarray(mask).astype(bool)]
    return float(d.max())


def _torch_out(model, kind, ids, mask):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return (out.last_hidden_state if kind == "bert" else out.logits).numpy()


def _ours(ex, kind, ids, mask, **kw):
    return ex.hidden_states(ids, mask, **kw) if kind == "bert" else ex.forward(ids, attention_mask=mask, **kw)


# -- activations and the FFN block ---------------------------------------------------------------
def test_erf_matches_math_erf():
    x = np.concatenate([np.linspace(-8, 8, 200001), [0.0, -0.0, 0.84375, 1.25, 1 / 0.35, 6.0, 30.0, -30.0]])
    ref = np.array([math.erf(v) for v in x])
    assert np.max(np.abs(erf(x) - ref)) <= 1e-15
    assert np.isnan(erf(np.array([np.nan])))[0]
    assert np.array_equal(erf(np.array([np.inf, -np.inf])), [1.0, -1.0])


@pytest.mark.parametrize("name, approximate", [("gelu", "none"), ("gelu_tanh", "tanh"), ("silu", None), ("relu", None)])
def test_activation_matches_torch(name, approximate):
    import torch
    import torch.nn.functional as F

    z = np.concatenate([np.linspace(-20, 20, 400001, dtype=np.float32),
                        np.float32([0.0, -0.0, 1e-30, -1e-30, 87.0, -87.0, 200.0, -200.0])])
    t = torch.from_numpy(z)
    ref = {"gelu": lambda: F.gelu(t, approximate=approximate), "gelu_tanh": lambda: F.gelu(t, approximate=approximate),
           "silu": lambda: F.silu(t), "relu": lambda: F.relu(t)}[name]().numpy()
    got = ACTIVATIONS[name](z, FFNBlock(layer=0, up="u", down="d", activation=name))
    assert got.dtype == np.float32 and got.shape == z.shape
    # torch's float32 kernels are a few ulps off (its GELU loses ~1e-6 absolute to the
    # cancellation in 1 + erf(x) near x = -3.5); ours are correctly rounded float64 results
    assert np.allclose(got, ref, rtol=5e-7, atol=2e-6), _max_err(got, ref)
    if name == "gelu":
        zz = z[::8].astype(np.float64)
        exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in zz])
        assert np.all(np.abs(got[::8] - exact) <= np.spacing(np.abs(exact).astype(np.float32)) + 1e-30)


def _synthetic_store(d=24, n=40, seed=1):
    rng = np.random.default_rng(seed)
    store = TensorStore()
    w = {
        "g": rng.standard_normal((n, d)).astype(np.float32) * 0.3, "gb": rng.standard_normal(n).astype(np.float32) * 0.1,
        "u": rng.standard_normal((n, d)).astype(np.float32) * 0.3, "ub": rng.standard_normal(n).astype(np.float32) * 0.1,
        "d": rng.standard_normal((d, n)).astype(np.float32) * 0.3, "db": rng.standard_normal(d).astype(np.float32) * 0.1,
    }
    for k, v in w.items():
        store.set(k, v)
    return store, w


def _direct_act(name, z):
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(z, np.float32))
    return {"gelu": lambda: F.gelu(t), "gelu_tanh": lambda: F.gelu(t, approximate="tanh"),
            "silu": lambda: F.silu(t), "relu": lambda: F.relu(t)}[name]().numpy()


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "relu"])
def test_ffn_forward_matches_direct_numpy(name, gated):
    store, w = _synthetic_store()
    block = FFNBlock(layer=3, up="u", down="d", gate="g" if gated else None, up_bias="ub", down_bias="db",
                     gate_bias="gb" if gated else None, activation=name)
    x = np.random.default_rng(2).standard_normal((9, 24)).astype(np.float32)
    if gated:
        h = _direct_act(name, x @ w["g"].T + w["gb"]) * (x @ w["u"].T + w["ub"])
    else:
        h = _direct_act(name, x @ w["u"].T + w["ub"])
    y_ref = h @ w["d"].T + w["db"]
    calls = []
    y = ffn_forward(store, block, x, capture=lambda layer, xi, hi: calls.append((layer, xi.copy(), hi.copy())))
    assert y.dtype == np.float32 and y.shape == (9, 24)
    assert _max_err(y, y_ref) <= 1e-5
    assert len(calls) == 1
    layer, xi, hi = calls[0]
    assert layer == 3 and np.array_equal(xi, x)
    assert hi.shape == (9, 40) and _max_err(hi, h) <= 1e-5
    # the captured activation is exactly what feeds the down projection
    assert np.array_equal(hi @ w["d"].T + w["db"], y)
    # extra leading dims are flattened into tokens and restored
    y3 = ffn_forward(store, block, x.reshape(3, 3, 24))
    assert y3.shape == (3, 3, 24) and np.array_equal(y3.reshape(9, 24), y)


def test_ffn_forward_without_biases_on_real_blocks(tiny_model):
    for kind in ("bert", "llama"):
        ir = load_hf_checkpoint(tiny_model(kind)[0])
        block = ir.blocks[1]
        s = ir.store
        x = np.random.default_rng(3).standard_normal((5, ir.spec.hidden_size)).astype(np.float32)
        z = x @ s.get_f32(block.up).T + (s.get_f32(block.up_bias) if block.up_bias else 0)
        h = _direct_act(block.activation, x @ s.get_f32(block.gate).T) * z if block.gate else _direct_act(block.activation, z)
        y_ref = h @ s.get_f32(block.down).T + (s.get_f32(block.down_bias) if block.down_bias else 0)
        assert _max_err(ffn_forward(s, block, x), y_ref) <= 1e-5


def test_register_activation_is_one_entry():
    store, w = _synthetic_store()

    def fatrelu(z, block):
        t = np.float32(block.annotations["threshold"])
        return np.where(z > t, z, np.float32(0)).astype(np.float32)

    register_activation("test_fatrelu", fatrelu)
    try:
        block = FFNBlock(layer=0, up="u", down="d", gate="g", activation="test_fatrelu", annotations={"threshold": 0.2})
        x = np.random.default_rng(4).standard_normal((6, 24)).astype(np.float32)
        got = []
        ffn_forward(store, block, x, capture=lambda layer, xi, hi: got.append(hi.copy()))
        g = x @ w["g"].T
        assert np.array_equal(got[0], np.where(g > 0.2, g, 0) * (x @ w["u"].T))
    finally:
        ACTIVATIONS.pop("test_fatrelu")
    with pytest.raises(ValueError, match="unknown FFN activation"):
        ffn_forward(store, FFNBlock(layer=0, up="u", down="d", activation="nope"), np.zeros((1, 24), np.float32))


# -- parity with transformers ---------------------------------------------------------------------
def test_executor_for(tiny_model):
    assert isinstance(executor_for(load_hf_checkpoint(tiny_model("bert")[0])), BertEncoder)
    assert isinstance(executor_for(load_hf_checkpoint(tiny_model("qwen2")[0])), LlamaDecoder)
    ir = load_hf_checkpoint(tiny_model("bert")[0])
    ir.spec.family = "gpt9"
    with pytest.raises(ValueError, match="no reference executor"):
        executor_for(ir)


@pytest.mark.parametrize("kind", KINDS)
def test_parity_with_transformers(kind, tiny_model):
    path, model = tiny_model(kind)
    ir = load_hf_checkpoint(path)
    ex = executor_for(ir)
    ids, mask = _batch(ir.spec.vocab_size)
    ref = _torch_out(model, kind, ids, mask)
    got = _ours(ex, kind, ids, mask)
    assert got.dtype == np.float32 and got.shape == ref.shape
    err = _max_err(got, ref, mask)
    print(f"{kind} vs transformers: max abs err {err:.3g} (|ref| max {np.abs(ref).max():.3g})")
    assert err <= TOL
    # a batch of one unpadded sequence gives the same values as its row in the padded batch
    solo = _ours(ex, kind, ids[1:, :7], None)
    assert _max_err(solo[0], got[1, :7]) <= 1e-5
    if kind == "qwen2":
        assert ex.lm_head == "model.embed_tokens.weight"  # tied, no lm_head.weight in the store


def test_bert_embed_matches_torch_pooling(tiny_model):
    import torch
    import torch.nn.functional as F

    path, model = tiny_model("bert")
    ex = BertEncoder(load_hf_checkpoint(path))
    ids, mask = _batch(120, lengths=(9, 4, 13))
    with torch.no_grad():
        h = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        m = torch.tensor(mask).unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    got = ex.embed(ids, mask, normalize=False)
    assert _max_err(got, pooled.numpy()) <= TOL
    got_n = ex.embed(ids, mask)
    assert _max_err(got_n, F.normalize(pooled, p=2, dim=1).numpy()) <= TOL
    assert np.allclose(np.linalg.norm(got_n, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_capture_matches_transformers_intermediates(kind, tiny_model):
    """capture() sees, per layer, the FFN input and activation of the non-padding tokens,
    equal to what transformers computes there."""
    import torch

    path, model = tiny_model(kind)
    ex = executor_for(load_hf_checkpoint(path))
    ids, mask = _batch(ex.spec.vocab_size)
    hf_in: dict[int, np.ndarray] = {}
    hf_act: dict[int, np.ndarray] = {}
    hooks = []
    for i in range(ex.spec.num_layers):
        if kind == "bert":
            layer = model.encoder.layer[i]
            hooks.append(layer.intermediate.register_forward_pre_hook(
                lambda mod, args, i=i: hf_in.__setitem__(i, args[0].numpy().copy())))
            hooks.append(layer.output.dense.register_forward_pre_hook(
                lambda mod, args, i=i: hf_act.__setitem__(i, args[0].numpy().copy())))
        else:
            mlp = model.model.layers[i].mlp
            hooks.append(mlp.register_forward_pre_hook(lambda mod, args, i=i: hf_in.__setitem__(i, args[0].numpy().copy())))
            hooks.append(mlp.down_proj.register_forward_pre_hook(
                lambda mod, args, i=i: hf_act.__setitem__(i, args[0].numpy().copy())))
    try:
        _torch_out(model, kind, ids, mask)
    finally:
        for h in hooks:
            h.remove()
    seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    _ours(ex, kind, ids, mask, capture=lambda layer, x, h: seen.__setitem__(layer, (x.copy(), h.copy())))
    valid = mask.reshape(-1).astype(bool)
    assert sorted(seen) == list(range(ex.spec.num_layers))
    for i, (x, h) in seen.items():
        assert x.shape == (valid.sum(), ex.spec.hidden_size) and h.shape == (valid.sum(), ex.spec.intermediate_size)
        assert _max_err(x, hf_in[i].reshape(-1, x.shape[1])[valid]) <= TOL
        assert _max_err(h, hf_act[i].reshape(-1, h.shape[1])[valid]) <= TOL


def _minilm_batch(minilm_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    texts = ["The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
             "Sparse activations speed up inference."]
    enc = [tok.encode(t) for t in texts]
    T = max(len(e.ids) for e in enc)
    ids = np.zeros((len(enc), T), np.int64)
    mask = np.zeros((len(enc), T), np.int64)
    for b, e in enumerate(enc):
        ids[b, : len(e.ids)] = e.ids
        mask[b, : len(e.ids)] = 1
    assert mask.sum(1)[0] != mask.sum(1)[1]
    return ids, mask


def test_minilm_parity_with_transformers(minilm_dir):
    import torch
    import torch.nn.functional as F
    import transformers

    model = transformers.BertModel.from_pretrained(minilm_dir).eval()
    ex = executor_for(load_hf_checkpoint(minilm_dir))
    ids, mask = _minilm_batch(minilm_dir)
    with torch.no_grad():
        h = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        m = torch.tensor(mask).unsqueeze(-1).float()
        emb = F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), p=2, dim=1).numpy()
    got = ex.hidden_states(ids, mask)
    err_h = _max_err(got, h.numpy(), mask)
    err_e = _max_err(ex.embed(ids, mask), emb)
    print(f"minilm vs transformers: hidden max abs err {err_h:.3g}, embedding {err_e:.3g}")
    assert err_h <= TOL and err_e <= TOL


def test_minilm_embedding_matches_sentence_transformers(minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_dir), device="cpu")
    texts = ["The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
             "Sparse activations speed up inference."]
    ref = model.encode(texts, convert_to_numpy=True, batch_size=2)
    ids, mask = _minilm_batch(minilm_dir)
    got = BertEncoder(load_hf_checkpoint(minilm_dir)).embed(ids, mask)
    err = _max_err(got, ref)
    print(f"minilm vs sentence-transformers: embedding max abs err {err:.3g}")
    assert err <= TOL


# -- parity with onnxruntime -------------------------------------------------------------------
def _ort(path, ids, mask):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["output"], {"input_ids": ids, "attention_mask": mask})[0]


@pytest.mark.parametrize("kind", KINDS)
def test_parity_with_onnxruntime(kind, tiny_model, tiny_onnx):
    ir = load_hf_checkpoint(tiny_model(kind)[0])
    ids, mask = _batch(ir.spec.vocab_size, seed=5)
    ref = _ort(tiny_onnx(kind), ids, mask)
    got = _ours(executor_for(ir), kind, ids, mask)
    err = _max_err(got, ref, mask)
    print(f"{kind} vs onnxruntime: max abs err {err:.3g}")
    assert err <= TOL


def test_minilm_parity_with_onnxruntime(minilm_dir, minilm_onnx):
    ids, mask = _minilm_batch(minilm_dir)
    ref = _ort(minilm_onnx, ids, mask)
    got = BertEncoder(load_hf_checkpoint(minilm_dir)).hidden_states(ids, mask)
    err = _max_err(got, ref, mask)
    print(f"minilm vs onnxruntime: max abs err {err:.3g}")
    assert err <= TOL


# -- KV cache and generation ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("max_length", [None, 40])
def test_kv_cache_matches_full_forward(kind, max_length, tiny_model):
    ex = LlamaDecoder(load_hf_checkpoint(tiny_model(kind)[0]))
    ids, _ = _batch(ex.spec.vocab_size, lengths=(30, 30), seed=7)
    full = ex.forward(ids)
    cache = ex.new_cache(batch=2, max_length=max_length)
    k = 5
    parts = [ex.forward(ids[:, :k], cache)]
    t = k
    for step in [1, 1, 1, 4, 1, 2] + [1] * 15:  # token by token, with a few chunks
        parts.append(ex.forward(ids[:, t: t + step], cache))
        t += step
        assert cache.length == t
    assert t == 30
    inc = np.concatenate(parts, axis=1)
    err = _max_err(inc, full)
    print(f"{kind} kv-cache (max_length={max_length}) vs full: max abs err {err:.3g}")
    assert err <= TOL
    kv = (2, ex.spec.num_kv_heads, 30, ex.spec.head_dim)
    assert cache.keys(0).shape == kv and cache.values(ex.spec.num_layers - 1).shape == kv


def test_kv_cache_with_padded_prefill(tiny_model):
    """Right-padded prefill in a cache: later tokens never attend to the padding keys."""
    ex = LlamaDecoder(load_hf_checkpoint(tiny_model("llama")[0]))
    ids, mask = _batch(ex.spec.vocab_size, lengths=(8, 5), seed=9)
    cache = ex.new_cache(batch=2)
    ex.forward(ids, cache, attention_mask=mask)
    nxt = np.array([[17], [23]])
    step = ex.forward(nxt, cache)[:, 0]
    assert cache.mask.shape == (2, 9) and cache.mask.sum() == 8 + 5 + 2
    # the same in one full forward: the new token sits at position 8 and the mask hides 5..7
    full_ids = np.concatenate([ids, nxt], axis=1)
    full_mask = np.concatenate([mask, [[1], [1]]], axis=1)
    ref = ex.forward(full_ids, attention_mask=full_mask)[:, -1]
    assert _max_err(step, ref) <= TOL
    # the unpadded first sequence is unaffected by the second's padding
    assert _max_err(step[0], ex.forward(full_ids[:1])[0, -1]) <= TOL
    # and the padding keys really are ignored: changing the padding tokens changes nothing
    ids2 = ids.copy()
    ids2[1, 5:] = 99
    cache2 = ex.new_cache(batch=2)
    ex.forward(ids2, cache2, attention_mask=mask)
    assert _max_err(ex.forward(nxt, cache2)[:, 0], step) <= 1e-6


def test_kv_cache_full_raises():
    cache = KVCache(num_layers=1, batch=1, kv_heads=1, head_dim=4, max_length=3)
    cache.append(0, np.zeros((1, 1, 3, 4), np.float32), np.zeros((1, 1, 3, 4), np.float32))
    with pytest.raises(ValueError, match="full"):
        cache.append(0, np.zeros((1, 1, 1, 4), np.float32), np.zeros((1, 1, 1, 4), np.float32))


def test_greedy_generate_matches_transformers(tiny_model):
    import torch

    path, model = tiny_model("llama")
    ex = LlamaDecoder(load_hf_checkpoint(path))
    prompt = np.random.default_rng(11).integers(3, ex.spec.vocab_size, 6)
    n = 24
    with torch.no_grad():
        ref = model.generate(torch.tensor(prompt[None]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                             do_sample=False, max_new_tokens=n, pad_token_id=0)[0].numpy()
    got = ex.generate(prompt, n, greedy=True)
    print(f"llama greedy generate: {len(got) - 6} new tokens, equal to transformers: {np.array_equal(got, ref)}")
    assert np.array_equal(got, ref), (got, ref)
    assert np.array_equal(got[:6], prompt)
    sampled = ex.generate(prompt, 5, greedy=False, rng=np.random.default_rng(0), stop_at_eos=False)
    assert sampled.shape == (11,) and np.all((sampled >= 0) & (sampled < ex.spec.vocab_size))
