"""The ONNX frontend: structural weight mapping agrees with the Hugging Face frontend."""
from __future__ import annotations

import copy

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import copy_export
from onnx import TensorProto, helper, numpy_helper

from sparseforge.toolchain.errors import InputError
from sparseforge.toolchain.frontends import load_model
from sparseforge.toolchain.frontends.hf import load_hf_checkpoint
from sparseforge.toolchain.frontends.onnx import load_onnx
from sparseforge.toolchain.frontends.onnx_graph import Graph, find_ffns, find_linears
from sparseforge.toolchain.frontends.onnx_initializers import OnnxInitializers

KINDS = ["bert", "llama", "mistral", "mistral-swa", "qwen2", "qwen3", "phi3"]
EXACT_FIELDS = ["family", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "vocab_size", "activation", "gated", "norm", "causal", "attention_bias", "mlp_bias",
                "tie_word_embeddings", "qk_norm", "sliding_window"]
BERT_FIELDS = ["architecture", "max_positions", "type_vocab_size", "pad_token_id"]


def _pair(request, kind: str):
    """(HF IR, ONNX IR, onnx path) for a tiny model kind or "minilm"."""
    if kind == "minilm":
        path = request.getfixturevalue("minilm_onnx")
        return load_hf_checkpoint(request.getfixturevalue("minilm_dir")), load_onnx(path), path
    directory, _ = request.getfixturevalue("tiny_model")(kind)
    path = request.getfixturevalue("tiny_onnx")(kind)
    if kind in ("mistral-swa", "phi3"):  # a window needs config.json: the graph does not say which layers use it
        path = copy_export(path, request.getfixturevalue("tmp_path") / "export")
        shutil.copy(directory / "config.json", path.parent / "config.json")
    return load_hf_checkpoint(directory), load_onnx(path), path


def _assert_same_model(hf, ir, graph_has_pooler: bool = False) -> None:
    a, b = hf.spec, ir.spec
    for f in EXACT_FIELDS + (BERT_FIELDS if a.family == "bert" else []):
        assert getattr(a, f) == getattr(b, f), f
    assert b.norm_eps == pytest.approx(a.norm_eps, rel=1e-9)
    if a.rope_theta is None:
        assert b.rope_theta is None
    else:
        assert b.rope_theta == pytest.approx(a.rope_theta, rel=1e-3)
    expected = set(hf.store.names())
    if a.family == "bert" and not graph_has_pooler:  # a last_hidden_state export has no pooler
        expected -= {"pooler.dense.weight", "pooler.dense.bias"}
    assert set(ir.store.names()) == expected
    for name in expected:
        assert np.array_equal(hf.store.get(name), ir.store.get(name)), name
    assert [blk.weight_names() for blk in ir.blocks] == [blk.weight_names() for blk in hf.blocks]


@pytest.mark.parametrize("kind", KINDS + ["minilm"])
def test_onnx_matches_hf(request, kind):
    hf, ir, path = _pair(request, kind)
    _assert_same_model(hf, ir)
    assert ir.spec.architecture == {"mistral": "LlamaForCausalLM"}.get(
        kind, hf.spec.architecture)  # same graph as Llama's (the windowed one is read with its config.json)
    assert ir.graph == str(path.absolute())
    assert ir.source["format"] == "onnx" and ir.source["path"] == str(path.absolute())
    assert len(ir.source["sha256"]) == 64
    refs = [ir.store.ref(n) for n in ir.store.names()]
    assert all(r.format == "onnx" and r.file == str(path.absolute()) for r in refs)
    assert any(r.transpose for r in refs)  # MatMul weights are stored [in, out]
    if kind == "phi3":  # q/k/v and gate/up: rows of one fused [in, out] matrix each
        fused = {name: ir.store.ref(f"model.layers.0.{name}.weight") for name in
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
        n, q, kv = hf.spec.intermediate_size, hf.spec.num_heads * hf.spec.head_dim, \
            hf.spec.num_kv_heads * hf.spec.head_dim
        assert [r.rows for r in fused.values()] == [(0, q), (q, q + kv), (q + kv, q + 2 * kv), (0, n), (n, 2 * n)]
        assert all(r.transpose for r in fused.values()) and len({r.key for r in fused.values()}) == 2
    assert load_model(path).store.names() == ir.store.names()


def _run_with_outputs(path: Path, names: list[str], vocab: int) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    model = onnx.load(str(path))
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, vocab, (2, 8)), "attention_mask": np.ones((2, 8), dtype=np.int64)}
    return dict(zip(names, sess.run(names, feeds)))


