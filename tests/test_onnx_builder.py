"""ONNX graphs built from the IR: parity with transformers and the numpy FFN, named FFN
values, activations that follow the IR, external weight data, determinism, bf16/f16."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from sparseforge.toolchain.frontends.hf import load_hf_checkpoint
from sparseforge.toolchain.onnx_builder import SIDECAR, build_onnx
from sparseforge.toolchain.reference import BertEncoder, LlamaDecoder, apply_activation
from sparseforge.toolchain.safetensors_io import write_safetensors
from sparseforge.toolchain.tensors import TensorRef

TOL = 1e-4
ACT_TOL = 1e-5
DECODERS = ["llama", "llama3", "mistral", "mistral-swa", "qwen2", "qwen3", "phi3", "phi3-longrope", "phi4-mini", "granite", "gemma2", "gemma3"]


def _batch(vocab: int, lengths=(12, 7), seed: int = 0):
    """Two right-padded sequences: ids, mask [2, T] int64."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(3, vocab, n)
        mask[b, :n] = 1
    return ids, mask


def _run(built, ids, mask) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(built.path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input_ids": ids, "attention_mask": mask})))


def _err(a, b, mask) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d[mask.astype(bool)].max())


def _torch_run(model, kind, ids, mask):
    """(output, per-layer FFN inputs) of a transformers model, via pre-hooks on the MLPs."""
    import torch

    layers = model.encoder.layer if kind == "bert" else model.model.layers
    captured: dict[int, np.ndarray] = {}
    hooks = [
        (layer.intermediate if kind == "bert" else layer.mlp).register_forward_pre_hook(
            lambda mod, args, i=i: captured.__setitem__(i, args[0].detach().numpy().copy()))
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    finally:
        for h in hooks:
            h.remove()
    return (out.last_hidden_state if kind == "bert" else out.logits).numpy(), captured


def _numpy_act(ir, block, x: np.ndarray) -> np.ndarray:
    """The FFN activation of ``block`` from its input ``x [B, S, d]``, in numpy (matmuls in
    float64: a float32 numpy matmul is itself ~1e-5 off at MiniLM's sizes)."""
    s = ir.store
    x = np.asarray(x, np.float64)

    def lin(w, b):
        y = x @ s.get_f32(w).T.astype(np.float64)
        return y + s.get_f32(b) if b else y

    up = lin(block.up, block.up_bias)
    if block.gate:
        return apply_activation(block, lin(block.gate, block.gate_bias)) * up
    return apply_activation(block, up)


def _check_ffn_values(ir, built, outs, mask) -> None:
    """Every ``ffn.i.act`` against numpy from ``ffn.i.input``, within ``ACT_TOL`` of
    ``max(1, |act|)`` (float32 rounding: MiniLM's activations reach ~20, where a few ulp
    of its 384-term sums are ~1e-5)."""
    for block, x, a in zip(ir.blocks, built.ffn_inputs, built.ffn_activations):
        ref = _numpy_act(ir, block, outs[x])
        err = np.abs(outs[a] - ref) / np.maximum(1.0, np.abs(ref))
        assert err[mask.astype(bool)].max() <= ACT_TOL, (block.layer, err.max())


@pytest.fixture(scope="module")
def models(tiny_model, minilm_dir):
    """``models(kind)`` -> (IR, transformers model, kind family) for the tiny models and MiniLM."""
    import transformers

    cache = {}

    def get(kind: str):
        if kind not in cache:
            if kind == "minilm":
                cache[kind] = (load_hf_checkpoint(minilm_dir), transformers.BertModel.from_pretrained(minilm_dir).eval(),
                               "bert")
            else:
                d, model = tiny_model(kind)
                cache[kind] = (load_hf_checkpoint(d), model, kind)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["bert", "minilm", *DECODERS])
def test_matches_transformers_and_numpy_ffn(models, kind, tmp_path):
    ir, model, family = models(kind)
    built = build_onnx(ir, tmp_path)
    ids, mask = _batch(ir.spec.vocab_size)
    outs = _run(built, ids, mask)
    ref, ffn_in = _torch_run(model, family, ids, mask)

    assert _err(outs[built.output], ref, mask) <= TOL
    for i, name in enumerate(built.ffn_inputs):
        assert outs[name].shape == (2, 12, ir.spec.hidden_size)
        assert _err(outs[name], ffn_in[i], mask) <= TOL, i
    for name in built.ffn_activations:
        assert outs[name].shape == (2, 12, ir.spec.intermediate_size) and outs[name].dtype == np.float32
    _check_ffn_values(ir, built, outs, mask)

    numpy_ref = (BertEncoder(ir).hidden_states(ids, mask) if family == "bert"
                 else LlamaDecoder(ir).forward(ids, attention_mask=mask))
    assert _err(outs[built.output], numpy_ref, mask) <= TOL


