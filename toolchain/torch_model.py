"""A trainable torch twin of a model IR (float32, CPU), for recovery fine-tuning.

:func:`build_torch_model` (or ``TorchModel.from_ir``) turns a ``bert`` or ``llama``
family IR into an ``nn.Module`` that computes what the numpy reference executors in
:mod:`.reference` compute (to ~1e-5), with every parameter copied from the IR's store;
:func:`to_ir` writes the (trained) parameters back into a copy of the IR.

* ``bert``: embeddings (word + position + token type 0) -> LayerNorm -> post-norm layers
  ``x = LN(x + Attn(x)); x = LN(x + FFN(x))``; padding keys are masked out.
  ``forward`` returns the last hidden state ``[B, T, d]``; ``embed`` the mean-pooled,
  L2-normalised sentence embedding ``[B, d]``.
* ``llama`` (Llama, Mistral, Qwen2, Qwen3, Phi-3): token embedding -> pre-norm layers
  with RMSNorm, RoPE (HF ``rotate_half``), grouped-query attention, optional q/k/v biases
  and per-head q/k norms, causal (within the sliding window, if any) + padding mask ->
  RMSNorm -> LM head (tied to the embedding when the spec says so and the store has no
  ``lm_head.weight``). ``forward`` returns logits ``[B, T, V]``.

Each FFN implements :class:`~.ir.FFNBlock` exactly, reading the block's fields when the
module is built: ``h = act(gate(x)) * up_act(up(x))`` (gated) or ``act(up(x))``, then
``h`` zeroed where ``|h| <= output_threshold`` (the mask carries no gradient), and
``y = down(h)``. ``forward(..., return_ffn=True)`` also returns every layer's ``h``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .ir import FFNBlock, ModelIR
from .reference.llama import LayerNorms, causal_mask
from .reference.rope import Rope, layer_tables

TorchActivation = Callable[[torch.Tensor, FFNBlock], torch.Tensor]

TORCH_ACTIVATIONS: dict[str, TorchActivation] = {
    "gelu": lambda z, b: F.gelu(z),
    "gelu_tanh": lambda z, b: F.gelu(z, approximate="tanh"),
    "silu": lambda z, b: F.silu(z),
    "relu": lambda z, b: F.relu(z),
    # z > t compares in float32 (the scalar takes the tensor's dtype), as the reference does
    "fatrelu": lambda z, b: torch.where(z > float(np.float32(b.activation_threshold)), z, torch.zeros((), dtype=z.dtype)),
}
"""Torch versions of :data:`.reference.ffn.ACTIVATIONS`, ``fn(z, block) -> act(z)``."""


def register_torch_activation(name: str, fn: TorchActivation) -> None:
    """Add (or replace) the torch implementation of activation kind ``name``."""
    TORCH_ACTIVATIONS[name] = fn


class FFN(nn.Module):
    """One :class:`FFNBlock` (its activation fields are read once, here)."""

    def __init__(self, block: FFNBlock, d_model: int, n_ff: int) -> None:
        super().__init__()
        if block.activation not in TORCH_ACTIVATIONS:
            raise ValueError(f"layer {block.layer}: FFN activation {block.activation!r} has no torch version "
                             f"(known: {', '.join(sorted(TORCH_ACTIVATIONS))})")
        if block.up_activation not in (None, "relu"):
            raise ValueError(f"layer {block.layer}: unknown up activation {block.up_activation!r} (known: relu)")
        self.block = FFNBlock.from_dict(block.to_dict())  # a private copy: later edits don't leak in
        self.act = TORCH_ACTIVATIONS[block.activation]
        self.gate = nn.Linear(d_model, n_ff, bias=block.gate_bias is not None) if block.gate else None
        self.up = nn.Linear(d_model, n_ff, bias=block.up_bias is not None)
        self.down = nn.Linear(n_ff, d_model, bias=block.down_bias is not None)

    def ir_names(self) -> dict[str, str]:
        """Local parameter name -> IR tensor name."""
        b = self.block
        pairs = {"up.weight": b.up, "up.bias": b.up_bias, "down.weight": b.down, "down.bias": b.down_bias,
                 "gate.weight": b.gate, "gate.bias": b.gate_bias}
        return {k: v for k, v in pairs.items() if v}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, h)``: the block output and the activation that feeds ``down``."""
        b = self.block
        if self.gate is not None:
            up = self.up(x)
            h = self.act(self.gate(x), b) * (F.relu(up) if b.up_activation == "relu" else up)
        else:
            h = self.act(self.up(x), b)
        if b.output_threshold > 0:
            h = h.masked_fill(h.detach().abs() <= float(np.float32(b.output_threshold)), 0.0)
        return self.down(h), h


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
               scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Softmax attention ``[B, H, T, hd]`` (keys/values may have fewer heads: query head
    ``i`` uses kv head ``i // (H / KV)``); ``allowed`` (bool) broadcasts to ``[B, H, T, S]``;
    the scores are scaled by ``scale`` (None: ``hd ** -0.5``), then soft-capped as
    ``softcap tanh(s / softcap)`` (Gemma 2). A query must be allowed at least one key
    (right padding guarantees it)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=k.shape[1] != q.shape[1],
                                              scale=scale)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    # the most negative float, not -inf: a padding query may see no key within a sliding window
    scores = (torch.tanh(scores / softcap) * softcap).masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) @ v