def _down_output(model: onnx.ModelProto, activation_value: str) -> str:
    """The value the down projection produces from ``activation_value`` (after its bias Add)."""
    nodes = model.graph.node
    matmul = next(n for n in nodes if n.op_type in ("MatMul", "Gemm") and n.input[0] == activation_value)
    users = [n for n in nodes if matmul.output[0] in n.input]
    inits = {t.name for t in model.graph.initializer}
    if len(users) == 1 and users[0].op_type == "Add" and set(users[0].input) & inits:
        return users[0].output[0]
    return matmul.output[0]


@pytest.mark.parametrize("kind", KINDS + ["minilm"])
def test_block_values_are_ffn_input_and_activation(request, kind):
    _, ir, path = _pair(request, kind)
    model = onnx.load(str(path), load_external_data=False)
    values = {v for n in model.graph.node for v in n.output}
    downs = []
    for blk in ir.blocks:
        assert blk.input_value in values and blk.activation_value in values
        downs.append(_down_output(model, blk.activation_value))
    names = [v for blk in ir.blocks for v in (blk.input_value, blk.activation_value)] + downs
    out = _run_with_outputs(path, list(dict.fromkeys(names)), ir.spec.vocab_size)
    d, n = ir.spec.hidden_size, ir.spec.intermediate_size
    for blk, down in zip(ir.blocks, downs):
        x, act = out[blk.input_value], out[blk.activation_value]
        assert x.shape[-1] == d and act.shape[-1] == n
        y = act @ ir.store.get_f32(blk.down).T
        if blk.down_bias:
            y = y + ir.store.get_f32(blk.down_bias)
        np.testing.assert_allclose(y, out[down], rtol=1e-5, atol=1e-5)


# -- other exporters -----------------------------------------------------------------
def _export(model, path: Path, outputs, **kwargs) -> Path:
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **(
                {} if outputs[0] == "last_hidden_state" else {"use_cache": False}))
            return tuple(getattr(out, o) for o in outputs)

    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(), (ids, torch.ones_like(ids)), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=list(outputs), **kwargs)
    return path


@pytest.fixture(scope="module")
def legacy_onnx(tiny_model, tmp_path_factory):
    """TorchScript exports (opset 14): Constant nodes, decomposed LayerNorm/RMSNorm, erf GELU,
    Add(bias, x), and for BERT the pooler (Gather -> Gemm -> Tanh)."""
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            outputs = ("last_hidden_state", "pooler_output") if kind == "bert" else ("logits",)
            axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}}
            model = copy.deepcopy(tiny_model(kind)[1])  # the TorchScript exporter alters the module it traces
            cache[kind] = _export(model, tmp_path_factory.mktemp(f"legacy-{kind}") / "model.onnx",
                                  outputs, dynamo=False, opset_version=14, dynamic_axes=axes)
        return cache[kind]

    return make


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_legacy_torchscript_export(tiny_model, legacy_onnx, kind):
    path = legacy_onnx(kind)
    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert "Constant" in ops and "LayerNormalization" not in ops
    hf, ir = load_hf_checkpoint(tiny_model(kind)[0]), load_onnx(path)
    _assert_same_model(hf, ir, graph_has_pooler=True)
    if kind == "bert":
        assert "Erf" in ops and "Gemm" in ops


def test_opset23_static_export(tiny_model, tmp_path):
    """Attention and RMSNormalization ops, RoPE as constant cos/sin caches, constant causal mask."""
    directory, model = tiny_model("llama")
    path = _export(model, tmp_path / "model.onnx", ("logits",), dynamo=True, opset_version=23, optimize=True)
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert {"Attention", "RMSNormalization"} <= ops and "Cos" not in ops
    _assert_same_model(load_hf_checkpoint(directory), load_onnx(path))