def test_built_ir_names_values_and_caller_ir_is_unchanged(models, tmp_path):
    ir, _, _ = models("llama")
    built = build_onnx(ir, tmp_path)
    assert built.path == tmp_path.resolve() / "model.onnx"
    assert built.inputs == ["input_ids", "attention_mask"] and built.output == "logits"
    assert built.ffn_inputs == ["ffn.0.input", "ffn.1.input"]
    assert built.ffn_activations == ["ffn.0.act", "ffn.1.act"]
    assert [(b.input_value, b.activation_value) for b in built.ir.blocks] == list(
        zip(built.ffn_inputs, built.ffn_activations))
    assert built.ir.graph == str(built.path)
    assert all(b.input_value is None and b.activation_value is None for b in ir.blocks) and ir.graph is None

    quiet = build_onnx(ir, tmp_path / "quiet", ffn_outputs=False)
    proto = onnx.load(str(quiet.path), load_external_data=False)
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert {"ffn.0.input", "ffn.1.act"} <= {o for n in proto.graph.node for o in n.output}


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_activation_follows_the_ir(models, kind, tmp_path):
    ir, _, _ = models(kind)
    relu = ir.evolve()
    for block in relu.blocks:
        block.activation = "relu"
    built = build_onnx(relu, tmp_path)
    ids, mask = _batch(ir.spec.vocab_size, seed=1)
    outs = _run(built, ids, mask)
    for block, x, a in zip(relu.blocks, built.ffn_inputs, built.ffn_activations):
        x64 = outs[x].astype(np.float64)

        def lin(w, b):
            return x64 @ ir.store.get_f32(w).T + (ir.store.get_f32(b) if b else 0)

        up = lin(block.up, block.up_bias)
        expect = np.maximum(lin(block.gate, block.gate_bias), 0) * up if block.gate else np.maximum(up, 0)
        assert _err(outs[a], expect, mask) <= ACT_TOL
        assert block.gate or (outs[a] >= 0).all()

    relu.blocks[0].activation = "no-such-activation"
    with pytest.raises(ValueError, match="no-such-activation"):
        build_onnx(relu, tmp_path / "bad")


def _external(proto: onnx.ModelProto) -> dict[str, dict[str, str]]:
    return {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


def test_safetensors_weights_are_external_data_in_a_hard_link(models, tmp_path):
    ir, _, _ = models("qwen2")
    built = build_onnx(ir, tmp_path)
    proto = onnx.load(str(built.path), load_external_data=False)
    ext = _external(proto)
    assert set(ext) == set(ir.store.names())  # tied lm_head: no separate tensor
    shard = Path(ir.store.ref("model.embed_tokens.weight").file)
    assert not (tmp_path / SIDECAR).exists()
    assert os.path.samefile(tmp_path / shard.name, shard)
    raw = (tmp_path / shard.name).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for name, info in ext.items():
        assert info["location"] == shard.name
        arr = ir.store.get(name)
        off, length = int(info["offset"]), int(info["length"])
        assert off == 8 + n + header[ir.store.ref(name).key]["data_offsets"][0] and length == arr.nbytes
        assert np.array_equal(np.frombuffer(raw[off:off + length], np.float32).reshape(arr.shape), arr)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in proto.graph.initializer if t.name not in ext)


def test_copied_weights_pass_the_onnx_checker(models, tmp_path):
    ir, _, _ = models("mistral")
    linked = build_onnx(ir, tmp_path / "linked")
    copied = build_onnx(ir, tmp_path / "copied", link_weights=False)
    assert linked.path.read_bytes() == copied.path.read_bytes()
    shard = Path(ir.store.ref("model.embed_tokens.weight").file)
    assert (tmp_path / "copied" / shard.name).stat().st_nlink == 1
    onnx.checker.check_model(str(copied.path), full_check=True)
    # onnx rejects external data with several hard links ("hardlink attack"); onnxruntime does not
    with pytest.raises(onnx.checker.ValidationError, match="hard link"):
        onnx.checker.check_model(str(linked.path))
    ids, mask = _batch(ir.spec.vocab_size)
    assert np.array_equal(_run(linked, ids, mask)["logits"], _run(copied, ids, mask)["logits"])