class TorchModel(nn.Module):
    """Base of the torch twins. ``param_names`` maps parameter path -> IR tensor name."""

    def __init__(self, ir: ModelIR) -> None:
        super().__init__()
        self.spec = ir.spec
        self.param_names: dict[str, str] = {}

    @staticmethod
    def from_ir(ir: ModelIR) -> "TorchModel":
        return build_torch_model(ir)

    def _load(self, ir: ModelIR) -> None:
        """Copy every mapped parameter from ``ir.store`` (shapes must match)."""
        params = dict(self.named_parameters())
        if set(params) != set(self.param_names):
            raise AssertionError(f"unmapped parameters: {sorted(set(params) ^ set(self.param_names))}")
        with torch.no_grad():
            for path, name in self.param_names.items():
                arr = ir.store.get_f32(name)
                if tuple(arr.shape) != tuple(params[path].shape):
                    raise ValueError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(params[path].shape)}")
                params[path].copy_(torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)))

    def _map(self, prefix: str, names: dict[str, str]) -> None:
        self.param_names.update({f"{prefix}.{k}": v for k, v in names.items()})

    def ffn_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if ".ffn." in n]


class BertLayer(nn.Module):
    def __init__(self, d: int, heads: int, eps: float, block: FFNBlock, n_ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.ffn = FFN(block, d, n_ff)
        self.ffn_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, d = x.shape
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.heads, -1).transpose(1, 2)
        ctx = _attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), allowed)
        x = self.attn_norm(self.out(ctx.transpose(1, 2).reshape(B, T, d)) + x)
        y, h = self.ffn(x)
        return self.ffn_norm(y + x), h


class BertTorch(TorchModel):
    """BERT encoder twin (``BertModel`` without the pooler)."""

    def __init__(self, ir: ModelIR) -> None:
        super().__init__(ir)
        s = ir.spec
        d = s.hidden_size
        self.word = nn.Embedding(s.vocab_size, d)
        self.position = nn.Embedding(s.max_positions, d)
        self.token_type = nn.Embedding(max(s.type_vocab_size, 1), d)
        self.emb_norm = nn.LayerNorm(d, eps=s.norm_eps)
        blocks = {b.layer: b for b in ir.blocks}
        n_ff = {i: ir.store.shape(blocks[i].up)[0] for i in range(s.num_layers)}
        self.layers = nn.ModuleList(BertLayer(d, s.num_heads, s.norm_eps, blocks[i], n_ff[i]) for i in range(s.num_layers))
        e = "embeddings."
        self.param_names.update({
            "word.weight": e + "word_embeddings.weight", "position.weight": e + "position_embeddings.weight",
            "token_type.weight": e + "token_type_embeddings.weight",
            "emb_norm.weight": e + "LayerNorm.weight", "emb_norm.bias": e + "LayerNorm.bias"})
        for i, layer in enumerate(self.layers):
            p, q = f"layers.{i}", f"encoder.layer.{i}."
            for mod, name in (("query", "attention.self.query"), ("key", "attention.self.key"),
                              ("value", "attention.self.value"), ("out", "attention.output.dense"),
                              ("attn_norm", "attention.output.LayerNorm"), ("ffn_norm", "output.LayerNorm")):
                self._map(f"{p}.{mod}", {"weight": q + name + ".weight", "bias": q + name + ".bias"})
            self._map(f"{p}.ffn", layer.ffn.ir_names())
        self._load(ir)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                return_ffn: bool = False):
        """Last hidden state ``[B, T, d]`` (and the FFN activations ``[B, T, n_ff]`` per layer)."""
        B, T = input_ids.shape
        if T > self.spec.max_positions:
            raise ValueError(f"sequence length {T} exceeds max_positions {self.spec.max_positions}")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask != 0
        x = self.word(input_ids) + self.position.weight[:T] + self.token_type.weight[0]
        x = self.emb_norm(x)
        allowed = mask[:, None, None, :]
        hs = []
        for layer in self.layers:
            x, h = layer(x, allowed)
            hs.append(h)
        return (x, hs) if return_ffn else x

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
              return_ffn: bool = False):
        """Mean over real tokens of the last hidden state, L2-normalised: ``[B, d]``."""
        out = self.forward(input_ids, attention_mask, return_ffn=return_ffn)
        x, hs = out if return_ffn else (out, None)
        e = pool(x, attention_mask)
        return (e, hs) if return_ffn else e


