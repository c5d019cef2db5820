"""ONNX frontend: BERT and Llama-family graphs (torch.onnx dynamo / TorchScript exports,
optimum-style graphs) to a :class:`~sparseforge.toolchain.ir.ModelIR`.

Weights are mapped by graph structure (see :mod:`.onnx_graph`), never by initializer
names: FFNs are ``linear -> activation [* linear] -> linear`` chains, attention blocks
are found around ``Softmax(QK^T) @ V`` (or an ``Attention`` op), norms by their op or
decomposition, embeddings as ``Gather`` tables. Tensors stay in the ONNX file
(:class:`TensorRef` with ``format="onnx"``, ``transpose=True`` for ``[in, out]`` MatMul
weights).

The spec comes from a ``config.json`` beside the ``.onnx`` file when there is one (the
graph must agree with it); otherwise it is inferred from the graph. What a graph does
not say: Llama ``max_position_embeddings`` (2048 is assumed), Mistral vs Llama (both
become ``LlamaForCausalLM``; q/k/v biases make ``Qwen2ForCausalLM``, per-head query/key
norms ``Qwen3ForCausalLM``),
special token ids (BERT's pad id is assumed 0) and whether embeddings are tied when the
graph has no output projection. A sliding attention window is read from the mask's
comparison of shifted position ranges (:func:`.onnx_graph.sliding_window`).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..families.base import ModelFamily, family_for_architecture
from ..families.bert import Bert
from ..families.llama import Llama
from ..fingerprint import file_digest
from ..ir import ArchSpec, ModelIR
from ..reference.rope import CALL_DEPENDENT, rope_inv_freq, rope_scaling_text
from ..tensors import TensorRef, TensorStore, open_tensor_file
from .common import check_weights, tokenizer_file
from .hf import read_config
from .onnx_graph import (
    FFN, Attention, Graph, Linear, Norm, Weight, attr, find_attention, find_ffns, find_linears, find_norms,
    is_causal, reshape_heads, rope_frequencies, sliding_window,
)

_LLAMA_MAX_POSITIONS = 2048  # transformers' LlamaConfig default; not visible in a graph


def load_onnx(path: str | Path) -> ModelIR:
    """Import an ``.onnx`` file (weights stay in it, memory-mapped when external).

    The path is made absolute without resolving symlinks: external data, config.json and
    tokenizer.json are looked up beside the link, as in a Hugging Face hub snapshot."""
    path = Path(os.path.abspath(path))
    g = Graph(path, open_tensor_file(path, "onnx"))
    linears = find_linears(g)
    ffns = find_ffns(g, linears)
    if not ffns:
        raise InputError(path, "no feed-forward block (MatMul -> activation -> MatMul) found in the graph")
    attns = find_attention(g, linears)
    if len(attns) != len(ffns) or any(
        a.node > f.down.node or (i and ffns[i - 1].down.node > a.node) for i, (a, f) in enumerate(zip(attns, ffns))
    ):
        raise InputError(path, f"found {len(ffns)} feed-forward blocks and {len(attns)} attention blocks; "
                               "expected one attention block before each feed-forward block")
    m = _Matcher(g, linears, find_norms(g), ffns, attns)
    family = m.family()
    refs, facts = m.map_bert() if family is Bert else m.map_llama()
    store = TensorStore({name: TensorRef(str(path), w.key, "onnx", w.transpose, rows=w.rows)
                         for name, w in refs.items()})
    lm_tied = facts.pop("tie_word_embeddings")
    config = path.parent / "config.json"
    source: dict[str, Any] = {"format": "onnx", "path": str(path), "sha256": file_digest(path)}
    if config.is_file():
        spec = _config_spec(family, facts, path.parent)
        source["config_sha256"] = file_digest(config)
    else:
        spec = _inferred_spec(family, {**facts, "tie_word_embeddings": lm_tied}, path)
    if spec.tie_word_embeddings and lm_tied:
        store.delete("lm_head.weight")
    check_weights(family, spec, store, path)
    blocks = family.blocks(spec)
    for block, ffn in zip(blocks, ffns):
        block.input_value, block.activation_value = ffn.input, ffn.activation_value
    return ModelIR(spec=spec, store=store, blocks=blocks, source=source,
                   tokenizer=tokenizer_file(path.parent / "tokenizer.json"), graph=str(path))


class _Matcher:
    """Maps the matched graph structure of one model to canonical tensor names."""

    def __init__(self, g: Graph, linears: dict[str, Linear], norms: dict[str, Norm],
                 ffns: list[FFN], attns: list[Attention]) -> None:
        self.g, self.linears, self.norms, self.ffns, self.attns = g, linears, norms, ffns, attns
        self._by_projection: dict[str, list[Norm]] | None = None  # head_norms, made on first use
        self.norm_by_input = {g.strip(n.x): n for n in norms.values()}

    # -- family --------------------------------------------------------------------
    def family(self) -> type[ModelFamily]:
        """BERT: LayerNorm, ungated FFN, bidirectional; Llama: RMSNorm, gated FFN, causal."""
        kinds = {f.activation for f in self.ffns}
        if len(kinds) > 1:
            raise InputError(self.g.path, f"feed-forward blocks use different activations: {sorted(kinds)}")
        norm = self.norm_before(self.ffns[0].input, "the norm before the first feed-forward block").kind
        gated = {f.gate is not None for f in self.ffns}
        causal = is_causal(self.g)
        if norm == "layernorm" and gated == {False} and not causal:
            return Bert
        if norm == "rmsnorm" and gated == {True} and causal:
            return Llama
        raise InputError(self.g.path, f"unsupported architecture ({norm}, {'gated' if True in gated else 'ungated'} "
                                      f"FFN, {'causal' if causal else 'bidirectional'} attention); supported: BERT "
                                      "(layernorm, ungated, bidirectional) and Llama-style (rmsnorm, gated, causal)")

    # -- structure helpers ---------------------------------------------------------
    def norm_before(self, value: str, what: str) -> Norm:
        norm = self.norms.get(self.g.strip(value))
        if norm is None:
            raise InputError(self.g.path, f"cannot map {what}: no LayerNorm/RMSNorm produces value {value!r}")
        return norm

    def norm_after(self, value: str, what: str) -> Norm:
        """The norm applied to the residual sum ``value + skip``."""
        for i in self.g.consumers.get(value, []):
            n = self.g.nodes[i]
            if n.op_type == "Add" and (norm := self.norm_by_input.get(n.output[0])) is not None:
                return norm
        raise InputError(self.g.path, f"cannot map {what}: no norm follows the residual add of {value!r}")

    def gather(self, value: str) -> tuple[Weight, str] | None:
        """(table [rows, d], indices) if ``value`` is ``Gather(table, indices)`` on a constant table."""
        n = self.g.node(self.g.strip(value))
        if n is None or n.op_type != "Gather" or attr(n, "axis", 0) != 0:
            return None
        w = self.g.weight(n.input[0])
        return (w, n.input[1]) if w is not None and len(self.g.shape(w)) == 2 else None

    def rows(self, w: Weight) -> int:
        return self.g.shape(w)[0]

    def heads(self, q: Linear, k: Linear, freqs: np.ndarray | None) -> dict[str, int | None]:
        """num_heads / num_kv_heads / head_dim from the q Reshape constants, else the RoPE size."""
        heads, head_dim = reshape_heads(self.g, q)
        if head_dim is None and heads:
            head_dim = q.shape[0] // heads
        if head_dim is None and freqs is not None:
            head_dim = 2 * len(freqs)
        if not head_dim or q.shape[0] % head_dim or k.shape[0] % head_dim:
            return {"num_heads": None, "num_kv_heads": None, "head_dim": None}
        return {"num_heads": q.shape[0] // head_dim, "num_kv_heads": k.shape[0] // head_dim, "head_dim": head_dim}

    # -- families ------------------------------------------------------------------
    def map_bert(self) -> tuple[dict[str, Weight], dict[str, Any]]:
        refs: dict[str, Weight] = {}
        emb_norm = self.norm_before(self.attns[0].q.x, "embeddings.LayerNorm")
        word, position, token_type = self.bert_embeddings(emb_norm.x)
        refs.update({"embeddings.word_embeddings.weight": word, "embeddings.position_embeddings.weight": position,
                     "embeddings.token_type_embeddings.weight": token_type})
        _norm(refs, "embeddings.LayerNorm", emb_norm)
        out_norm = emb_norm
        for i, (a, f) in enumerate(zip(self.attns, self.ffns)):
            p = f"encoder.layer.{i}."
            for name, lin in (("attention.self.query", a.q), ("attention.self.key", a.k), ("attention.self.value", a.v),
                              ("attention.output.dense", a.o), ("intermediate.dense", f.up), ("output.dense", f.down)):
                _linear(refs, p + name, lin)
            _norm(refs, p + "attention.output.LayerNorm", self.norm_before(f.input, p + "attention.output.LayerNorm"))
            out_norm = self.norm_after(f.down.out, p + "output.LayerNorm")
            _norm(refs, p + "output.LayerNorm", out_norm)
        for lin in self.linears_after(out_norm.out):  # BertModel's pooler: dense + tanh on the first token
            if any(self.g.nodes[i].op_type == "Tanh" for i in self.g.consumers.get(lin.out, [])):
                _linear(refs, "pooler.dense", lin)
                break
        a, f = self.attns[0], self.ffns[0]
        facts = dict(architecture="BertModel", hidden_size=self.g.shape(word)[1], intermediate_size=f.up.shape[0],
                     num_layers=len(self.ffns), **self.heads(a.q, a.k, None), vocab_size=self.rows(word),
                     max_positions=self.rows(position), activation=f.activation, gated=False, norm="layernorm",
                     norm_eps=emb_norm.eps, causal=False, attention_bias=a.q.bias is not None,
                     mlp_bias=f.up.bias is not None, type_vocab_size=self.rows(token_type), tie_word_embeddings=False)
        return refs, facts

    def bert_embeddings(self, value: str) -> tuple[Weight, Weight, Weight]:
        """(word, position, token type) tables summed into ``value``: positions are gathered
        with a Range / arange constant, the word table is the larger of the other two."""
        todo, tables, folded = [value], [], 0
        while todo:
            v = self.g.strip(todo.pop())
            n = self.g.node(v)
            if n is not None and n.op_type == "Add":
                todo += list(n.input)
            elif (t := self.gather(v)) is not None:
                tables.append(t)
            else:
                folded += self.g.const(v) is not None
        positions = [w for w, idx in tables if self.is_positions(idx)]
        others = sorted((w for w, idx in tables if not self.is_positions(idx)), key=self.rows)
        if len(tables) != 3 or len(positions) != 1:
            hint = " (embeddings were constant-folded: export with a dynamic sequence length)" if folded else ""
            raise InputError(self.g.path, "cannot identify the word, position and token-type embeddings: "
                                          f"found {len(tables)} embedding tables, {len(positions)} indexed by "
                                          f"positions{hint}")
        return others[1], positions[0], others[0]

    def is_positions(self, indices: str) -> bool:
        v = indices
        while (n := self.g.node(v)) is not None and n.op_type in ("Slice", "Expand", "Unsqueeze", "Squeeze",
                                                                   "Reshape", "Cast", "Identity"):
            v = n.input[0]
        if n is not None:
            return n.op_type == "Range"
        c = self.g.const(v)
        return c is not None and c.size > 1 and np.array_equal(c.reshape(-1), np.arange(c.size))

    def linears_after(self, hidden: str) -> list[Linear]:
        """Linears applied to ``hidden`` ``[t, d]`` or to a slice of it (first token, last
        positions), in graph order."""
        found, todo = {}, [hidden]
        while todo:
            v = todo.pop()
            for i in self.g.consumers.get(v, []):
                n = self.g.nodes[i]
                if n.input[0] != v:
                    continue
                if (lin := self.linears.get(n.output[0])) is not None:
                    found[lin.out] = lin
                elif n.op_type in ("Gather", "Slice", "Squeeze", "Reshape", "Flatten", "Cast", "Identity"):
                    todo.append(n.output[0])
        return sorted(found.values(), key=lambda lin: (lin.node, lin.out))

    def head_norms(self, a: Attention) -> dict[str, Norm] | None:
        """The RMSNorms over each head of the query and of the key (Qwen3): norms whose
        input comes from the q (k) projection alone, with a weight whose length divides its
        rows (one key head: the norm's weight is as long as the k projection's rows)."""
        if self._by_projection is None:  # each candidate norm traced once
            self._by_projection = {}
            for n in self.norms.values():
                if n.kind == "rmsnorm" and n.bias is None:
                    upstream = self.g.trace_back(n.x, self.linears)[0]
                    if len(upstream) == 1 and upstream[0].shape[0] % self.g.shape(n.weight)[0] == 0:
                        self._by_projection.setdefault(upstream[0].out, []).append(n)
        found = {}
        for name, lin in (("q", a.q), ("k", a.k)):
            norms = self._by_projection.get(lin.out, [])
            if len(norms) > 1:
                raise InputError(self.g.path, f"{len(norms)} norms over the heads of one {name} projection")
            if norms:
                found[name] = norms[0]
        if len(found) == 1:
            raise InputError(self.g.path, "a per-head norm on the queries or the keys but not on both")
        return found or None

    def map_llama(self) -> tuple[dict[str, Weight], dict[str, Any]]:
        refs: dict[str, Weight] = {}
        first = self.norm_before(self.attns[0].q.x, "model.layers.0.input_layernorm")
        embed = self.gather(first.x)
        if embed is None:
            raise InputError(self.g.path, "cannot map model.embed_tokens: the first norm's input is not a Gather "
                                          "from a constant table")
        refs["model.embed_tokens.weight"] = embed[0]
        head_norms = [self.head_norms(a) for a in self.attns]
        if any(head_norms) and not all(head_norms):
            raise InputError(self.g.path, "per-head query/key norms in some attention blocks but not in others")
        for i, (a, f) in enumerate(zip(self.attns, self.ffns)):
            p = f"model.layers.{i}."
            _norm(refs, p + "input_layernorm", self.norm_before(a.q.x, p + "input_layernorm"))
            for name, norm in (head_norms[i] or {}).items():
                _norm(refs, f"{p}self_attn.{name}_norm", norm)
            _norm(refs, p + "post_attention_layernorm", self.norm_before(f.input, p + "post_attention_layernorm"))
            for name, lin in (("self_attn.q_proj", a.q), ("self_attn.k_proj", a.k), ("self_attn.v_proj", a.v),
                              ("self_attn.o_proj", a.o), ("mlp.gate_proj", f.gate), ("mlp.up_proj", f.up),
                              ("mlp.down_proj", f.down)):
                _linear(refs, p + name, lin)
        final = self.norm_after(self.ffns[-1].down.out, "model.norm")
        _norm(refs, "model.norm", final)
        heads = self.linears_after(final.out)
        tied = None
        if heads:
            refs["lm_head.weight"] = heads[0].weight
            lm, emb = _canonical(self.g, heads[0].weight), _canonical(self.g, embed[0])
            tied = lm.shape == emb.shape and np.array_equal(lm[:1], emb[:1]) and bool(np.array_equal(lm, emb))
        a, f = self.attns[0], self.ffns[0]
        freqs = rope_frequencies(self.g, self.g.trace_back(a.q_side, self.linears)[1])
        dims = self.heads(a.q, a.k, freqs)
        if freqs is not None and dims["head_dim"] and 2 * len(freqs) != dims["head_dim"]:
            raise InputError(self.g.path, f"RoPE rotates {2 * len(freqs)} of each head's {dims['head_dim']} "
                                          "dimensions (partial rotary embeddings): convert the checkpoint")
        arch = "Qwen3ForCausalLM" if head_norms[0] else "Qwen2ForCausalLM" if a.q.bias is not None else "LlamaForCausalLM"
        facts = dict(architecture=arch, qk_norm=bool(head_norms[0]),
                     hidden_size=self.g.shape(embed[0])[1], intermediate_size=f.up.shape[0], num_layers=len(self.ffns),
                     **dims, vocab_size=self.rows(embed[0]), max_positions=None,
                     activation=f.activation, gated=True, norm="rmsnorm", norm_eps=first.eps, causal=True,
                     rope_theta=None if freqs is None else _rope_theta(freqs), rope_inv_freq=freqs,
                     attention_bias=a.q.bias is not None, mlp_bias=f.up.bias is not None, tie_word_embeddings=tied,
                     sliding_window=sliding_window(self.g))
        return refs, facts


def _linear(refs: dict[str, Weight], prefix: str, lin: Linear) -> None:
    refs[f"{prefix}.weight"] = lin.weight
    if lin.bias is not None:
        refs[f"{prefix}.bias"] = lin.bias


def _norm(refs: dict[str, Weight], prefix: str, norm: Norm) -> None:
    refs[f"{prefix}.weight"] = norm.weight
    if norm.bias is not None:
        refs[f"{prefix}.bias"] = norm.bias


def _canonical(g: Graph, w: Weight) -> np.ndarray:
    arr = g.tensors.get(w.key)
    arr = arr.T if w.transpose else arr
    return arr if w.rows is None else arr[w.rows[0]:w.rows[1]]


def _rope_theta(freqs: np.ndarray) -> float | None:
    """RoPE base from inverse frequencies ``theta^(-i/k)``, i < k, rounded to 6 significant
    digits (float32 frequencies carry about 7); None when they are not such a series
    (scaled RoPE: only ``config.json`` can say how)."""
    k = len(freqs)
    if k < 2:
        return None
    ratios = freqs[1:] / freqs[:-1]
    if not np.isclose(freqs[0], 1.0, rtol=1e-5) or not np.allclose(ratios, ratios[0], rtol=1e-4):
        return None
    return float(f"{freqs[-1] ** (-k / (k - 1)):.6g}")


def _graph_window(facts: dict[str, Any], max_positions: int | None) -> int | None:
    """The graph's sliding window, taken out of ``facts``; None when it has none or its
    window spans all ``max_positions``."""
    window = facts.pop("sliding_window", None)
    return window if window is not None and window < max_positions else None


def _inferred_spec(family: type[ModelFamily], facts: dict[str, Any], path: Path) -> ArchSpec:
    """The spec from graph facts alone; a fact the graph does not give is an InputError."""
    facts.pop("rope_inv_freq", None)
    if family is Llama and facts["max_positions"] is None:
        facts["max_positions"] = _LLAMA_MAX_POSITIONS
    window = _graph_window(facts, facts["max_positions"])
    if window is not None:  # one mask of the graph shows it; which layers use it, only the config says
        raise InputError(path, f"the graph attends a sliding window of {window} positions; put the model's "
                               "config.json beside the .onnx file (it names the layers that use it)")
    missing = sorted(k for k, v in facts.items() if v is None)
    if missing:
        hint = " (the graph has no output projection after the final norm)" if "tie_word_embeddings" in missing else ""
        raise InputError(path, f"cannot infer {', '.join(missing)} from the graph{hint}; put the model's "
                               "config.json beside the .onnx file")
    return ArchSpec(family=family.name, pad_token_id=0 if family is Bert else None, **facts)


def _config_spec(family: type[ModelFamily], facts: dict[str, Any], directory: Path) -> ArchSpec:
    """The spec from ``config.json``, checked against what the graph shows."""
    path = directory / "config.json"
    config = read_config(directory)
    described = family_for_architecture(config["architectures"][0], path)
    if described is not family:
        raise InputError(path, f"config.json describes a {described.name} model but the graph is a {family.name} model")
    spec = family.spec_from_config(config, path)
    if spec.rope_scaling is not None and spec.rope_scaling["type"] in CALL_DEPENDENT:
        raise InputError(path, f"config.json: {spec.rope_scaling['type']!r} RoPE scaling (tables that change with "
                               "the sequence length) is read from checkpoints, not from ONNX exports; convert the "
                               "checkpoint")
    if spec.rotary_dim is not None:
        raise InputError(path, "config.json: partial rotary embeddings are read from checkpoints, not from ONNX "
                               "exports; convert the checkpoint")
    if spec.architecture in ("GraniteForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        raise InputError(path, f"config.json: {spec.architecture} (scaled embeddings) is read from checkpoints, not "
                               "from ONNX exports; convert the checkpoint")
    freqs = facts.pop("rope_inv_freq", None)
    window = _graph_window(facts, spec.max_positions)
    if window is not None and window != spec.sliding_window:
        raise InputError(path, f"config.json says sliding_window = {spec.sliding_window!r} but the graph has {window}")
    got = dataclasses.asdict(spec)  # every field, those to_dict leaves out at their defaults too
    for key, value in facts.items():
        if value is None or key == "architecture":
            continue
        if isinstance(value, float):  # norm_eps, rope_theta
            agrees = got[key] is not None and abs(got[key] - value) <= 1e-3 * abs(value)
        else:
            agrees = got[key] == value
        if not agrees:
            raise InputError(path, f"config.json says {key} = {got[key]!r} but the graph has {value!r}")
    if freqs is not None and spec.rope_theta is not None and (
            len(freqs) != spec.head_dim // 2 or not np.allclose(
                freqs, rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling), rtol=1e-4, atol=0)):
        raise InputError(path, f"config.json's RoPE (theta {spec.rope_theta:g}, "
                               f"{rope_scaling_text(spec.rope_scaling) if spec.rope_scaling else 'unscaled'}) does not "
                               "give the graph's rotary frequencies")
    return spec