# -- config.json / tokenizer beside the model ----------------------------------------
def test_config_beside_gives_hf_spec(tiny_model, tiny_onnx, tmp_path):
    directory, _ = tiny_model("llama")
    path = copy_export(tiny_onnx("llama"), tmp_path / "m")
    shutil.copy(directory / "config.json", tmp_path / "m" / "config.json")
    ir = load_onnx(path)
    assert ir.spec == load_hf_checkpoint(directory).spec
    assert "config_sha256" in ir.source


def test_config_beside_minilm_and_tokenizer(minilm_dir, minilm_onnx, tmp_path):
    path = copy_export(minilm_onnx, tmp_path / "m")
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(minilm_dir / name, tmp_path / "m" / name)
    ir = load_onnx(path)
    assert ir.spec == load_hf_checkpoint(minilm_dir).spec
    assert ir.tokenizer == str(tmp_path / "m" / "tokenizer.json")


def test_symlinked_snapshot(tiny_model, tiny_onnx, tmp_path):
    """Hugging Face hub snapshots are symlinks into a blob store with other file names."""
    src, blobs, snap = tiny_onnx("qwen2"), tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    for i, f in enumerate([src, src.with_name(src.name + ".data"), tiny_model("qwen2")[0] / "config.json"]):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(blobs / f"blob{i}")
    ir = load_onnx(snap / "model.onnx")
    assert ir.graph == str(snap / "model.onnx") and "config_sha256" in ir.source
    assert ir.spec == load_hf_checkpoint(tiny_model("qwen2")[0]).spec


def test_head_norms_with_one_key_head(tiny_model, tiny_onnx):
    """Qwen3 with a single key/value head: the key's norm is as long as the k projection."""
    hf = load_hf_checkpoint(tiny_model("qwen3-mqa")[0])
    ir = load_onnx(tiny_onnx("qwen3-mqa"))
    assert ir.spec.qk_norm and ir.spec.num_kv_heads == 1
    _assert_same_model(hf, ir)


def test_config_disagreeing_with_graph(tiny_model, tiny_onnx, tmp_path):
    directory, _ = tiny_model("mistral")
    path = copy_export(tiny_onnx("mistral"), tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["num_attention_heads"], config["head_dim"] = 2, 32  # same q size, other split
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="num_heads = 2 but the graph has 4") as exc:
        load_onnx(path)
    assert "config.json" in str(exc.value)


# -- external data -------------------------------------------------------------------
def test_external_data_memmaps(tiny_onnx, tmp_path):
    src = tiny_onnx("llama")
    model = onnx.load(str(src))
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    a, b = load_onnx(src), load_onnx(path)
    assert a.store.names() == b.store.names()
    for name in b.store.names():
        arr = b.store.get(name)
        assert isinstance(arr, np.memmap) and not arr.flags.writeable
        assert np.array_equal(arr, a.store.get(name)), name
    data = tmp_path / "ext.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(InputError, match="truncated external data") as exc:
        OnnxInitializers(path)
    assert str(data) in str(exc.value)
    data.unlink()
    with pytest.raises(InputError, match="not found") as exc:
        OnnxInitializers(path)
    assert str(data) in str(exc.value) and str(path) in str(exc.value)
    model = onnx.load(str(path), load_external_data=False)
    model.graph.initializer[0].external_data[0].value = "../ext.data"
    onnx.save(model, str(path))
    with pytest.raises(InputError, match="not a file inside the model's directory"):
        OnnxInitializers(path)


def test_initializers_include_constant_nodes(legacy_onnx):
    tensors = OnnxInitializers(legacy_onnx("llama"))
    model = tensors.model
    constant = next(n.output[0] for n in model.graph.node if n.op_type == "Constant")
    init = model.graph.initializer[0].name
    assert constant in tensors.keys() and init in tensors.keys()
    for key in (constant, init):
        arr = tensors.get(key)
        assert arr.shape == tensors.shape(key) and arr.dtype == tensors.dtype(key) and not arr.flags.writeable