def pool(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """sentence-transformers mean pooling + L2 normalisation of ``x [B, T, d]``."""
    m = torch.ones(x.shape[:2], dtype=x.dtype) if attention_mask is None else (attention_mask != 0).to(x.dtype)
    pooled = torch.einsum("btd,bt->bd", x, m) / m.sum(1, keepdim=True).clamp_min(1e-9)
    return pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * (offset + weight)`` (Gemma's offset: 1)."""

    def __init__(self, d: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + self.offset if self.offset else self.weight
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * w


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x cos + rotate_half(x) sin`` over the first ``cos.shape[-1]`` dimensions of each
    head ``x [..., hd]``; the rest pass unchanged (as the reference's ``apply_rope``)."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    return torch.cat([rot * cos + torch.cat([-rot[..., half:], rot[..., :half]], dim=-1) * sin, rest], dim=-1)


class LlamaLayer(nn.Module):
    def __init__(self, spec, block: FFNBlock, n_ff: int) -> None:
        super().__init__()
        d, hd, bias = spec.hidden_size, spec.head_dim, spec.attention_bias
        self.heads, self.kv_heads = spec.num_heads, spec.num_kv_heads
        eps, off = spec.norm_eps, spec.norm_offset
        self.attn_norm = RMSNorm(d, eps, off)
        self.q = nn.Linear(d, self.heads * hd, bias=bias)
        self.k = nn.Linear(d, self.kv_heads * hd, bias=bias)
        self.v = nn.Linear(d, self.kv_heads * hd, bias=bias)
        self.o = nn.Linear(self.heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, eps, off) if spec.qk_norm else None  # per head (Qwen3, Gemma 3)
        self.k_norm = RMSNorm(hd, eps, off) if spec.qk_norm else None
        self.ffn_norm = RMSNorm(d, eps, off)
        # Gemma 3's sandwich norms of the attention's and the FFN's outputs
        self.attn_out_norm = RMSNorm(d, eps, off) if spec.sandwich_norms else None
        self.ffn_out_norm = RMSNorm(d, eps, off) if spec.sandwich_norms else None
        self.ffn = FFN(block, d, n_ff)
        self.scale, self.residual = spec.attention_scale, spec.residual_multiplier  # Granite's scalars
        self.softcap = spec.attn_logit_softcapping  # Gemma 2

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        a = self.attn_norm(x)
        q = self.q(a).view(B, T, self.heads, -1).transpose(1, 2)
        k = self.k(a).view(B, T, self.kv_heads, -1).transpose(1, 2)
        v = self.v(a).view(B, T, self.kv_heads, -1).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        ctx = _attention(q, k, v, allowed, self.scale, self.softcap).transpose(1, 2).reshape(B, T, -1)
        a = self.o(ctx)
        x = x + (a if self.attn_out_norm is None else self.attn_out_norm(a)) * self.residual
        y, h = self.ffn(self.ffn_norm(x))
        return x + (y if self.ffn_out_norm is None else self.ffn_out_norm(y)) * self.residual, h


class LlamaTorch(TorchModel):
    """Llama / Mistral / Qwen2 / Qwen3 / Phi-3 / Granite decoder twin (``*ForCausalLM``)."""

    def __init__(self, ir: ModelIR) -> None:
        super().__init__(ir)
        s = ir.spec
        if s.rope_theta is None:
            raise ValueError("the IR's spec has no rope_theta")
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        blocks = {b.layer: b for b in ir.blocks}
        self.layers = nn.ModuleList(LlamaLayer(s, blocks[i], ir.store.shape(blocks[i].up)[0])
                                    for i in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.norm_eps, s.norm_offset)
        self.param_names.update({"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"})
        if "lm_head.weight" in ir.store:
            self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)
            self.param_names["lm_head.weight"] = "lm_head.weight"
        elif s.tie_word_embeddings:
            self.lm_head = None  # tied: logits use embed_tokens.weight
        else:
            raise ValueError("the IR has no lm_head.weight and its embeddings are not tied")
        for i, layer in enumerate(self.layers):
            p, q = f"layers.{i}", f"model.layers.{i}."
            norms = LayerNorms.of(s, i)
            for module, name in (("attn_norm", norms.attn_in), ("ffn_norm", norms.ffn_in),
                                 ("attn_out_norm", norms.attn_out), ("ffn_out_norm", norms.ffn_out)):
                if name:
                    self.param_names[f"{p}.{module}.weight"] = name
            for m in ("q", "k", "v", "o"):
                self.param_names[f"{p}.{m}.weight"] = f"{q}self_attn.{m}_proj.weight"
                if m != "o" and s.attention_bias:
                    self.param_names[f"{p}.{m}.bias"] = f"{q}self_attn.{m}_proj.bias"
            if s.qk_norm:
                for m in ("q", "k"):
                    self.param_names[f"{p}.{m}_norm.weight"] = f"{q}self_attn.{m}_norm.weight"
            self._map(f"{p}.ffn", layer.ffn.ir_names())
        self._load(ir)
        self._ropes = Rope.per_layer(s)
        self._rope: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def rope(self, T: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's ``cos, sin [T, rotary dim]``, computed exactly as the reference does."""
        if T not in self._rope:
            self._rope[T] = [(torch.from_numpy(c), torch.from_numpy(s)) for c, s in
                             layer_tables(self._ropes, np.arange(T))]
        return self._rope[T]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                return_ffn: bool = False):
        """Logits ``[B, T, V]`` (and the FFN activations ``[B, T, n_ff]`` per layer)."""
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask != 0
        s = self.spec
        allowed = {w: torch.from_numpy(causal_mask(np.arange(T), T, w))[None, None] & mask[:, None, None, :]
                   for w in {s.window(i) for i in range(s.num_layers)}}
        tables = self.rope(T)
        x = self.embed_tokens(input_ids) * s.embedding_multiplier
        hs = []
        for i, layer in enumerate(self.layers):
            x, h = layer(x, *tables[i], allowed[s.window(i)])
            hs.append(h)
        x = self.norm(x)
        logits = F.linear(x, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)
        logits = logits / self.spec.logits_scaling
        if s.final_logit_softcapping is not None:
            logits = torch.tanh(logits / s.final_logit_softcapping) * s.final_logit_softcapping
        return (logits, hs) if return_ffn else logits


FAMILIES: dict[str, type[TorchModel]] = {"bert": BertTorch, "llama": LlamaTorch}


def build_torch_model(ir: ModelIR) -> TorchModel:
    """The torch twin of ``ir`` (float32, CPU), parameters copied from ``ir.store``."""
    try:
        cls = FAMILIES[ir.spec.family]
    except KeyError:
        raise ValueError(f"no torch model for family {ir.spec.family!r} (known: {', '.join(sorted(FAMILIES))})") from None
    with torch.random.fork_rng(devices=[]):  # nn.Linear's throwaway init must not consume the caller's RNG
        return cls(ir)


def to_ir(module: TorchModel, ir: ModelIR, *, changed_only: bool = False) -> ModelIR:
    """``ir.evolve()`` with the module's parameters written into the store as float32
    overlays under their IR names (tied embeddings are one tensor). ``changed_only``
    skips parameters bit-identical to the tensor ``ir`` already holds (they keep their
    file reference). The returned IR has no ONNX graph (it no longer matches)."""
    new = ir.evolve()
    for path, p in module.named_parameters():
        name = module.param_names[path]
        arr = p.detach().cpu().numpy().astype(np.float32, copy=True)
        if changed_only and name in ir.store:
            old = ir.store.get_f32(name)
            if old.shape == arr.shape and np.array_equal(np.ascontiguousarray(old).view(np.uint32), arr.view(np.uint32)):
                continue
        new.store.set(name, arr)
    new.graph = None
    return new


__all__ = ["BertTorch", "FFN", "LlamaTorch", "TORCH_ACTIVATIONS", "TorchModel", "build_torch_model", "pool",
           "register_torch_activation", "to_ir"]
