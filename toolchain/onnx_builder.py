"""Build an onnxruntime graph directly from the IR (no torch export).

``build_onnx(ir, directory)`` writes ``directory/model.onnx`` computing, in float32,
what the IR's family computes (BERT ``last_hidden_state``; Llama/Mistral/Qwen2
``logits``) from ``input_ids`` and ``attention_mask`` [batch, seq] int64 (1 = token,
0 = right padding). Every FFN's input and activation are named values ``ffn.{layer}.input``
[batch, seq, d] and ``ffn.{layer}.act`` [batch, seq, n_ff] (graph outputs by default),
and the FFN follows each block's own tensors and ``activation``.

Weights are not copied when they need not be: a float32/float16 tensor that is a plain
reference into a safetensors file becomes external data pointing at its bytes inside
that file, which is hard-linked into ``directory`` (onnxruntime 1.32 rejects external
data given by absolute path, by ``..`` or through a symlink leading out of the model's
directory; a hard link is an ordinary file inside it). Linking falls back to a copy
across filesystems. Every other tensor (in-memory overlays, bfloat16, transposed ONNX
references) is written as float32 to ``directory/weights.bin`` in tensor-name order.
Building the same IR twice gives byte-identical files.

onnx's checker (and ``onnx.load`` with external data) refuse external data files with
more than one hard link; ``link_weights=False`` copies the files instead, for a
directory those accept (``model.onnx`` is the same either way).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import TensorProto, ValueInfoProto, helper

from .atomic import atomic_path
from .ir import ModelIR
from .onnx_ops import OPSET, Graph, attention, attention_mask, ffn, layer_norm, linear, rms_norm, rope_tables, soft_cap
from .reference.llama import LayerNorms
from .reference.rope import Rope
from .tensors import TensorStore, open_tensor_file

MODEL = "model.onnx"
SIDECAR = "weights.bin"
IR_VERSION = 10
INPUTS = ("input_ids", "attention_mask")
_ALIGN = 64  # byte alignment of tensors in weights.bin
_DIRECT = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("float16"): TensorProto.FLOAT16}


@dataclass
class BuiltGraph:
    """A graph written by :func:`build_onnx`; ``ir`` is a copy of the IR whose blocks name
    their FFN values and whose ``graph`` is ``path``."""

    path: Path
    inputs: list[str]
    output: str
    ffn_inputs: list[str]
    ffn_activations: list[str]
    ir: ModelIR


def build_onnx(ir: ModelIR, directory: str | Path, *, ffn_outputs: bool = True,
               link_weights: bool = True) -> BuiltGraph:
    """Write ``directory/model.onnx`` (+ weight files) for ``ir``; the caller's IR is not changed.

    ``ffn_outputs`` makes the FFN inputs and activations graph outputs; ``link_weights``
    hard-links safetensors files into ``directory`` (False: copies them).
    """
    try:
        assemble, output = _FAMILIES[ir.spec.family]
    except KeyError:
        raise ValueError(f"no ONNX builder for model family {ir.spec.family!r} "
                         f"(known: {', '.join(sorted(_FAMILIES))})") from None
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    weights = _WeightFiles(ir.store, directory, link_weights)
    g = Graph(weights)
    width = assemble(g, ir)
    weights.write_sidecar()

    def value(name: str, last: int) -> ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", last])

    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in INPUTS]
    outputs = [value(output, width)]
    names = [(f"ffn.{b.layer}.input", f"ffn.{b.layer}.act") for b in ir.blocks]
    if ffn_outputs:
        for block, (x, a) in zip(ir.blocks, names):
            outputs += [value(x, ir.spec.hidden_size), value(a, g.shapes[block.up][0])]
    initializers = sorted(g.initializers, key=lambda t: t.name)
    graph = helper.make_graph(g.nodes, f"sparseforge-{ir.spec.family}", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="sparseforge")
    path = directory / MODEL
    with atomic_path(path) as tmp:
        tmp.write_bytes(model.SerializeToString())

    built = ir.evolve()
    for block, (x, a) in zip(built.blocks, names):
        block.input_value, block.activation_value = x, a
    built.graph = str(path)
    return BuiltGraph(path, list(INPUTS), output, [x for x, _ in names], [a for _, a in names], built)


# -- families ------------------------------------------------------------------------------
def _bert(g: Graph, ir: ModelIR) -> int:
    """Post-norm BERT encoder -> ``last_hidden_state`` [B, S, d]; returns d."""
    spec, eps = ir.spec, ir.spec.norm_eps
    word = g.op("Gather", g.weight("embeddings.word_embeddings.weight"), "input_ids")
    pos = g.op("Gather", g.weight("embeddings.position_embeddings.weight"), g.positions)
    token_type = g.op("Gather", g.weight("embeddings.token_type_embeddings.weight"),
                      g.const(np.array(0, np.int64), "zero"))  # token_type_ids are all 0: row 0, [d]
    x = layer_norm(g, g.op("Add", g.op("Add", word, pos), token_type), "embeddings.LayerNorm.weight",
                   "embeddings.LayerNorm.bias", eps, name="embeddings")
    mask = attention_mask(g, causal=False)
    for block in ir.blocks:
        p, i = f"encoder.layer.{block.layer}.", block.layer
        proj = {k: (f"{p}attention.self.{n}.weight", f"{p}attention.self.{n}.bias")
                for k, n in (("q", "query"), ("k", "key"), ("v", "value"))}
        proj["o"] = (f"{p}attention.output.dense.weight", f"{p}attention.output.dense.bias")
        a = attention(g, x, proj, spec.num_heads, spec.num_kv_heads, spec.head_dim, mask, None)
        h = layer_norm(g, g.op("Add", a, x), f"{p}attention.output.LayerNorm.weight",
                       f"{p}attention.output.LayerNorm.bias", eps, name=f"ffn.{i}.input")
        y = ffn(g, block, h, f"ffn.{i}.act")
        x = layer_norm(g, g.op("Add", y, h), f"{p}output.LayerNorm.weight", f"{p}output.LayerNorm.bias", eps,
                       name="last_hidden_state" if block is ir.blocks[-1] else f"layer.{i}.out")
    return spec.hidden_size


def _decoder(g: Graph, ir: ModelIR) -> int:
    """Pre-norm Llama/Mistral/Qwen2/Qwen3/Phi-3/Granite/Gemma decoder -> ``logits`` [B, S, vocab];
    returns vocab. Each distinct RoPE table and window is built once."""
    spec, store, eps, off = ir.spec, ir.store, ir.spec.norm_eps, ir.spec.norm_offset
    x = g.op("Gather", g.weight("model.embed_tokens.weight"), "input_ids", name="embeddings")
    if spec.embedding_multiplier != 1:
        x = g.op("Mul", x, g.scalar(spec.embedding_multiplier, "embedding_multiplier"), name="embeddings.scaled")
    residual = g.scalar(spec.residual_multiplier, "residual_multiplier") if spec.residual_multiplier != 1 else None
    ropes, tables, masks = Rope.per_layer(spec), {}, {}
    for block in ir.blocks:
        p, i = f"model.layers.{block.layer}.", block.layer
        if id(ropes[i]) not in tables:
            tables[id(ropes[i])] = rope_tables(g, ropes[i])
        if spec.window(i) not in masks:
            masks[spec.window(i)] = attention_mask(g, causal=True, window=spec.window(i))
        proj = {}
        for k in "qkvo":
            bias = f"{p}self_attn.{k}_proj.bias"
            proj[k] = (f"{p}self_attn.{k}_proj.weight", bias if bias in store else None)
        norms = LayerNorms.of(spec, i)
        h = rms_norm(g, x, norms.attn_in, eps, offset=off)
        head_norms = {k: f"{p}self_attn.{k}_norm.weight" for k in "qk"} if spec.qk_norm else None
        a = attention(g, h, proj, spec.num_heads, spec.num_kv_heads, spec.head_dim, masks[spec.window(i)],
                      tables[id(ropes[i])], head_norms, eps, spec.rotary_dim, spec.attention_scale, off,
                      spec.attn_logit_softcapping)
        if norms.attn_out:
            a = rms_norm(g, a, norms.attn_out, eps, offset=off)
        x = g.op("Add", x, a if residual is None else g.op("Mul", a, residual))
        h = rms_norm(g, x, norms.ffn_in, eps, name=f"ffn.{i}.input", offset=off)
        y = ffn(g, block, h, f"ffn.{i}.act")
        if norms.ffn_out:
            y = rms_norm(g, y, norms.ffn_out, eps, offset=off)
        x = g.op("Add", x, y if residual is None else g.op("Mul", y, residual), name=f"layer.{i}.out")
    x = rms_norm(g, x, "model.norm.weight", eps, name="final_norm", offset=off)
    tied = spec.tie_word_embeddings and "lm_head.weight" not in store
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    if spec.logits_scaling == 1 and spec.final_logit_softcapping is None:
        linear(g, x, head, None, name="logits")
        return spec.vocab_size
    logits = linear(g, x, head, None)
    if spec.logits_scaling != 1:
        logits = g.op("Div", logits, g.scalar(spec.logits_scaling, "logits_scaling"))
    if spec.final_logit_softcapping is not None:
        logits = soft_cap(g, logits, spec.final_logit_softcapping)
    g.op("Identity", logits, name="logits")
    return spec.vocab_size


_FAMILIES: dict[str, tuple[Callable[[Graph, ModelIR], int], str]] = {
    "bert": (_bert, "last_hidden_state"),
    "llama": (_decoder, "logits"),
}


# -- weight bytes ----------------------------------------------------------------------------
def _external(name: str, shape: tuple[int, ...], dtype: int, location: str, offset: int, length: int) -> TensorProto:
    """An initializer whose bytes are ``length`` bytes at ``offset`` in file ``location``."""
    t = TensorProto(name=name, dims=list(shape), data_type=dtype, data_location=TensorProto.EXTERNAL)
    for key, val in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=val)
    return t


class _WeightFiles:
    """Initializers of store tensors: external data into a linked safetensors file, or into
    ``weights.bin`` (offsets assigned by :meth:`write_sidecar`)."""

    def __init__(self, store: TensorStore, directory: Path, link: bool) -> None:
        self.store, self.directory, self.link = store, directory, link
        self._files: dict[Path, str] = {}  # source file -> its name in directory
        self._sidecar: dict[str, TensorProto] = {}

    def initializer(self, name: str) -> TensorProto:
        ref, dtype, shape = self.store.ref(name), self.store.dtype(name), self.store.shape(name)
        count = int(np.prod(shape, dtype=np.int64))
        if ref and ref.format == "safetensors" and not ref.transpose and not ref.encoding and dtype in _DIRECT \
                and count:
            offset = open_tensor_file(ref.file, "safetensors").offset(ref.key)
            if ref.rows:  # rows of a fused matrix: they follow each other in the file
                offset += ref.rows[0] * (count // shape[0]) * dtype.itemsize
            return _external(name, shape, _DIRECT[dtype], self._file(Path(ref.file)), offset, count * dtype.itemsize)
        self._sidecar[name] = _external(name, shape, TensorProto.FLOAT, SIDECAR, 0, count * 4)
        return self._sidecar[name]

    def _file(self, src: Path) -> str:
        """The name in ``directory`` of the link to (or copy of) ``src``."""
        src = src.resolve()
        if src not in self._files:
            taken = set(self._files.values()) | {MODEL, SIDECAR}
            name, n = src.name, 1
            while name in taken:
                name, n = f"{n}-{src.name}", n + 1
            _place(src, self.directory / name, self.link)
            self._files[src] = name
        return self._files[src]

    def write_sidecar(self) -> None:
        """Write ``weights.bin`` (float32, name order, 64-byte aligned) and set the offsets;
        remove a stale one when no tensor needs it."""
        path = self.directory / SIDECAR
        if not self._sidecar:
            path.unlink(missing_ok=True)
            return
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            for name in sorted(self._sidecar):
                fh.write(b"\0" * (-fh.tell() % _ALIGN))
                next(e for e in self._sidecar[name].external_data if e.key == "offset").value = str(fh.tell())
                _write_f32(fh, self.store.get(name))


def _write_f32(fh, arr: np.ndarray, chunk_bytes: int = 16 << 20) -> None:
    """Write ``arr`` as little-endian float32 in C order, a block of rows at a time."""
    arr = arr.reshape(1, -1) if arr.ndim < 2 else arr
    step = max(1, chunk_bytes // max(1, 4 * arr[0].size))
    for i in range(0, arr.shape[0], step):
        fh.write(np.ascontiguousarray(arr[i : i + step], dtype="<f4").tobytes())


def _place(src: Path, dst: Path, link: bool) -> None:
    """Make ``dst`` a hard link to ``src`` (a copy when linking fails, e.g. across
    filesystems), or a copy when ``link`` is False; kept if it already is one."""
    if dst.exists() and os.path.samefile(src, dst) and (link or dst.stat().st_nlink == 1):
        return
    with atomic_path(dst) as tmp:
        if link:
            tmp.unlink()
            try:
                os.link(src, tmp)
                return
            except OSError:  # another filesystem, or hard links not permitted
                pass
        shutil.copyfile(src, tmp)
