"""The artifact runtime: decoders (KV cache, prefill vs decode, modes, greedy / top-p
generation) and encoders (embeddings, tokenization) against the numpy reference
executors on the converted IR, which holds exactly the artifact's (dequantized) weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
from _runtime_artifacts import bert_out, llama_gate_first_out, llama_out  # noqa: F401 (fixtures)
from _runtime_artifacts import packed_f32, stepwise_logits

from sparseforge.toolchain.ir import ModelIR
from sparseforge.toolchain.reference import executor_for
from sparseforge.toolchain.runtime import (DecoderRuntime, EncoderRuntime, LoadedModel, Sampler, load_runtime,
                                           runtime_for, top_p_probs)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_decoder_matches_reference_and_cache(llama_out):
    ir = ModelIR.load(llama_out / "ir")
    ids = np.random.default_rng(1).integers(0, 100, 12)
    want = executor_for(ir).forward(ids[None])[0]
    model = LoadedModel.open(llama_out / "model.gguf", linear="dequantize")
    assert model.predictor_modes == ["predictor", "predictor"] or "predictor" in model.predictor_modes
    for mode in ("dense", "gate-first"):  # exact modes: only the kernels' Q8_0 input rounding differs
        rt = runtime_for(model, mode)
        assert isinstance(rt, DecoderRuntime)
        assert _rel(rt.forward(ids, all_logits=True), want) < 1e-2
        cache = rt.new_cache()
        steps = [rt.forward(ids[:7], cache, all_logits=True)] + [rt.forward([t], cache)[None] for t in ids[7:]]
        assert cache.length == ids.size
        assert _rel(np.concatenate(steps), want) < 1e-2
    gf = runtime_for(model, "gate-first")
    gf.forward(ids[:1])
    assert all(m == "gate-first" for m in gf.ffn.modes) and max(gf.ffn.density()) < 1.0
    gf.ffn.reset_stats()
    gf.forward(ids)  # a prompt: the sparse kernel on the gates' masks, not every neuron
    assert max(gf.ffn.density()) < 1.0
    # the quantized-matvec path (attention / LM head through the int8-dot kernels)
    q = load_runtime(llama_out / "model.gguf", mode="dense", linear="quantized")
    assert q.model.linear("lm_head.weight").quantized
    assert _rel(q.forward(ids, all_logits=True), want) < 3e-2


def test_decoder_predictor_mode(llama_out):
    rt = load_runtime(llama_out / "model.gguf", mode="predictor")
    assert "predictor" in rt.ffn.modes
    ids = np.random.default_rng(2).integers(0, 100, 10)
    dense = load_runtime(llama_out / "model.gguf", mode="dense").forward(ids, all_logits=True)
    got = rt.forward(ids, all_logits=True)
    assert got.shape == dense.shape and np.isfinite(got).all()
    cache = rt.new_cache()
    rt.forward(ids[:5], cache)
    rt.ffn.reset_stats()
    for t in ids[5:]:
        rt.forward([t], cache)
    dens = [d for d, m in zip(rt.ffn.density(), rt.ffn.modes) if m == "predictor"]
    assert dens and all(0 < d < 1 for d in dens)


def test_gate_first_layers_store_their_gates_apart(llama_gate_first_out):
    """A gate-first layer's gate is a Q4_0 matrix of its own (gguf-py reads it and it
    decodes to the IR's gate), its bundles hold up and down only, and the runtime reads
    the gates from it: decoding agrees with the reference executor, in both exact modes."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from sparseforge.kernels import quant
    from sparseforge.toolchain.runtime_ort import artifact_ir

    out = llama_gate_first_out
    ir = ModelIR.load(out / "ir")
    r = GGUFReader(out / "model.gguf")
    tensors = {t.name: t for t in r.tensors}
    d, n = ir.spec.hidden_size, ir.spec.intermediate_size
    for b in ir.blocks:
        t = tensors[f"blk.{b.layer}.ffn_gate"]
        assert t.tensor_type.name == "Q4_0"
        gate = dequantize(t.data, t.tensor_type).reshape(n, d)
        assert np.array_equal(gate, ir.store.get_f32(b.gate))
    model = LoadedModel.open(out / "model.gguf")
    dense_ir = artifact_ir(model)  # onnxruntime's baseline graph takes the gates from their matrices
    for b, lay in zip(ir.blocks, model.artifact.layouts):
        assert np.array_equal(dense_ir.store.get_f32(b.gate), ir.store.get_f32(b.gate))
        two_parts = -(-2 * quant.row_bytes("q4_0", d) // lay.align) * lay.align
        assert lay.parts == ("up", "down") and tuple(tensors[f"blk.{b.layer}.ffn_bundle"].data.shape) == (n, two_parts)
    assert model.predictor_modes == ["gate-first"] * ir.spec.num_layers
    kern = model.kernels[0]
    assert kern.gate_apart and kern.gate_matvec is not None
    x = np.random.default_rng(0).standard_normal(d).astype(np.float32)
    want_g = quant.roundtrip(x, "q8_0") @ ir.store.get_f32(ir.blocks[0].gate).T
    assert np.allclose(kern.gates(x), want_g, rtol=1e-4, atol=1e-4 * np.abs(want_g).max())
    ids = np.random.default_rng(1).integers(0, 100, 12)
    want = executor_for(ir).forward(ids[None])[0]
    for mode in ("dense", "gate-first"):
        rt = runtime_for(model, mode)
        cache = rt.new_cache()
        steps = [rt.forward(ids[:7], cache, all_logits=True)] + [rt.forward([t], cache)[None] for t in ids[7:]]
        assert _rel(np.concatenate(steps), want) < 1e-2, mode
    assert max(rt.ffn.density()) < 1.0


def test_gate_apart_artifact_without_its_gate_is_rejected(llama_gate_first_out, tmp_path):
    """Written without a gate-apart layer's gate matrix, or with it in another format: an
    InputError naming the tensor (exit 2 in the CLI)."""
    from sparseforge.kernels import quant
    from sparseforge.toolchain import artifact_format as F
    from sparseforge.toolchain.artifact_build import build_metadata, layouts_for, tensor_stream
    from sparseforge.toolchain.artifact_reader import Artifact
    from sparseforge.toolchain.artifact_writer import TensorEntry, write_artifact
    from sparseforge.toolchain.errors import InputError

    ir = ModelIR.load(llama_gate_first_out / "ir")
    layouts = layouts_for(ir, 64)
    meta = build_metadata(ir, layouts, {}, target="t", seed=0, pack_options={}, tokenizer=False)

    def q8_gate(t):
        x = quant.decode(t.data, "q4_0")
        return TensorEntry(t.name, int(F.GGML_TYPES["q8_0"]), t.shape, quant.encode(x, "q8_0"))

    for name, edit, problem in (("nogate", lambda t: None, "tensor blk.0.ffn_gate is missing"),
                                ("q8gate", q8_gate, "tensor blk.0.ffn_gate is not q4_0")):
        stream = (edit(t) if t.name == F.gate_name(0) else t for t in tensor_stream(ir, layouts, {}))
        write_artifact(tmp_path / f"{name}.gguf", meta, (t for t in stream if t is not None))
        with pytest.raises(InputError, match=problem):
            Artifact.open(tmp_path / f"{name}.gguf")


def test_generation_greedy_and_top_p(llama_out):
    ir = ModelIR.load(llama_out / "ir")
    rt = load_runtime(llama_out / "model.gguf", mode="dense", linear="dequantize")
    prompt = np.array([5, 17, 33, 2, 9])
    out = rt.generate(prompt, 6, stop_at_eos=False)
    assert out[:5].tolist() == prompt.tolist() and out.size == 11
    ref = executor_for(ir).generate(prompt, 6, stop_at_eos=False)
    assert (out[5:8] == ref[5:8]).all()  # the first steps agree with the reference
    a = rt.generate(prompt, 6, Sampler(greedy=False, top_p=0.9, seed=7), stop_at_eos=False)
    b = rt.generate(prompt, 6, Sampler(greedy=False, top_p=0.9, seed=7), stop_at_eos=False)
    assert a.tolist() == b.tolist()
    p = top_p_probs(np.log(np.array([0.5, 0.3, 0.15, 0.05])), top_p=0.75)
    assert np.allclose(p, [0.625, 0.375, 0, 0])
    with pytest.raises(ValueError):
        Sampler(greedy=False, top_p=0.0)


def test_encoder_matches_reference(bert_out):
    ir = ModelIR.load(bert_out / "ir")
    rt = load_runtime(bert_out / "model.gguf", mode="dense")
    assert isinstance(rt, EncoderRuntime)
    texts = ["The quick brown fox jumps over the lazy dog .", "The lazy dog ."]
    ids, mask = rt.tokenize(texts)
    assert ids[0, 0] == 2 and ids[1, int(mask[1].sum()) - 1] == 3  # [CLS] ... [SEP], right padding
    want = executor_for(ir).embed(ids, mask)
    got = rt.embed(texts)
    assert got.shape == (2, 64)
    assert float((want * got).sum(1).min()) > 0.9999
    sparse = load_runtime(bert_out / "model.gguf")
    emb = sparse.embed(texts)
    assert float((want * emb).sum(1).min()) > 0.9
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_split_sequences_balances_real_tokens():
    from sparseforge.toolchain.runtime_encoder import split_sequences

    rng = np.random.default_rng(4)
    for _ in range(200):
        tokens = rng.integers(1, 50, rng.integers(1, 12))
        parts = int(rng.integers(1, 6))
        ranges = split_sequences(tokens, parts)
        assert len(ranges) == min(parts, len(tokens))
        assert ranges[0][0] == 0 and ranges[-1][1] == len(tokens)
        assert all(lo < hi for lo, hi in ranges) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        shares = [int(tokens[lo:hi].sum()) for lo, hi in ranges]
        assert max(shares) <= tokens.sum() / len(ranges) + tokens.max()


def test_encoder_batch_split_across_threads(bert_out, monkeypatch):
    """A batch split into groups of sequences, one per thread (BLAS and Numba on one
    thread in each, the FFN counters merged), gives the hidden states of the whole batch
    and the reference's embeddings; padding included."""
    import threading

    import numba

    from sparseforge.toolchain import runtime_encoder

    ir = ModelIR.load(bert_out / "ir")
    rt = load_runtime(bert_out / "model.gguf", mode="dense")
    rng = np.random.default_rng(5)
    ids = rng.integers(5, 100, (5, 12))
    mask = np.ones_like(ids)
    mask[1, 7:] = mask[3, 4:] = 0
    real = mask.astype(bool)
    whole = rt.hidden_states(ids, mask)  # 47 real tokens: below SPLIT_MIN_TOKENS, one batch
    assert rt.ffn.tokens.tolist() == [real.sum()] * len(rt.ffn.tokens)
    rt.ffn.reset_stats()
    monkeypatch.setattr(runtime_encoder, "SPLIT_MIN_TOKENS", 10)
    monkeypatch.setattr(runtime_encoder, "blas_threads", lambda: 3)  # three cores, whatever this machine has
    seen = []
    inner = rt._hidden_states

    def spy(ids_, mask_, ffn):
        seen.append((threading.current_thread().name, len(ids_), numba.get_num_threads(), _blas_threads(), id(ffn)))
        return inner(ids_, mask_, ffn)

    monkeypatch.setattr(rt, "_hidden_states", spy)
    split = rt.hidden_states(ids, mask)
    assert sorted(n for _, n, *_ in seen) == [1, 2, 2]
    # the caller runs one group, the thread pool the other two (one pool thread may
    # take both when the first finishes before the second is picked up)
    names = [t for t, *_ in seen]
    assert names.count(threading.current_thread().name) == 1
    assert sum(t.startswith("sparseforge-part") for t in names) == 2
    assert all((nb, bl) == (1, 1) for *_, nb, bl, _ in seen)
    assert len({f for *_, f in seen}) == 3 and id(rt.ffn) not in {f for *_, f in seen}
    assert rt.ffn.tokens.tolist() == [real.sum()] * len(rt.ffn.tokens)
    np.testing.assert_allclose(split[real], whole[real], rtol=0, atol=1e-5 * np.abs(whole[real]).max())
    want = executor_for(ir).embed(ids, mask)
    assert float((want * rt.embed_ids(ids, mask)).sum(1).min()) > 0.9999


def _blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")


def test_thread_ownership(bert_out, llama_out, monkeypatch):
    """An encoder batch of more than MATVEC_MAX tokens (sgemm work) runs with Numba on
    one thread and BLAS as configured, a few tokens with BLAS on one thread; a decoder
    holds BLAS to one thread for its prompt and its steps alike; both restored afterwards."""
    import numba

    numba_before, blas_before = numba.get_num_threads(), _blas_threads()
    enc = load_runtime(bert_out / "model.gguf", mode="dense")
    dec = load_runtime(llama_out / "model.gguf", mode="sparse")
    seen = []
    for rt, name in ((enc, "_hidden_states"), (dec, "_forward")):
        inner = getattr(rt, name)

        def spy(*args, inner=inner):
            seen.append((numba.get_num_threads(), _blas_threads()))
            return inner(*args)

        monkeypatch.setattr(rt, name, spy)
    ids = np.full((2, 8), 5, np.int64)
    enc.hidden_states(ids)
    enc.hidden_states(ids[:1, :4])
    cache = dec.new_cache()
    dec.forward(ids[0, :6], cache)
    dec.forward(ids[0, :1], cache)
    assert seen == [(1, blas_before), (numba_before, 1), (numba_before, 1), (numba_before, 1)]
    assert (numba.get_num_threads(), _blas_threads()) == (numba_before, blas_before)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("blas", [1, 64])
def test_linear_matmul_quantized(fmt, blas, monkeypatch):
    """A quantized Linear times a few tokens and times many against numpy on the decoded
    matrix. With the Numba kernels owning the cores (``blas`` 1 BLAS thread), Q4_0 and Q8_0
    on the x86 vector paths run the tiles' multi-token kernel for any count, bit for bit
    the per-token matvec, and elsewhere the row kernel up to ROW_KERNEL_MAX tokens;
    otherwise the row kernel runs up to MATVEC_MAX tokens. Beyond, sgemm on tiles
    dequantized by the kernels (the last tile short)."""
    from sparseforge.kernels import quant, row_tiles
    from sparseforge.toolchain import runtime_load
    from sparseforge.toolchain.runtime_load import Linear

    monkeypatch.setattr(runtime_load, "blas_threads", lambda: blas)
    rng = np.random.default_rng(4)
    data = quant.encode(rng.standard_normal((37, 64)).astype(np.float32), fmt)
    lin = Linear(data, fmt, (37, 64), dequantize=False)
    monkeypatch.setattr(Linear, "TILE_ROWS", 8)
    monkeypatch.setattr(Linear, "ROW_KERNEL_MAX", 9)
    w = quant.decode(data, fmt).astype(np.float64)
    tiled = lin.tiled and blas == 1
    assert tiled == (row_tiles.SUPPORTED and blas == 1)  # both formats have tiles
    for T in (1, Linear.MATVEC_MAX, Linear.MATVEC_MAX + 3, Linear.ROW_KERNEL_MAX + 1):
        X = rng.standard_normal((T, 64)).astype(np.float32)
        got = lin.matmul(X)
        kernels = tiled or T <= (Linear.ROW_KERNEL_MAX if blas == 1 else Linear.MATVEC_MAX)
        want = quant.roundtrip(X, "q8_0") @ w.T if kernels else X @ w.T  # the kernels quantize x
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        matvecs = np.stack([lin.matvec(x) for x in X])
        if tiled:
            np.testing.assert_array_equal(got, matvecs)
        elif kernels:
            np.testing.assert_allclose(got, matvecs, rtol=0, atol=1e-6 * np.abs(matvecs).max())


@pytest.mark.parametrize("threads", [(2, 1), (1, 1), (1, 64)])
def test_linear_matmul_f32(threads, monkeypatch):
    """A float32 Linear times tokens against numpy in float64: the multi-token row kernel
    up to ROW_KERNEL_MAX tokens when Numba has more threads than BLAS (``threads`` =
    (Numba's, BLAS's)), up to F32_EQUAL_THREADS_MAX when as many, sgemm beyond it or when
    BLAS has more."""
    import types

    from sparseforge.kernels import ffn
    from sparseforge.toolchain import runtime_load
    from sparseforge.toolchain.runtime_load import Linear

    monkeypatch.setattr(runtime_load, "numba", types.SimpleNamespace(get_num_threads=lambda: threads[0]))
    monkeypatch.setattr(runtime_load, "blas_threads", lambda: threads[1])
    monkeypatch.setattr(Linear, "ROW_KERNEL_MAX", 9)
    monkeypatch.setattr(Linear, "F32_EQUAL_THREADS_MAX", 3)
    calls = []
    kernel = ffn.matmul_f32_par
    monkeypatch.setattr(ffn, "matmul_f32_par", lambda X, *a: calls.append(len(X)) or kernel(X, *a))
    rng = np.random.default_rng(5)
    w = rng.standard_normal((37, 64)).astype(np.float32)
    lin = Linear(w, "f32", (37, 64), dequantize=False)
    for T in (2, 3, 4, 9, 10):
        X = rng.standard_normal((T, 64)).astype(np.float32)
        want = X.astype(np.float64) @ w.astype(np.float64).T
        np.testing.assert_allclose(lin.matmul(X), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert calls == {(2, 1): [2, 3, 4, 9], (1, 1): [2, 3], (1, 64): []}[threads]


def test_run_command(llama_out, bert_out, tmp_path, capsys, monkeypatch):
    from sparseforge.toolchain import runtime_decoder
    from sparseforge.toolchain.cli import main

    def call(*args):
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        return exc.value.code, *capsys.readouterr()

    code, out, _ = call("run", str(bert_out / "model.gguf"), "--embed", "The lazy dog .", "--json")
    assert code == 0 and len(json.loads(out)["embeddings"][0]) == 64
    code, out, _ = call("run", str(bert_out), "--embed", "The dog", "--embed", "The fox")
    assert code == 0 and "cosine similarities" in out
    code, out, _ = call("run", str(llama_out / "model.gguf"), "--prompt", "The quick brown", "--max-new-tokens", "4",
                        "--top-p", "0.9", "--json")
    r = json.loads(out)
    assert code == 0 and len(r["ids"]) == 4 and isinstance(r["text"], str)
    code, out, _ = call("run", str(llama_out / "model.gguf"), "--prompt", "The quick brown", "--max-new-tokens", "3")
    assert code == 0 and out.endswith("\n")
    made = []  # the type of every cache the runtime makes

    class Cache(runtime_decoder.DecoderCache):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self.dtype)

    monkeypatch.setattr(runtime_decoder, "DecoderCache", Cache)
    code, out, _ = call("run", str(llama_out / "model.gguf"), "--prompt", "The quick brown", "--max-new-tokens", "4",
                        "--kv-cache", "f16", "--json")
    assert code == 0 and len(json.loads(out)["ids"]) == 4 and made == ["f16"]
    code, _, err = call("run", str(llama_out / "model.gguf"), "--embed", "hello")
    assert code == 2 and "decoder" in err
    code, _, err = call("run", str(bert_out / "model.gguf"), "--prompt", "hello")
    assert code == 2 and "encoder" in err
    code, _, err = call("run", str(bert_out / "model.gguf"), "--embed", "x", "--top-p", "0.9", "--max-new-tokens", "3")
    assert code == 2 and "an encoder artifact: --max-new-tokens, --top-p apply to decoders only" in err
    for cmd, args, says in (("bench", ["--batch", "2"], "a decoder artifact: --batch applies to encoders only"),
                            ("verify", ["--reference", str(llama_out), "--min-cosine", "0.9"],
                             "a decoder artifact: --min-cosine applies to encoders only"),
                            ("run", ["--embed", "x", "--kv-cache", "f16"],
                             "an encoder artifact: --kv-cache applies to decoders only"),
                            ("bench", ["--kv-cache", "f16"],
                             "an encoder artifact: --kv-cache applies to decoders only"),
                            ("verify", ["--reference", str(bert_out), "--kv-cache", "f16"],
                             "an encoder artifact: --kv-cache applies to decoders only")):
        model = bert_out if "--kv-cache" in args else llama_out
        code, _, err = call(cmd, str(model), *args)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    code, _, err = call("run", str(tmp_path / "nope.gguf"), "--embed", "x")
    assert code == 2 and err.startswith("error:") and "not found" in err


def test_decode_steps_with_attention_biases(tiny_model, tmp_path):
    """Qwen2 (q/k/v biases, tied embeddings) packed without sparsification: the decode
    steps (the step loop's weights looked up once, the three biases added end to end)
    against transformers' logits of the whole sequence."""
    import torch

    ckpt, hf = tiny_model("qwen2")
    artifact = packed_f32(ckpt, tmp_path)
    rt = load_runtime(artifact, mode="dense")
    assert rt.model.has("model.layers.0.self_attn.q_proj.bias") and not rt.model.has("lm_head.weight")
    ids = np.random.default_rng(3).integers(0, 110, 9)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert _rel(stepwise_logits(rt, ids, 3), want) < 1e-4
    # projections that cannot share a kernel call (told so through the group cache) run one by one
    apart = load_runtime(artifact, mode="dense")
    for i in range(2):
        apart.model._groups[tuple(f"model.layers.{i}.self_attn.{n}_proj.weight" for n in "qkv")] = None
    cache = apart.new_cache()
    apart.forward(ids[:3], cache)
    assert _rel(np.stack([apart.forward([t], cache) for t in ids[3:]]), want[3:]) < 1e-4


@pytest.mark.parametrize("kind", ["qwen3", "mistral-swa", "qwen2-swa", "phi3", "granite", "gemma2", "gemma3"])
def test_decode_steps_against_transformers(tiny_model, tmp_path, kind, monkeypatch):
    """Qwen3 (per-head query/key RMSNorms before RoPE, head_dim 32 with hidden size 64),
    Mistral with a sliding window of 5 positions, Qwen2 with it on its second layer, Phi-3 (fused q/k/v and gate/up
    matrices, a window of 6), Granite (scaled embeddings, residual branches, attention
    scores and logits), Gemma 2 (soft-capped attention scores and logits, a sliding and a
    full layer) and Gemma 3 (norms of 1 + weight around both sublayers, two sliding-window
    layers of window 4 with their own RoPE base, then a full one), packed without
    sparsification: a prefill longer than the window (whole, or 3 tokens at a time),
    then decode steps, against transformers' logits of the whole sequence."""
    import torch

    ckpt, hf = tiny_model(kind)
    rt = load_runtime(packed_f32(ckpt, tmp_path), mode="dense")
    if kind == "qwen3":
        assert rt.spec.qk_norm and rt.model.has("model.layers.1.self_attn.k_norm.weight")
    elif kind == "qwen2-swa":  # the window on the second layer only
        assert rt.spec.layer_types == ["full_attention", "sliding_attention"] and rt.spec.sliding_window == 5
    elif kind == "gemma2":
        assert rt.spec.layer_types == ["sliding_attention", "full_attention"] and rt.spec.local_rope_theta is None \
            and (rt.spec.attn_logit_softcapping, rt.spec.final_logit_softcapping) == (0.5, 0.4)
    elif kind == "gemma3":
        assert rt.spec.layer_types == ["sliding_attention", "sliding_attention", "full_attention"] \
            and rt.spec.sliding_window == 4 and rt.spec.sandwich_norms and rt.spec.local_rope_theta == 1e4
    elif kind == "granite":
        assert (rt.spec.embedding_multiplier, rt.spec.residual_multiplier, rt.spec.attention_multiplier,
                rt.spec.logits_scaling) == (12.0, 0.22, 0.1, 8.0)
    else:
        assert rt.spec.sliding_window == hf.config.sliding_window < 15
    ids = np.random.default_rng(4).integers(0, hf.config.vocab_size, 15)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert _rel(stepwise_logits(rt, ids, 7), want) < 1e-4
    # a second prompt chunk after the window has moved past the first positions
    cache = rt.new_cache()
    got = [rt.forward(ids[:7], cache, all_logits=True), rt.forward(ids[7:8], cache, all_logits=True),
           rt.forward(ids[8:], cache, all_logits=True)]
    assert _rel(np.concatenate(got), want) < 1e-4
    from sparseforge.toolchain import runtime_decoder

    monkeypatch.setattr(runtime_decoder, "PREFILL_CHUNK", 3)  # each prompt 3 tokens at a time
    assert _rel(rt.forward(ids, all_logits=True), want) < 1e-4 and _rel(stepwise_logits(rt, ids, 7), want) < 1e-4


def test_prompt_rows_split_across_threads(tiny_model, llama_out, tmp_path, monkeypatch):
    """A prompt chunk split into row ranges run in threads of their own (BLAS and Numba
    on one thread in each, the FFN counters merged): Gemma 3 (windows, sandwich norms,
    query/key norms) against transformers and the chunk run whole; the small Llama's
    predictor layers, whose FFNs run over all rows after the parts, against it whole."""
    import threading

    import numba
    import torch

    from sparseforge.toolchain import runtime_decoder

    DR = runtime_decoder.DecoderRuntime
    with monkeypatch.context() as m:  # one part per core, each at least SPLIT_MIN_TOKENS
        m.setattr(runtime_decoder, "SPLIT_MIN_TOKENS", 100)
        m.setattr(runtime_decoder.numba, "get_num_threads", lambda: 3)
        assert [DR._row_parts(None, T) for T in (99, 250, 300, 1000)] == [
            [(0, 99)], [(0, 125), (125, 250)], [(0, 100), (100, 200), (200, 300)], [(0, 333), (333, 666), (666, 1000)]]
    ckpt, hf = tiny_model("gemma3")
    rt = load_runtime(packed_f32(ckpt, tmp_path), mode="dense")
    ids = np.random.default_rng(6).integers(0, hf.config.vocab_size, 15)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    whole = rt.forward(ids, all_logits=True)
    seen, ffns = [], []
    attend, ffn_rows = DR._attend_rows, DR._ffn_rows

    def spy(self, i, x, *args):
        seen.append((i, threading.current_thread().name, x.shape[0], numba.get_num_threads(), _blas_threads()))
        return attend(self, i, x, *args)

    def spy_ffn(self, i, x, runner):
        ffns.append((i, threading.current_thread().name, x.shape[0]))
        return ffn_rows(self, i, x, runner)

    monkeypatch.setattr(DR, "_attend_rows", spy)
    monkeypatch.setattr(DR, "_ffn_rows", spy_ffn)
    monkeypatch.setattr(DR, "_row_parts", lambda self, T: [(0, 4), (4, 9), (9, T)])
    rt.ffn.reset_stats()
    split = rt.forward(ids, all_logits=True)
    assert _rel(split, want) < 1e-4
    np.testing.assert_allclose(split, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    assert sorted(n for i, _, n, *_ in seen if i == 0) == [4, 5, 6] and len(seen) == 3 * rt.spec.num_layers
    names = [t for i, t, *_ in seen if i == 0]
    assert names.count(threading.current_thread().name) == 1
    assert sum(t.startswith("sparseforge-part") for t in names) == 2
    assert all((nb, bl) == (1, 1) for *_, nb, bl in seen)
    assert sorted(n for i, _, n in ffns if i == 0) == [4, 5, 6]  # each part's FFN in its thread
    assert rt.ffn.tokens.tolist() == [15] * rt.spec.num_layers  # the parts' counters, merged
    assert rt.ffn.density() == [1.0] * rt.spec.num_layers  # dense: every neuron of every token
    # predictor layers: the parts' attention, then the FFN over all rows (its buffers are shared)
    pred = load_runtime(llama_out / "model.gguf", mode="predictor")
    assert "predictor" in pred.ffn.modes
    ids = np.random.default_rng(7).integers(0, 100, 15)
    seen.clear(), ffns.clear()
    split = pred.forward(ids, all_logits=True)
    assert ffns == [(i, threading.current_thread().name, 15) for i in range(pred.spec.num_layers)]
    monkeypatch.setattr(DR, "_row_parts", lambda self, T: [(0, T)])
    np.testing.assert_allclose(split, pred.forward(ids, all_logits=True), rtol=0, atol=1e-5 * np.abs(split).max())
    assert len(seen) == 4 * pred.spec.num_layers and pred.ffn.tokens.tolist() == [30] * pred.spec.num_layers


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_f16_kv_cache_against_transformers(tiny_model, tmp_path, kind, monkeypatch):
    """A float16 KV cache (Qwen3; Gemma 3's sliding layers, a ring of 4 here): prefill
    (whole, 3 tokens at a time, or with no cache), then decode steps, against
    transformers with a cache that rounds keys and values to float16 as it stores them,
    and further than that from transformers' float32 logits."""
    import torch
    from transformers import DynamicCache

    from sparseforge.toolchain import runtime_decoder

    class F16Cache(DynamicCache):
        def update(self, key_states, value_states, *args, **kwargs):
            return super().update(key_states.half().float(), value_states.half().float(), *args, **kwargs)

    ckpt, hf = tiny_model(kind)
    artifact = packed_f32(ckpt, tmp_path)
    rt = load_runtime(artifact, mode="dense", kv_cache="f16")
    ids = torch.from_numpy(np.random.default_rng(5).integers(0, hf.config.vocab_size, 15))[None]
    with torch.no_grad():
        want = hf(ids, cache=F16Cache(config=hf.config), use_cache=True).logits[0].numpy()
        want_f32 = hf(ids).logits[0].numpy()
    ids = ids[0].numpy()
    got = stepwise_logits(rt, ids, 7)
    # (a key both round to float16 from float32 values a bit apart can land one float16 step apart)
    assert _rel(got, want) < min(5e-5, 0.1 * _rel(got, want_f32))
    cache = rt.new_cache()
    assert cache.nbytes * 2 == load_runtime(artifact, mode="dense").new_cache().nbytes
    assert _rel(rt.forward(ids, all_logits=True), want) < 5e-5  # no cache: rounded alike
    monkeypatch.setattr(runtime_decoder, "PREFILL_CHUNK", 3)
    assert _rel(rt.forward(ids, all_logits=True), want) < 5e-5 and _rel(stepwise_logits(rt, ids, 7), want) < 5e-5
    with pytest.raises(ValueError, match="KV cache type 'q8_0'"):
        load_runtime(artifact, kv_cache="q8_0")


@pytest.mark.parametrize("kind", ["llama3", "qwen3", "mistral-swa", "phi3", "phi3-longrope", "phi4-mini",
                                  "qwen2-yarn", "llama-dynamic", "granite", "gemma2", "gemma3"])
def test_whole_recipe_on_newer_decoders(tiny_model, tmp_path, kind):
    """Llama 3-style scaled RoPE, Qwen3's per-head norms, Mistral's sliding window,
    Phi-3's fused matrices, LongRoPE, partial rotary embeddings, YaRN, dynamic NTK (24
    tokens, past its 16 positions), Granite's scalars
    and Gemma 3 through every pass (profile on onnxruntime, relufy's torch fine-tuning, predictors,
    Q8_0, reorder, pack): the runtime's dense and predictor modes against the numpy
    reference on the final IR."""
    from _runtime_artifacts import PROFILE, RECIPE

    from sparseforge.toolchain.pipeline import convert_model

    ckpt, _ = tiny_model(kind)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, vocab, size=(60, 16)))
    # the tiny Gemma 2's weights are ten times wider and its logits capped at 0.4: the Q8_0
    # kernels' int8 activations move them 8% of that, so its FFN stays float32
    ffn = "f32" if kind == "gemma2" else "q8_0"
    (tmp_path / "recipe.toml").write_text(RECIPE.format(verify="", profile=PROFILE.format(calib=tmp_path / "ids.npy"),
                                                        gate_first="never", ffn=ffn))
    convert_model(ckpt, tmp_path / "out", recipe=tmp_path / "recipe.toml")
    ir = ModelIR.load(tmp_path / "out" / "ir")
    assert all(b.activation == "relu" for b in ir.blocks)
    ids = np.random.default_rng(2).integers(0, vocab, 24)
    want = executor_for(ir).forward(ids[None])[0]
    model = LoadedModel.open(tmp_path / "out" / "model.gguf", linear="dequantize")
    assert (model.spec.rope_scaling is not None) == (kind in ("llama3", "phi3-longrope", "phi4-mini", "qwen2-yarn", "llama-dynamic")) \
        and model.spec.qk_norm == (kind in ("qwen3", "gemma3"))
    assert model.spec.sliding_window == {"mistral-swa": 5, "phi3": 6, "gemma2": 4, "gemma3": 4}.get(kind)
    dense = runtime_for(model, "dense")
    ref = executor_for(ir)
    cache, ref_cache = dense.new_cache(), ref.new_cache()
    steps = [dense.forward(ids[:10], cache, all_logits=True)] + [dense.forward([t], cache)[None] for t in ids[10:]]
    # against the reference in the same calls (LongRoPE's tables depend on them)
    want_steps = [ref.forward(ids[None, :10], ref_cache)[0]] + [ref.forward(ids[None, t:t + 1], ref_cache)[0]
                                                               for t in range(10, ids.size)]
    assert _rel(np.concatenate(steps), np.concatenate(want_steps)) < 1e-2
    predicted = runtime_for(model, "predictor").forward(ids, all_logits=True)
    assert np.mean(predicted.argmax(-1) == want.argmax(-1)) > 0.8