# -- hand-built optimum-style FFN ----------------------------------------------------
def _gelu_erf(x: str, nodes: list, consts: dict, variant: str) -> str:
    if variant == "div":
        consts["sqrt2"] = np.array(np.sqrt(2), dtype=np.float32)
        nodes.append(helper.make_node("Div", [x, "sqrt2"], ["u"]))
    else:
        consts["rsqrt2"] = np.array(np.sqrt(0.5), dtype=np.float32)
        nodes.append(helper.make_node("Mul", [x, "rsqrt2"], ["u"]))
    consts["one"], consts["half"] = np.array(1, np.float32), np.array(0.5, np.float32)
    nodes += [helper.make_node("Erf", ["u"], ["e"]), helper.make_node("Add", ["one", "e"], ["e1"])]
    if variant == "div":  # (x * (1 + erf)) * 0.5, as TorchScript writes it
        nodes += [helper.make_node("Mul", [x, "e1"], ["xe"]), helper.make_node("Mul", ["xe", "half"], ["act"])]
    else:  # (0.5 * x) * (1 + erf)
        nodes += [helper.make_node("Mul", ["half", x], ["hx"]), helper.make_node("Mul", ["hx", "e1"], ["act"])]
    return "act"


def _gelu_tanh(x: str, nodes: list, consts: dict) -> str:
    consts.update(three=np.array(3, np.float32), c=np.array(0.044715, np.float32),
                  k=np.array(np.sqrt(2 / np.pi), np.float32), one=np.array(1, np.float32),
                  half=np.array(0.5, np.float32))
    nodes += [helper.make_node("Pow", [x, "three"], ["x3"]), helper.make_node("Mul", ["c", "x3"], ["cx3"]),
              helper.make_node("Add", [x, "cx3"], ["inner"]), helper.make_node("Mul", ["inner", "k"], ["scaled"]),
              helper.make_node("Tanh", ["scaled"], ["t"]), helper.make_node("Add", ["t", "one"], ["t1"]),
              helper.make_node("Mul", [x, "half"], ["hx"]), helper.make_node("Mul", ["hx", "t1"], ["act"])]
    return "act"


