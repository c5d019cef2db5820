"""Reference Llama-style decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3) in numpy float32.

Token embedding -> ``num_layers`` pre-norm layers
``x = x + Attn(RMSNorm(x)); x = x + FFN(RMSNorm(x))`` -> RMSNorm -> LM head.
Attention is causal (within ``spec.sliding_window`` positions when set: :func:`causal_mask`)
multi-head with grouped key/value heads (GQA), rotary position embeddings (Hugging Face
``rotate_half`` convention, base ``spec.rope_theta``, scaled as ``spec.rope_scaling``
says: :class:`~.rope.Rope`), optional q/k/v biases (Qwen2) and per-head query/key
RMSNorms before RoPE (Qwen3), Granite's scalars (``spec.embedding_multiplier`` and the
rest), and Gemma's norms, sliding layers and soft-capping. The LM head is ``lm_head.weight``, or the token embedding when the embeddings are
tied and the store has no ``lm_head.weight``.

Positions of the tokens passed to :meth:`LlamaDecoder.forward` continue from the length
of the :class:`KVCache`, so ``forward(prefix, cache)`` then ``forward(next, cache)``
equals ``forward(prefix + next)``. Weights are read from the IR's store on every call.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir import ArchSpec, FFNBlock, ModelIR
from ..tensors import TensorStore
from .bert import FFNFn, softmax, valid_rows_capture
from .ffn import Capture, ffn_forward
from .rope import Rope, apply_rope, layer_tables

_NEG = np.float32(np.finfo(np.float32).min)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, float32."""
    var = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(var + np.float32(eps)) * weight


@dataclass(frozen=True)
class LayerNorms:
    """The RMSNorm weight names of one decoder layer: the attention's input, the FFN's
    input and, with ``spec.sandwich_norms`` (Gemma), the attention's and the FFN's outputs
    before their residual adds (else None)."""

    attn_in: str
    ffn_in: str
    attn_out: str | None = None
    ffn_out: str | None = None

    @classmethod
    def of(cls, spec: ArchSpec, layer: int) -> "LayerNorms":
        p = f"model.layers.{layer}."
        if spec.sandwich_norms:
            return cls(p + "input_layernorm.weight", p + "pre_feedforward_layernorm.weight",
                       p + "post_attention_layernorm.weight", p + "post_feedforward_layernorm.weight")
        return cls(p + "input_layernorm.weight", p + "post_attention_layernorm.weight")


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """``cap tanh(x / cap)`` (Gemma 2's soft-capping), or ``x`` when ``cap`` is None."""
    return x if cap is None else (np.tanh(x / np.float32(cap)) * np.float32(cap)).astype(np.float32)


def causal_mask(positions: np.ndarray, length: int, window: int | None) -> np.ndarray:
    """``allowed [T, length]`` (bool): the query at ``positions[i]`` may attend the key at
    position ``j`` when ``j <= positions[i]`` and, with a sliding ``window``,
    ``j > positions[i] - window`` (the ``window`` latest positions, its own included, as
    transformers' sliding-window mask)."""
    keys = np.arange(length)[None, :]
    query = np.asarray(positions)[:, None]
    allowed = keys <= query
    return allowed if window is None else allowed & (keys > query - window)


class KVCache:
    """Per-layer keys and values ``[B, kv_heads, T_past, head_dim]`` (float32, after RoPE),
    plus which past positions are real tokens (``mask [B, T_past]``).

    Storage grows geometrically, or is preallocated for ``max_length`` positions (then
    appending past it raises).
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                 max_length: int | None = None) -> None:
        self.num_layers, self.batch, self.kv_heads, self.head_dim = num_layers, batch, kv_heads, head_dim
        self.max_length = max_length
        cap = max_length if max_length is not None else 16
        self._k = [np.zeros((batch, kv_heads, cap, head_dim), np.float32) for _ in range(num_layers)]
        self._v = [np.zeros((batch, kv_heads, cap, head_dim), np.float32) for _ in range(num_layers)]
        self._lengths = [0] * num_layers
        self._mask = np.zeros((batch, cap), bool)
        self._mask_len = 0

    @property
    def length(self) -> int:
        """Number of cached positions (of every layer, after a complete forward)."""
        return min(self._lengths)

    def keys(self, layer: int) -> np.ndarray:
        return self._k[layer][:, :, : self._lengths[layer]]

    def values(self, layer: int) -> np.ndarray:
        return self._v[layer][:, :, : self._lengths[layer]]

    @property
    def mask(self) -> np.ndarray:
        """``[B, T_past]`` bool: True where the cached position is a real token."""
        return self._mask[:, : self._mask_len]

    def _capacity_for(self, arr: np.ndarray, need: int, axis: int) -> np.ndarray:
        cap = arr.shape[axis]
        if need <= cap:
            return arr
        if self.max_length is not None:
            raise ValueError(f"KV cache is full: {need} positions > max_length {self.max_length}")
        new_cap = max(need, 2 * cap)
        shape = list(arr.shape)
        shape[axis] = new_cap
        new = np.zeros(shape, arr.dtype)
        idx = [slice(None)] * arr.ndim
        idx[axis] = slice(0, cap)
        new[tuple(idx)] = arr
        return new

    def reserve(self, layer: int, t: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
        """Extend ``layer`` by ``t`` positions for the caller to fill; returns that layer's
        storage ``k, v [B, kv_heads, capacity, head_dim]`` (replaced when the cache grows)
        and the first new position ``T_past``."""
        n = self._lengths[layer]
        self._k[layer] = self._capacity_for(self._k[layer], n + t, 2)
        self._v[layer] = self._capacity_for(self._v[layer], n + t, 2)
        self._lengths[layer] = n + t
        return self._k[layer], self._v[layer], n

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append ``k, v [B, kv_heads, T_new, head_dim]`` to ``layer``; returns that
        layer's full keys and values ``[B, kv_heads, T_past + T_new, head_dim]``."""
        t = k.shape[2]
        ks, vs, n = self.reserve(layer, t)
        ks[:, :, n: n + t] = k
        vs[:, :, n: n + t] = v
        return self.keys(layer), self.values(layer)

    def append_mask(self, mask: np.ndarray) -> np.ndarray:
        """Append ``mask [B, T_new]`` (bool); returns the full ``[B, T_past + T_new]``."""
        n, t = self._mask_len, mask.shape[1]
        self._mask = self._capacity_for(self._mask, n + t, 1)
        self._mask[:, n: n + t] = mask
        self._mask_len = n + t
        return self.mask