def test_decoder_decode_steps_match_full_forward(llama_out):
    rt = load_runtime(llama_out / "model.gguf", mode="dense", linear="dequantize")
    ids = np.random.default_rng(3).integers(0, 100, 20)
    want = rt.forward(ids, all_logits=True)
    cache = rt.new_cache()  # 16 positions, grown at the 17th (a decode step)
    got = [rt.forward(ids[:12], cache, all_logits=True)] + [rt.forward([t], cache)[None] for t in ids[12:]]
    assert cache.length == ids.size
    np.testing.assert_allclose(np.concatenate(got), want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_runtime_releases_only_the_mapped_bytes_it_copied(llama_out, monkeypatch):
    """The runtime lets go of the mapped pages of weights it keeps a copy of (a Q8_0
    predictor's rows, a quantized projection's 8-row tiles, a decoded linear), never of a
    float32 view it reads in place, and computes the same logits as without releasing."""
    from sparseforge.toolchain import artifact_format as F
    from sparseforge.toolchain.artifact_reader import Artifact

    ids = np.array([5, 17, 3, 9, 44, 2])
    released: list[str] = []
    real = Artifact.release
    for linear in ("quantized", "dequantize"):
        monkeypatch.setattr(Artifact, "release", lambda self, name: None)  # nothing released
        keep = load_runtime(llama_out / "model.gguf", mode="sparse", linear=linear)
        want = keep.forward(ids, keep.new_cache(), all_logits=True)
        released.clear()
        monkeypatch.setattr(Artifact, "release", lambda self, name: (released.append(name), real(self, name)))
        rt = load_runtime(llama_out / "model.gguf", mode="sparse", linear=linear)
        art = rt.model.artifact
        np.testing.assert_array_equal(rt.forward(ids, rt.new_cache(), all_logits=True), want)
        predictors = {F.predictor_name(layer, k) for layer, mode in enumerate(rt.model.predictor_modes)
                      if mode == "predictor" for k in ("w1", "w2")}
        assert predictors and predictors <= set(released)  # d = 64: Q8_0 predictors
        copies = set(released) - predictors
        assert all(art.format_of(name) in ("q8_0", "q4_0", "f16") for name in copies), copies
        assert len(released) == len(set(released))  # each once
        if linear == "dequantize" or row_tiles_supported():
            assert {art.format_of(n) for n in copies} & {"q8_0", "q4_0"}  # the projections' bytes went


def row_tiles_supported() -> bool:
    from sparseforge.kernels import row_tiles

    return row_tiles.SUPPORTED