@pytest.mark.parametrize("variant", ["erf-div", "erf-mul", "tanh", "relu", "gelu-op", "fastgelu"])
def test_hand_built_optimum_ffn(tmp_path, variant):
    """Gemm(transB=1)+bias -> GELU spelled out -> MatMul through a Transpose node + Add(bias)."""
    rng = np.random.default_rng(1)
    d, n = 8, 24
    w1, b1 = rng.standard_normal((n, d), np.float32), rng.standard_normal(n, np.float32)
    w2, b2 = rng.standard_normal((d, n), np.float32), rng.standard_normal(d, np.float32)
    consts = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1)]
    if variant.startswith("erf"):
        act, kind = _gelu_erf("h", nodes, consts, variant[4:]), "gelu"
    elif variant == "tanh":
        act, kind = _gelu_tanh("h", nodes, consts), "gelu_tanh"
    elif variant == "relu":
        nodes.append(helper.make_node("Relu", ["h"], ["act"]))
        act, kind = "act", "relu"
    elif variant == "gelu-op":
        nodes.append(helper.make_node("Gelu", ["h"], ["act"], approximate="tanh"))
        act, kind = "act", "gelu_tanh"
    else:  # onnxruntime's fused op
        nodes.append(helper.make_node("FastGelu", ["h"], ["act"], domain="com.microsoft"))
        act, kind = "act", "gelu_tanh"
    nodes += [helper.make_node("Transpose", ["w2"], ["w2t"], perm=[1, 0]),
              helper.make_node("MatMul", [act, "w2t"], ["y0"]), helper.make_node("Add", ["y0", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", d])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    path = tmp_path / "ffn.onnx"
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    g = Graph(path, OnnxInitializers(path))
    (ffn,) = find_ffns(g, find_linears(g))
    assert ffn.activation == kind and ffn.gate is None
    assert (ffn.input, ffn.activation_value, ffn.down.out) == ("x", act, "y")
    assert ffn.up.weight.key == "w1" and not ffn.up.weight.transpose and ffn.up.bias.key == "b1"
    assert ffn.down.weight.key == "w2" and not ffn.down.weight.transpose and ffn.down.bias.key == "b2"
    assert ffn.up.shape == (n, d) and ffn.down.shape == (d, n)
    with pytest.raises(InputError, match="found 1 feed-forward blocks and 0 attention blocks"):
        load_onnx(path)


# -- bad input -----------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "nope.onnx"
    with pytest.raises(InputError, match="not found") as exc:
        load_onnx(path)
    assert str(path) in str(exc.value)


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="not a valid ONNX model") as exc:
        load_model(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
def test_truncated_file(tiny_onnx, tmp_path, fraction):
    src = tiny_onnx("bert")
    path = copy_export(src, tmp_path / "m")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(InputError) as exc:
        load_onnx(path)
    assert str(path) in str(exc.value)


def test_graph_with_undefined_values(tiny_onnx, tmp_path):
    """A protobuf that parses but lost nodes (e.g. cut at a field boundary)."""
    path = copy_export(tiny_onnx("llama"), tmp_path / "m")
    model = onnx.load(str(path), load_external_data=False)
    del model.graph.node[: len(model.graph.node) // 2]
    onnx.save(model, str(path))
    with pytest.raises(InputError, match="corrupt or truncated ONNX graph") as exc:
        load_onnx(path)
    assert str(path) in str(exc.value)


def test_graph_without_ffn(tmp_path):
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "add",
                              [helper.make_tensor_value_info(v, TensorProto.FLOAT, [2]) for v in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    path = tmp_path / "add.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(InputError, match="no feed-forward block") as exc:
        load_onnx(path)
    assert str(path) in str(exc.value)


# -- sliding windows -------------------------------------------------------------------
def _mask_graph(form: str, window: int, tmp_path: Path) -> Path:
    """A graph computing a sliding-window mask ``keep [S, S]`` over ``positions = Range(S)``
    in one of the forms exporters write: ``j > i - W``, ``j >= i - (W - 1)``, ``i - W < j``,
    ``i - j < W``, ``i - j <= W - 1``; or ``none``, causal only."""
    i64 = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [], [v])  # noqa: E731
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Squeeze", ["shape"], ["s"]),
             helper.make_node("Range", ["zero", "s", "one"], ["pos"]),
             helper.make_node("Unsqueeze", ["pos", "ax1"], ["i"]),  # [S, 1]: queries
             helper.make_node("Unsqueeze", ["pos", "ax0"], ["j"])]  # [1, S]: keys
    inits = [i64("zero", 0), i64("one", 1), helper.make_tensor("ax0", TensorProto.INT64, [1], [0]),
             helper.make_tensor("ax1", TensorProto.INT64, [1], [1])]
    if form == "none":  # causal only
        op, args = "Identity", ["causal"]
    elif form in ("gt", "ge", "lt"):
        shift = window if form != "ge" else window - 1
        inits.append(i64("w", shift))
        nodes.append(helper.make_node("Sub", ["i", "w"], ["oldest"]))
        op, args = {"gt": ("Greater", ["j", "oldest"]), "ge": ("GreaterOrEqual", ["j", "oldest"]),
                    "lt": ("Less", ["oldest", "j"])}[form]
    else:
        inits.append(i64("w", window if form == "diff_lt" else window - 1))
        nodes.append(helper.make_node("Sub", ["i", "j"], ["back"]))
        op, args = ("Less" if form == "diff_lt" else "LessOrEqual"), ["back", "w"]
    nodes += [helper.make_node("LessOrEqual", ["j", "i"], ["causal"]), helper.make_node(op, args, ["win"]),
              helper.make_node("And", ["win", "causal"], ["keep"])]
    graph = helper.make_graph(nodes, "mask", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("keep", TensorProto.BOOL, None)], inits)
    path = tmp_path / f"{form}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize("form", ["gt", "ge", "lt", "diff_lt", "diff_le"])
def test_sliding_window_forms(form, tmp_path):
    """The window the detector reads equals the number of keys the last query keeps when
    onnxruntime evaluates the mask; a causal mask without a window reads None."""
    import onnxruntime as ort

    from sparseforge.toolchain.frontends.onnx_graph import sliding_window

    path = _mask_graph(form, 6, tmp_path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    keep = sess.run(None, {"x": np.zeros(16, np.float32)})[0]
    assert keep.shape == (16, 16) and (keep == np.tril(np.ones((16, 16), bool))).sum() < 256  # windowed
    assert sliding_window(Graph(path, OnnxInitializers(path))) == int(keep[-1].sum()) == 6
    causal_only = _mask_graph("none", 6, tmp_path)
    keep = ort.InferenceSession(str(causal_only), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.zeros(16, np.float32)})[0]
    assert int(keep[-1].sum()) == 16 and sliding_window(Graph(causal_only, OnnxInitializers(causal_only))) is None


def test_sliding_window_config_must_agree(tiny_model, tiny_onnx, tmp_path):
    """A Mistral export with a 5-position window: config.json's window must be the graph's;
    one that spans every position is the same as none."""
    directory, _ = tiny_model("mistral-swa")
    path = copy_export(tiny_onnx("mistral-swa"), tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert load_onnx(path).spec == load_hf_checkpoint(directory).spec
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"sliding_window": 7}))
    with pytest.raises(InputError, match="sliding_window = 7 but the graph has 5"):
        load_onnx(path)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 5}))
    assert load_onnx(path).spec.sliding_window is None


