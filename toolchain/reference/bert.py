"""Reference BERT encoder (``BertModel``; e.g. all-MiniLM-L6-v2) in numpy float32.

Embeddings (word + absolute position + token type) -> LayerNorm -> ``num_layers`` post-norm
layers ``x = LN(x + Attn(x)); x = LN(x + FFN(x))``. Attention is bidirectional; keys
at padding positions (``attention_mask == 0``) are excluded, as Hugging Face's extended
mask does. Outputs at padding positions are computed like any other (the same as
transformers) but carry no meaning.

Weights are read from the IR's tensor store on every call (memory maps).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..ir import FFNBlock, ModelIR
from ..tensors import TensorStore
from .ffn import Capture, ffn_forward

FFNFn = Callable[..., np.ndarray]
"""``ffn(store, block, x [tokens, d], *, capture=None) -> y [tokens, d]`` (like
:func:`~.ffn.ffn_forward`, which is the default)."""

_NEG = np.float32(np.finfo(np.float32).min)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis (biased variance), float32."""
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    return xc / np.sqrt(var + np.float32(eps)) * weight + bias


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32, with max subtraction (in place on ``scores``)."""
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def valid_rows_capture(capture: Capture | None, valid: np.ndarray | None) -> Capture | None:
    """Wrap ``capture`` so it only sees the rows (tokens) where ``valid`` (flat bool) is set."""
    if capture is None or valid is None or valid.all():
        return capture

    def wrapped(layer: int, ffn_input: np.ndarray, activation: np.ndarray) -> None:
        capture(layer, ffn_input[valid], activation[valid])

    return wrapped


class BertEncoder:
    """Numpy forward pass of a ``bert``-family IR.

    ``ffn`` replaces the FFN block computation (default :func:`~.ffn.ffn_forward`), so a
    transformed FFN (sparse kernel, pruned weights) can be run inside the reference model.
    """

    def __init__(self, ir: ModelIR, *, ffn: FFNFn = ffn_forward) -> None:
        if ir.spec.family != "bert":
            raise ValueError(f"BertEncoder needs a bert-family IR, not {ir.spec.family!r}")
        self.ir = ir
        self.spec = ir.spec
        self.store: TensorStore = ir.store
        self.blocks: dict[int, FFNBlock] = {b.layer: b for b in ir.blocks}
        self.ffn = ffn

    def _w(self, name: str) -> np.ndarray:
        return self.store.get_f32(name)

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        y = x @ self._w(prefix + ".weight").T
        y += self._w(prefix + ".bias")
        return y

    def _ln(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return layer_norm(x, self._w(prefix + ".weight"), self._w(prefix + ".bias"), self.spec.norm_eps)

    def embeddings(self, input_ids: np.ndarray, token_type_ids: np.ndarray | None = None) -> np.ndarray:
        """Normalised embeddings ``[B, T, d]`` of ``input_ids [B, T]``."""
        ids = np.asarray(input_ids, dtype=np.int64)
        B, T = ids.shape
        if T > self.spec.max_positions:
            raise ValueError(f"sequence length {T} exceeds max_positions {self.spec.max_positions}")
        if np.any(ids < 0) or np.any(ids >= self.spec.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.spec.vocab_size})")
        tt = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, dtype=np.int64)
        x = self._w("embeddings.word_embeddings.weight")[ids]
        x += self._w("embeddings.position_embeddings.weight")[:T][None]
        x += self._w("embeddings.token_type_embeddings.weight")[tt]
        return self._ln(x, "embeddings.LayerNorm")

    def hidden_states(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                      token_type_ids: np.ndarray | None = None, *,
                      capture: Capture | None = None) -> np.ndarray:
        """Last hidden state ``[B, T, d]`` float32 of ``input_ids [B, T]`` (int).

        ``attention_mask [B, T]`` (1 = token, 0 = padding; default all ones);
        ``token_type_ids [B, T]`` (default zeros). ``capture`` is called once per layer
        with the FFN input and activation of the non-padding tokens only, flattened to
        ``[tokens, ...]`` in batch-major order.
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        B, T = ids.shape
        mask = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask) != 0
        if mask.shape != (B, T):
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        cap = valid_rows_capture(capture, mask.reshape(-1))
        H, hd, d = self.spec.num_heads, self.spec.head_dim, self.spec.hidden_size
        key_ok = mask[:, None, None, :]  # [B, 1, 1, T_k]
        scale = np.float32(1.0 / np.sqrt(hd))

        x = self.embeddings(ids, token_type_ids).reshape(B * T, d)
        for i in range(self.spec.num_layers):
            p = f"encoder.layer.{i}."

            def heads(t: np.ndarray) -> np.ndarray:  # [B*T, H*hd] -> [B, H, T, hd]
                return t.reshape(B, T, H, hd).transpose(0, 2, 1, 3)

            q = heads(self._linear(x, p + "attention.self.query"))
            k = heads(self._linear(x, p + "attention.self.key"))
            v = heads(self._linear(x, p + "attention.self.value"))
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale  # [B, H, T, T]
            scores = np.where(key_ok, scores, _NEG)
            ctx = softmax(scores) @ v  # [B, H, T, hd]
            ctx = ctx.transpose(0, 2, 1, 3).reshape(B * T, H * hd)
            x = self._ln(self._linear(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
            y = self.ffn(self.store, self.blocks[i], x, capture=cap)
            x = self._ln(y + x, p + "output.LayerNorm")
        return x.reshape(B, T, d)

    __call__ = hidden_states

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, normalize: bool = True,
              token_type_ids: np.ndarray | None = None, *, capture: Capture | None = None) -> np.ndarray:
        """Sentence embeddings ``[B, d]``: mean of the last hidden states over non-padding
        tokens, then (``normalize``) divided by their L2 norm (sentence-transformers
        all-MiniLM-L6-v2 pooling)."""
        ids = np.asarray(input_ids)
        mask = np.ones(ids.shape, np.float32) if attention_mask is None else (np.asarray(attention_mask) != 0).astype(np.float32)
        h = self.hidden_states(ids, mask, token_type_ids, capture=capture)
        summed = np.einsum("btd,bt->bd", h, mask)
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), np.float32(1e-9))
        if normalize:
            norm = np.sqrt(np.sum(pooled * pooled, axis=1, keepdims=True))
            pooled = pooled / np.maximum(norm, np.float32(1e-12))
        return pooled.astype(np.float32)