def test_overlay_and_transposed_tensors_go_to_the_sidecar_deterministically(models, tmp_path):
    ir, _, _ = models("bert")
    ir = ir.evolve()
    block = ir.blocks[1]
    ir.store.set(block.up, np.asarray(ir.store.get(block.up)) * np.float32(1.5))
    down = np.ascontiguousarray(ir.store.get(block.down).T)  # [n_ff, d], stored transposed
    write_safetensors(tmp_path / "t.safetensors", {"w": down})
    ir.store.set_ref(block.down, TensorRef(str(tmp_path / "t.safetensors"), "w", transpose=True))

    first = build_onnx(ir, tmp_path / "a")
    second = build_onnx(ir, tmp_path / "b")
    build_onnx(ir, tmp_path / "a")  # rebuilding in place keeps the same bytes
    for name in ("model.onnx", SIDECAR):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    ext = _external(onnx.load(str(first.path), load_external_data=False))
    sidecar = sorted(n for n, e in ext.items() if e["location"] == SIDECAR)
    assert sidecar == sorted([block.up, block.down])
    assert [int(ext[n]["offset"]) % 64 for n in sidecar] == [0, 0]

    ids, mask = _batch(ir.spec.vocab_size, seed=2)
    outs = _run(second, ids, mask)
    _check_ffn_values(ir, second, outs, mask)
    assert _err(outs["last_hidden_state"], BertEncoder(ir).hidden_states(ids, mask), mask) <= TOL


def _save_lowp(model, directory: Path, dtype):
    """``model`` saved in ``dtype`` as several small shards, and the float32 transformers
    model carrying the same (rounded) weights."""
    import torch
    import transformers

    copy.deepcopy(model).to(dtype).save_pretrained(directory / "lowp", max_shard_size="40KB")
    f32 = getattr(transformers, model.config.architectures[0]).from_pretrained(
        directory / "lowp", dtype=torch.float32).eval()
    return directory / "lowp", f32


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_bf16_sharded_checkpoint(tiny_model, kind, tmp_path):
    import torch

    ckpt, f32 = _save_lowp(tiny_model(kind)[1], tmp_path, torch.bfloat16)
    ir = load_hf_checkpoint(ckpt)
    assert len({ir.store.ref(n).file for n in ir.store.names()}) > 1
    built = build_onnx(ir, tmp_path / "onnx")
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["model.onnx", SIDECAR]
    ext = _external(onnx.load(str(built.path), load_external_data=False))
    assert set(ext) == {n for n in ir.store.names() if not n.startswith("pooler.")}  # the pooler is unused
    assert {e["location"] for e in ext.values()} == {SIDECAR}

    ids, mask = _batch(ir.spec.vocab_size)
    outs = _run(built, ids, mask)
    ref, _ = _torch_run(f32, kind, ids, mask)
    assert _err(outs[built.output], ref, mask) <= TOL  # same bf16 weights, float32 compute
    _check_ffn_values(ir, built, outs, mask)


def test_f16_checkpoint_is_external_data_with_casts(tiny_model, tmp_path):
    import torch

    ckpt, f32 = _save_lowp(tiny_model("qwen2")[1], tmp_path, torch.float16)
    ir = load_hf_checkpoint(ckpt)
    built = build_onnx(ir, tmp_path / "onnx")
    proto = onnx.load(str(built.path), load_external_data=False)
    ext = _external(proto)
    assert set(ext) == set(ir.store.names()) and SIDECAR not in {e["location"] for e in ext.values()}
    assert not (tmp_path / "onnx" / SIDECAR).exists()
    f16 = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert sorted(f16) == ir.store.names()
    assert sum(n.op_type == "Cast" and n.input[0] in f16 for n in proto.graph.node) == len(f16)

    ids, mask = _batch(ir.spec.vocab_size)
    outs = _run(built, ids, mask)
    ref, _ = _torch_run(f32, "qwen2", ids, mask)
    assert _err(outs["logits"], ref, mask) <= TOL
    _check_ffn_values(ir, built, outs, mask)