@pytest.mark.parametrize("kind", ["granite", "gemma2", "gemma3"])
def test_granite_or_gemma_config_beside_an_export_is_refused(tiny_model, tiny_onnx, tmp_path, kind):
    """Granite's multipliers and Gemma's norms are not read from graphs: an export with
    such a config.json is an InputError naming it (their exports alone already fail to
    map the scaled embeddings)."""
    path = copy_export(tiny_onnx("llama"), tmp_path / "m")
    shutil.copy(tiny_model(kind)[0] / "config.json", tmp_path / "m" / "config.json")
    arch = json.loads((tmp_path / "m" / "config.json").read_text())["architectures"][0]
    with pytest.raises(InputError, match=f"config.json: {arch} \\(scaled embeddings\\) is read from checkpoints"):
        load_onnx(path)
    path = copy_export(tiny_onnx(kind), tmp_path / "export")
    with pytest.raises(InputError, match="cannot map model.embed_tokens"):
        load_onnx(path)


@pytest.mark.parametrize("kind", ["mistral-swa", "qwen2-swa"])
def test_windowed_export_needs_its_config(tiny_model, tiny_onnx, tmp_path, kind):
    """A graph with a sliding window shows it in one mask, not which layers use it (Qwen2
    with max_window_layers: only the second): without config.json it is an InputError,
    with it the spec names the layers, as transformers' config does."""
    directory, hf = tiny_model(kind)
    path = copy_export(tiny_onnx(kind), tmp_path / "m")
    with pytest.raises(InputError, match="the graph attends a sliding window of 5 positions; put the model's "
                                         "config.json"):
        load_onnx(path)
    shutil.copy(directory / "config.json", tmp_path / "m" / "config.json")
    spec = load_onnx(path).spec
    assert spec == load_hf_checkpoint(directory).spec and spec.sliding_window == 5
    assert [spec.window(i) for i in range(spec.num_layers)] == [
        5 if k == "sliding_attention" else None for k in getattr(hf.config, "layer_types", None) or ["sliding_attention"] * 2]


def test_fused_phi3_export_converts_and_runs(tiny_model, tiny_onnx, tmp_path):
    """A Phi-3 export (q/k/v and gate/up each one MatMul, cut by Slice / Split) through
    profile (onnxruntime on the export's own graph) and pack: the runtime, as a prompt
    and decode steps, against transformers' logits."""
    import torch
    from _runtime_artifacts import PROFILE, stepwise_logits

    from sparseforge.toolchain.pipeline import convert_model
    from sparseforge.toolchain.runtime import load_runtime

    directory, hf = tiny_model("phi3")
    path = copy_export(tiny_onnx("phi3"), tmp_path / "m")
    shutil.copy(directory / "config.json", path.parent / "config.json")
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    assert "Split" in ops and "Slice" in ops
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, hf.config.vocab_size, size=(40, 16)))
    (tmp_path / "recipe.toml").write_text(PROFILE.format(calib=tmp_path / "ids.npy") + (
        '[[pass]]\nname = "quantize"\n[pass.options]\nffn = "f32"\nattention = "f32"\nembeddings = "f32"\n'
        'other = "f32"\n[[pass]]\nname = "pack"\n'))
    convert_model(path, tmp_path / "out", recipe=tmp_path / "recipe.toml")
    from sparseforge.toolchain.ir import ModelIR

    blocks = ModelIR.load(tmp_path / "out" / "ir").blocks
    assert len(blocks) == 2 and all(0 <= b.annotations["profile"]["sparsity"] < 1 for b in blocks)
    rt = load_runtime(tmp_path / "out" / "model.gguf", mode="dense")
    ids = np.random.default_rng(4).integers(0, hf.config.vocab_size, 15)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    got = stepwise_logits(rt, ids, 7)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