class LlamaDecoder:
    """Numpy forward pass of a ``llama``-family IR (Llama, Mistral, Qwen2, Qwen3, Phi-3 specs).

    ``ffn`` replaces the FFN block computation (default :func:`~.ffn.ffn_forward`).
    """

    def __init__(self, ir: ModelIR, *, ffn: FFNFn = ffn_forward) -> None:
        if ir.spec.family != "llama":
            raise ValueError(f"LlamaDecoder needs a llama-family IR, not {ir.spec.family!r}")
        spec = ir.spec
        if spec.rope_theta is None:
            raise ValueError("the IR's spec has no rope_theta")
        self.ir = ir
        self.spec = spec
        self.store: TensorStore = ir.store
        self.blocks: dict[int, FFNBlock] = {b.layer: b for b in ir.blocks}
        self.ffn = ffn
        self.ropes = Rope.per_layer(spec)
        if "lm_head.weight" in self.store:
            self.lm_head = "lm_head.weight"
        elif spec.tie_word_embeddings:
            self.lm_head = "model.embed_tokens.weight"
        else:
            raise ValueError("the IR has no lm_head.weight and its embeddings are not tied")

    def _w(self, name: str) -> np.ndarray:
        return self.store.get_f32(name)

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        """RMSNorm of ``x`` with the weight ``name`` (plus ``spec.norm_offset``)."""
        w = self._w(name)
        return rms_norm(x, w + np.float32(self.spec.norm_offset) if self.spec.norm_offset else w, self.spec.norm_eps)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        """Embedding rows of ``ids`` as float32 (only those rows are read and converted)."""
        table = self.store.get("model.embed_tokens.weight")
        return np.asarray(table[ids], dtype=np.float32)

    def _proj(self, x: np.ndarray, prefix: str) -> np.ndarray:
        y = x @ self._w(prefix + ".weight").T
        bias = prefix + ".bias"
        if bias in self.store:
            y += self._w(bias)
        return y

    def new_cache(self, batch: int = 1, max_length: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for this model."""
        s = self.spec
        return KVCache(s.num_layers, batch, s.num_kv_heads, s.head_dim, max_length)

    def forward(self, input_ids: np.ndarray, cache: KVCache | None = None,
                attention_mask: np.ndarray | None = None, *, capture: Capture | None = None,
                head: bool = True) -> np.ndarray:
        """Logits ``[B, T, vocab]`` float32 of ``input_ids [B, T]`` (int); without ``head``,
        the final normalised hidden states ``[B, T, d]`` (the LM head's input).

        With ``cache``, the tokens are at positions ``cache.length ...`` and attend to the
        cached keys too; the cache is extended with their keys and values.
        ``attention_mask`` (1 = token, 0 = padding) is ``[B, T]`` for these tokens or
        ``[B, T_past + T]``; padding keys are never attended to (right padding; outputs at
        padding positions carry no meaning). ``capture`` sees the FFN inputs and
        activations of the non-padding tokens, flattened batch-major.
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        s = self.spec
        B, T = ids.shape
        if np.any(ids < 0) or np.any(ids >= s.vocab_size):
            raise ValueError(f"token ids must be in [0, {s.vocab_size})")
        past = 0 if cache is None else cache.length
        if cache is not None and cache.batch != B:
            raise ValueError(f"cache batch {cache.batch} != input batch {B}")
        if attention_mask is None:
            new_mask = np.ones((B, T), bool)
            full_mask = None
        else:
            m = np.asarray(attention_mask) != 0
            if m.shape == (B, past + T):
                new_mask = m[:, past:]
                full_mask = m
            elif m.shape == (B, T):
                new_mask = m
                full_mask = None
            else:
                raise ValueError(f"attention_mask shape {m.shape} is neither {(B, T)} nor {(B, past + T)}")
        if cache is not None:
            cached = cache.append_mask(new_mask)
            key_mask = cached if full_mask is None else full_mask
        else:
            key_mask = new_mask if full_mask is None else full_mask
        cap = valid_rows_capture(capture, new_mask.reshape(-1))

        H, KV, hd, d = s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size
        G = H // KV
        positions = np.arange(past, past + T)
        tables = layer_tables(self.ropes, positions)
        # allowed[w][b, 0, 0, i, j]: query i (position past+i) may attend to key j, with window w
        allowed = {w: (causal_mask(positions, past + T, w)[None] & key_mask[:, None, :])[:, None, None]
                   for w in {s.window(i) for i in range(s.num_layers)}}  # [B, 1, 1, T, S]
        scale = np.float32(s.attention_scale)
        residual = np.float32(s.residual_multiplier)

        x = self._embed(ids).reshape(B * T, d)
        if s.embedding_multiplier != 1:
            x = x * np.float32(s.embedding_multiplier)
        for i in range(s.num_layers):
            p, norms = f"model.layers.{i}.", LayerNorms.of(s, i)
            h = self._norm(x, norms.attn_in)
            q = self._proj(h, p + "self_attn.q_proj").reshape(B, T, H, hd).transpose(0, 2, 1, 3)
            k = self._proj(h, p + "self_attn.k_proj").reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
            if s.qk_norm:  # each head's query and key, over head_dim (Qwen3, Gemma 3)
                q = self._norm(q, p + "self_attn.q_norm.weight")
                k = self._norm(k, p + "self_attn.k_norm.weight")
            v = self._proj(h, p + "self_attn.v_proj").reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
            cos, sin = tables[i]
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
            if cache is not None:
                k, v = cache.append(i, k, v)
            S = k.shape[2]
            # group query heads by their kv head: [B, KV, G, T, hd] against k [B, KV, 1, S, hd]
            qg = q.reshape(B, KV, G, T, hd)
            scores = softcap((qg @ k[:, :, None].transpose(0, 1, 2, 4, 3)) * scale,
                             s.attn_logit_softcapping)  # [B, KV, G, T, S]
            scores = np.where(allowed[s.window(i)], scores, _NEG)
            ctx = softmax(scores) @ v[:, :, None]  # [B, KV, G, T, hd]
            ctx = ctx.reshape(B, H, T, hd).transpose(0, 2, 1, 3).reshape(B * T, H * hd)
            a = self._proj(ctx, p + "self_attn.o_proj")
            if norms.attn_out:  # Gemma: the output normalised before its residual add
                a = self._norm(a, norms.attn_out)
            x = x + a * residual
            y = self.ffn(self.store, self.blocks[i], self._norm(x, norms.ffn_in), capture=cap)
            if norms.ffn_out:
                y = self._norm(y, norms.ffn_out)
            x = x + y * residual
            assert S == past + T
        x = self._norm(x, "model.norm.weight")
        if not head:
            return x.reshape(B, T, -1)
        logits = x @ self._w(self.lm_head).T
        if s.logits_scaling != 1:
            logits = logits / np.float32(s.logits_scaling)
        return softcap(logits, s.final_logit_softcapping).reshape(B, T, -1)

    __call__ = forward

    def generate(self, prompt_ids, max_new_tokens: int, greedy: bool = True, *,
                 stop_at_eos: bool = True, rng: np.random.Generator | None = None,
                 temperature: float = 1.0) -> np.ndarray:
        """Continue one sequence: ``prompt_ids [T]`` (int) -> ``[T + n]`` int64, prompt
        included, ``n <= max_new_tokens``. ``greedy`` takes the argmax (like transformers'
        ``generate(do_sample=False)``), otherwise samples from ``softmax(logits /
        temperature)`` with ``rng``. Stops after an end-of-sequence token
        (``spec.eos_token_id``) when ``stop_at_eos``. Uses a KV cache."""
        prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if prompt.size == 0:
            raise ValueError("generate needs a non-empty prompt")
        eos = self.spec.eos_token_id
        eos_ids = set() if eos is None or not stop_at_eos else set(eos if isinstance(eos, list) else [eos])
        rng = rng if rng is not None else np.random.default_rng()
        cache = self.new_cache(1, prompt.size + max_new_tokens)
        out = list(prompt)
        step = prompt[None]
        for _ in range(max_new_tokens):
            logits = self.forward(step, cache)[0, -1].astype(np.float64)
            if greedy:
                tok = int(np.argmax(logits))
            else:
                z = logits / temperature
                pr = np.exp(z - z.max())
                tok = int(rng.choice(pr.size, p=pr / pr.sum()))
            out.append(tok)
            if tok in eos_ids:
                break
            step = np.array([[tok]], dtype=np.int64)
        return np.array(out, dtype=np.int64)
