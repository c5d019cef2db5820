"""Encoder runtime (``bert`` family, e.g. all-MiniLM-L6-v2): sentence embeddings.

The forward pass mirrors :class:`~.reference.bert.BertEncoder` (embeddings + LayerNorm,
post-norm layers, bidirectional attention with padding keys masked) on the artifact's
weights; each layer's FFN runs on the real (non-padding) tokens of the batch through
:class:`~.runtime_load.FFNRunner` (``LayerKernels.prefill``); the LayerNorms, with the
residual added, and the attention softmax are Numba kernels (``add_layer_norm_rows``:
13 LayerNorms took 15 ms of a 180 ms batch of 8 x 128 tokens in numpy, 4 ms in the
kernel; ``softmax_rows``: one pass per row, 22 -> 14 ms). Embeddings are the mean
of the last hidden states over real tokens, L2-normalised: the pooling of
sentence-transformers' all-MiniLM-L6-v2. Text is tokenized with the ``tokenizer.json``
carried in the artifact (special tokens added, truncated to ``max_length``).

Threads: a batch of at least :data:`SPLIT_MIN_TOKENS` real tokens per core is split
into groups of whole sequences, one per core, each run in its own thread with BLAS and
the Numba kernels on one thread (the kernels release the GIL; no layer with a predictor,
whose buffers are shared). One batch with BLAS owning the cores runs its sgemm calls at
the cores' pace but everything between them (attention, softmax, LayerNorms, the
activations' Q8_0 rounding) on one core. all-MiniLM-L6-v2 demo artifact, 2 cores, whole
-> split, ms a batch (best of 15): 8 x 128 tokens 118.7 -> 94.7, 2 x 128 38.5 -> 29.7;
at 64 tokens a core 2 x 64 19.6 -> 16.6 and 8 x 16 18.6 -> 16.0, but ``sparseforge bench``
(best of 5) then read 8 x 16 anywhere from 0.43x to 0.62x onnxruntime against a steady
0.58x whole: the threads wait for each other's GIL between many small calls, and more so
the smaller the calls (2 x 16: 9.5 -> 15.9 ms), hence the threshold. Smaller batches run
whole (:func:`~.runtime_load.encoder_thread_owner`).
"""
from __future__ import annotations

import numba
import numpy as np

from sparseforge.kernels.attention import add_layer_norm_rows, softmax_rows

from .runtime_load import FFNRunner, LoadedModel, blas_threads, encoder_thread_owner, in_threads

_NEG = np.float32(np.finfo(np.float32).min)
_NO_ROWS = np.zeros((0, 0), np.float32)
SPLIT_MIN_TOKENS = 128
"""Real tokens per core below which a batch is not split across threads (module docstring)."""