@pytest.mark.parametrize("cut", ["split-sizes", "split-even", "slices", "slices-gap"])
def test_hand_built_fused_projection(tmp_path, cut):
    """``x @ W + b`` ([in, out] weight, a bias) cut along its last axis by a Split (sizes
    given, or even parts) or by Slice nodes (the last open-ended): one linear per part,
    over those rows of the canonical weight and of the bias, read through TensorRef
    rows; slices that leave a gap are no fused projection."""
    from sparseforge.toolchain.tensors import TensorRef, TensorStore

    rng = np.random.default_rng(2)
    d, out = 4, 6
    consts = {"w": rng.standard_normal((d, out), np.float32), "b": rng.standard_normal(out, np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h0"]), helper.make_node("Add", ["h0", "b"], ["h"])]
    if cut.startswith("split"):
        parts = [(0, 2), (2, 6)] if cut == "split-sizes" else [(0, 3), (3, 6)]
        inputs = ["h", "sizes"] if cut == "split-sizes" else ["h"]
        consts["sizes"] = np.array([2, 4], np.int64)
        nodes.append(helper.make_node("Split", inputs, ["p0", "p1"], axis=2, num_outputs=2)
                     if cut == "split-even" else helper.make_node("Split", inputs, ["p0", "p1"], axis=-1))
    else:
        parts = [(0, 1), (1, 4), (4 if cut == "slices" else 5, 2 ** 63 - 1)]
        for i, (a, b) in enumerate(parts):
            consts[f"s{i}"], consts[f"e{i}"] = np.array([a], np.int64), np.array([b], np.int64)
            nodes.append(helper.make_node("Slice", ["h", f"s{i}", f"e{i}", "axis"], [f"p{i}"]))
        consts["axis"] = np.array([-1], np.int64)
        parts[-1] = (parts[-1][0], out)
    outputs = [helper.make_tensor_value_info(f"p{i}", TensorProto.FLOAT, None) for i in range(len(parts))]
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", d])],
                              outputs, [numpy_helper.from_array(v, k) for k, v in consts.items()],
                              value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "s", out])])
    path = tmp_path / "fused.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    g = Graph(path, OnnxInitializers(path))
    linears = find_linears(g)
    if cut == "slices-gap":
        assert set(linears) == {"h0", "h"} and linears["h"].shape == (out, d)
        return
    assert set(linears) == {f"p{i}" for i in range(len(parts))}
    for i, (a, b) in enumerate(parts):
        lin = linears[f"p{i}"]
        assert lin.x == "x" and lin.shape == (b - a, d) and lin.weight.rows == lin.bias.rows == (a, b)
        store = TensorStore({"w": TensorRef(str(path), "w", "onnx", lin.weight.transpose, rows=lin.weight.rows),
                             "b": TensorRef(str(path), "b", "onnx", rows=lin.bias.rows)})
        assert store.shape("w") == (b - a, d)
        np.testing.assert_array_equal(store.get("w"), consts["w"].T[a:b])
        np.testing.assert_array_equal(store.get("b"), consts["b"][a:b])
    with pytest.raises(InputError, match="tensor 'w' has 6 columns, fewer than the 7 IR name 'q' takes"):
        TensorStore({"q": TensorRef(str(path), "w", "onnx", True, rows=(4, 7))}).check()