def split_sequences(tokens: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """At most ``parts`` consecutive, non-empty ranges ``(lo, hi)`` of sequences whose
    real-token counts ``tokens [B]`` add up to about equal shares (each range ends where
    the running total first reaches its share of the whole)."""
    B = len(tokens)
    parts = max(1, min(parts, B))
    total = np.cumsum(tokens)
    ranges, lo = [], 0
    for k in range(1, parts):
        hi = int(np.searchsorted(total, total[-1] * k / parts)) + 1
        hi = min(max(hi, lo + 1), B - (parts - k))
        ranges.append((lo, hi))
        lo = hi
    ranges.append((lo, B))
    return ranges


class EncoderRuntime:
    """Embeddings of an encoder artifact in one FFN ``mode``."""

    def __init__(self, model: LoadedModel, mode: str = "sparse", max_length: int | None = None) -> None:
        if model.spec.causal:
            raise ValueError("EncoderRuntime needs an encoder (bert-family) artifact")
        self.model = model
        self.spec = model.spec
        self.ffn = FFNRunner(model, mode)
        self.max_length = min(max_length or self.spec.max_positions, self.spec.max_positions)

    @property
    def mode(self) -> str:
        return self.ffn.mode

    def _lin(self, x: np.ndarray, prefix: str) -> np.ndarray:
        y = self.model.linear(prefix + ".weight").matmul(x)
        y += self.model.vector(prefix + ".bias")
        return y

    def _ln(self, x: np.ndarray, prefix: str, residual: np.ndarray | None = None) -> np.ndarray:
        """LayerNorm ``prefix`` of ``x (+ residual)`` ``[rows, d]`` (the Numba kernel)."""
        x = np.ascontiguousarray(x, np.float32)
        r = _NO_ROWS if residual is None else np.ascontiguousarray(residual, np.float32)
        out = np.empty_like(x)
        add_layer_norm_rows(x, r, self.model.vector(prefix + ".weight"), self.model.vector(prefix + ".bias"),
                            self.spec.norm_eps, out)
        return out

    def hidden_states(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Last hidden states ``[B, T, d]`` of ``input_ids [B, T]``."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        B, T = ids.shape
        s = self.spec
        if T > s.max_positions:
            raise ValueError(f"sequence length {T} exceeds max_positions {s.max_positions}")
        if ids.size and (ids.min() < 0 or ids.max() >= s.vocab_size):
            raise ValueError(f"token ids must be in [0, {s.vocab_size})")
        mask = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask) != 0
        ranges = self._split(mask)
        if len(ranges) == 1:
            with encoder_thread_owner(ids.size):
                return self._hidden_states(ids, mask, self.ffn)
        runners = self.ffn.parts(len(ranges))

        def part(k: int) -> np.ndarray:
            lo, hi = ranges[k]
            return self._hidden_states(ids[lo:hi], mask[lo:hi], runners[k])

        out = np.concatenate(in_threads(part, len(ranges)))
        self.ffn.merge_parts()
        return out

    def _split(self, mask: np.ndarray) -> list[tuple[int, int]]:
        """The sequence ranges a batch with ``mask [B, T]`` runs as, one per thread
        (module docstring); one range: the batch runs whole."""
        if "predictor" in self.ffn.modes:
            return [(0, len(mask))]
        tokens = mask.sum(axis=1)
        cores = max(numba.get_num_threads(), blas_threads())
        return split_sequences(tokens, min(cores, int(tokens.sum()) // SPLIT_MIN_TOKENS))

    def _hidden_states(self, ids: np.ndarray, mask: np.ndarray, ffn: FFNRunner) -> np.ndarray:
        B, T = ids.shape
        s = self.spec
        valid = mask.reshape(-1)
        all_valid = bool(valid.all())  # no padding: the FFNs take x as it is (no gather, no scatter)
        H, hd, d = s.num_heads, s.head_dim, s.hidden_size
        m = self.model
        x = m.linear("embeddings.word_embeddings.weight").take(ids.reshape(-1)).reshape(B, T, d)
        x += m.linear("embeddings.position_embeddings.weight").take(np.arange(T))[None]
        x += m.linear("embeddings.token_type_embeddings.weight").take(np.zeros(1, np.int64))[None]
        x = self._ln(x.reshape(B * T, d), "embeddings.LayerNorm")
        key_bias = np.where(mask, np.float32(0), _NEG)[:, None, None, :]  # padding keys -> exp 0
        scale = np.float32(1.0 / np.sqrt(hd))
        for i in range(s.num_layers):
            p = f"encoder.layer.{i}."

            def heads(t: np.ndarray) -> np.ndarray:
                return t.reshape(B, T, H, hd).transpose(0, 2, 1, 3)

            q = heads(self._lin(x, p + "attention.self.query"))
            k = heads(self._lin(x, p + "attention.self.key"))
            v = heads(self._lin(x, p + "attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2)  # [B, H, T, T], then in place: no temporaries
            scores *= scale
            scores += key_bias
            probs = softmax_rows(scores.reshape(-1, T)).reshape(scores.shape)
            ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(B * T, H * hd)
            x = self._ln(self._lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm", x)
            if all_valid:
                y = ffn.many(i, x)
            else:
                y = np.zeros_like(x)
                y[valid] = ffn.many(i, x[valid])
            x = self._ln(y, p + "output.LayerNorm", x)
        return x.reshape(B, T, d)

    def embed_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                  normalize: bool = True) -> np.ndarray:
        """Sentence embeddings ``[B, d]`` float32 of token ids (mean pooling over real tokens)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones(ids.shape, np.float32) if attention_mask is None else \
            (np.asarray(attention_mask) != 0).astype(np.float32)
        h = self.hidden_states(ids, mask).astype(np.float64)
        pooled = np.einsum("btd,bt->bd", h, mask) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        if normalize:
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled.astype(np.float32)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask) [B, T]`` of ``texts`` (special tokens, truncation to ``max_length``, right padding)."""
        tok = self.model.require_tokenizer()
        tok.no_padding()
        tok.enable_truncation(self.max_length)  # keeps the special tokens, as transformers does
        rows = [list(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=True)]
        T = max(1, max(len(r) for r in rows))
        ids = np.full((len(rows), T), self.spec.pad_token_id or 0, np.int64)
        mask = np.zeros((len(rows), T), np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return ids, mask

    def embed(self, texts: str | list[str], batch_size: int = 16, normalize: bool = True) -> np.ndarray:
        """Sentence embeddings ``[N, d]`` of ``texts`` (a string gives ``[1, d]``)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.tokenize(texts[i: i + batch_size])
            out.append(self.embed_ids(ids, mask, normalize))
        return np.concatenate(out) if out else np.zeros((0, self.spec.hidden_size), np.float32)
