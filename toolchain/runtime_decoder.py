"""Decoder runtime (``llama`` family: Llama, Mistral, Qwen2, Qwen3, Phi-3): logits and generation.

The forward pass mirrors :class:`~.reference.llama.LlamaDecoder` (pre-norm layers,
RoPE, grouped-query attention within the sliding window if the model has one, RMSNorm,
LM head or tied embeddings) for one sequence with a :class:`~.runtime_cache.DecoderCache`
(a sliding-window layer keeps only its window, in a ring; keys and values in float32 or,
with ``kv_cache="f16"``, float16: attention then reads them rounded to float16, cached or
not).
Attention projections and the LM head are the artifact's weights
(:class:`~.runtime_load.Linear`); FFNs go through :class:`~.runtime_load.FFNRunner`:
several tokens at once (the prompt: prefill) use
``LayerKernels.prefill``, one token (a decode step) ``forward(x, idx)`` /
``gate_first(x)``. A decode step's attention (after the q/k/v projections) and its
RMSNorms are Numba kernels (:mod:`sparseforge.kernels.attention`).

Threads: a decoder holds BLAS to one thread (:mod:`.runtime_load`), so a prompt chunk of
at least :data:`SPLIT_MIN_TOKENS` tokens per core is split into row ranges, one per core,
each run in a thread of its own with BLAS and the Numba kernels on one thread
(:func:`~.runtime_load.in_threads`): per layer, the projections of its rows, then (the
cache extended with every row's keys and values) its queries' attention, the output
projection and the FFN. 2 cores, prompt whole -> split: a random Gemma 3 270M-shaped f32
artifact (dense), 256 / 512 / 2048 tokens 0.74 -> 0.46 / 1.46 -> 0.83 / 6.46 -> 3.56 s;
TinyLlama-shaped Q4_0 (``benchmarks/synthetic_decode.py``), 512 tokens: predictor mode
4.17 -> 3.65 s (its layers' FFNs, whose predictor buffers are shared, run over all rows
after the parts, on the Numba threads), gate-first 10.5 -> 6.0 (6.36 -> 4.40 with its
gate masks, :meth:`~sparseforge.kernels.runtime.LayerKernels.gate_masks`), dense 10.4 -> 5.8; 256
tokens 1.63 -> 1.66 (predictor) and 3.09 -> 3.08 (dense); 128 tokens split in two: 0.71
-> 0.86 s (predictor), hence the threshold. The decode steps after run as fast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numba
import numpy as np

from sparseforge.kernels.attention import attention_step, rms_norm_into

from .errors import InputError
from .reference.bert import softmax
from .reference.llama import LayerNorms, causal_mask, rms_norm, softcap
from .reference.rope import Rope, apply_rope, layer_tables
from .runtime_cache import DecoderCache, check_kv_dtype, kv_rounded
from .runtime_load import FFNRunner, Linear, LoadedModel, blas_one_thread, in_threads
from .runtime_sampling import Sampler

_NEG = np.float32(np.finfo(np.float32).min)
#: tokens a prompt's layers run on at a time: attention scores of a chunk are
#: ``[heads, chunk, cached + chunk]`` float32, not ``[heads, T, T]``
PREFILL_CHUNK = 512
#: tokens per core below which a prompt chunk runs whole (:meth:`DecoderRuntime._prefill`)
SPLIT_MIN_TOKENS = 128


@dataclass
class _StepLayer:
    """A layer's weights as a decode step reads them, looked up once: the RMSNorm weights
    ``[d]`` (``spec.norm_offset`` added) of the attention's and the FFN's inputs, the q/k/v
    projections writing ``[q | k | v]`` into one buffer (their biases concatenated, or
    None), the output projection (bias or None), the per-head query/key RMSNorm weights,
    one row per query head then per key head ``[heads + kv_heads, head_dim]`` (Qwen3,
    Gemma 3; else None), and the norms of the attention's and the FFN's outputs (Gemma 3's
    sandwich norms; else None)."""

    input_norm: np.ndarray
    ffn_norm: np.ndarray
    qkv: Callable[[np.ndarray, np.ndarray], None]
    qkv_bias: np.ndarray | None
    o_proj: Linear
    o_bias: np.ndarray | None
    qk_norm: np.ndarray | None
    attn_out_norm: np.ndarray | None
    ffn_out_norm: np.ndarray | None


class DecoderRuntime:
    """Logits and generation of a decoder artifact in one FFN ``mode``."""

    def __init__(self, model: LoadedModel, mode: str = "sparse", kv_cache: str = "f32") -> None:
        if not model.spec.causal:
            raise ValueError("DecoderRuntime needs a decoder (llama-family) artifact")
        if model.spec.rope_theta is None:
            raise InputError(model.artifact.path, "the artifact's spec has no rope_theta")
        self.model = model
        self.spec = model.spec
        self.kv_cache = check_kv_dtype(kv_cache)
        self.ropes = Rope.per_layer(self.spec)
        self._offset_weights: dict[str, np.ndarray] = {}
        self.ffn = FFNRunner(model, mode)
        if model.has("lm_head.weight"):
            self.lm_head = "lm_head.weight"
        elif self.spec.tie_word_embeddings:
            self.lm_head = "model.embed_tokens.weight"
        else:
            raise InputError(model.artifact.path, "no lm_head.weight and the embeddings are not tied")
        self._steps: list[_StepLayer] | None = None  # made on the first decode step

    @property
    def mode(self) -> str:
        return self.ffn.mode

    def new_cache(self, max_length: int | None = None) -> DecoderCache:
        """An empty cache of the runtime's ``kv_cache`` type, for up to ``max_length``
        positions (allocated at once) or growing."""
        s = self.spec
        return DecoderCache([s.window(i) or 0 for i in range(s.num_layers)], s.num_kv_heads, s.head_dim, max_length,
                            self.kv_cache)

    def _proj(self, x: np.ndarray, prefix: str) -> np.ndarray:
        lin = self.model.linear(prefix + ".weight")
        y = lin.matvec(x[0])[None] if x.shape[0] == 1 else lin.matmul(x)
        if self.model.has(prefix + ".bias"):
            y += self.model.vector(prefix + ".bias")
        return y

    def _qkv(self, h: np.ndarray, prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The q, k, v projections ``[T, rows]`` of ``h [T, d]`` (a decode step groups them:
        :meth:`_qkv_into`)."""
        return tuple(self._proj(h, f"{prefix}{n}_proj") for n in "qkv")

    def _norm_weight(self, name: str) -> np.ndarray:
        """The RMSNorm weight ``name`` plus ``spec.norm_offset`` (Gemma's ``1 + weight``)."""
        if not self.spec.norm_offset:
            return self.model.vector(name)
        if name not in self._offset_weights:
            self._offset_weights[name] = self.model.vector(name) + np.float32(self.spec.norm_offset)
        return self._offset_weights[name]

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        """RMSNorm of ``x [T, d]`` with the weight ``name`` (one token: the Numba kernel)."""
        w = self._norm_weight(name)
        if x.shape[0] > 1:
            return rms_norm(x, w, self.spec.norm_eps)
        out = np.empty_like(x)
        rms_norm_into(x[0], w, self.spec.norm_eps, out[0])
        return out

    def forward(self, input_ids, cache: DecoderCache | None = None, all_logits: bool = False) -> np.ndarray:
        """Logits of one sequence's new tokens ``input_ids [T]``: ``[T, vocab]`` with
        ``all_logits``, else the last position's ``[vocab]``. With ``cache`` the tokens
        continue at position ``cache.length`` and the cache is extended. A long prompt
        runs :data:`PREFILL_CHUNK` tokens at a time (through a cache of its own if none is
        given), with the RoPE tables of the whole call."""
        with blas_one_thread():  # the prompt too: BLAS's spinning workers would slow the decode after it
            return self._forward(input_ids, cache, all_logits)

    def _forward(self, input_ids, cache: DecoderCache | None, all_logits: bool) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        s = self.spec
        T = ids.size
        if T == 0:
            raise ValueError("forward needs at least one token")
        if ids.min() < 0 or ids.max() >= s.vocab_size:
            raise ValueError(f"token ids must be in [0, {s.vocab_size})")
        if T == 1 and cache is not None:
            logits = self._decode_step(ids, cache)
            return logits[None] if all_logits else logits
        past = 0 if cache is None else cache.length
        positions = np.arange(past, past + T)
        tables = layer_tables(self.ropes, positions)  # the whole call's (LongRoPE, dynamic NTK: by its last position)
        if cache is None and T > PREFILL_CHUNK:
            cache = self.new_cache(T)
        hidden = []
        for a in range(0, T, PREFILL_CHUNK):
            b = min(a + PREFILL_CHUNK, T)
            x = self._prefill(ids[a:b], positions[a:b], [(cos[a:b], sin[a:b]) for cos, sin in tables], cache)
            if all_logits or b == T:
                hidden.append(x if all_logits else x[-1:])
        x = self._norm(np.concatenate(hidden) if len(hidden) > 1 else hidden[0], "model.norm.weight")
        head = self.model.linear(self.lm_head)
        logits = self._scaled(head.matvec(x[0])[None] if x.shape[0] == 1 else head.matmul(x))
        return logits if all_logits else logits[-1]

    def _prefill(self, ids: np.ndarray, positions: np.ndarray, tables: list[tuple[np.ndarray, np.ndarray]],
                 cache: DecoderCache | None) -> np.ndarray:
        """The last layer's output ``[T, d]`` (before the final norm) of tokens ``ids [T]``
        at consecutive ``positions [T]``, with each layer's ``cos, sin [T, dim]``, the
        cache (if any) extended: attention over the cached keys and these. The tokens are
        split into :meth:`_row_parts` run in threads of their own (:func:`in_threads`):
        each layer's projections, then (the cache extended) its attention, output
        projection and FFN, for the part's rows (a layer with a predictor runs its FFN
        over all rows after them, on the Numba threads: its buffers are shared)."""
        s = self.spec
        T, past = ids.size, int(positions[0])
        H, KV, hd = s.num_heads, s.num_kv_heads, s.head_dim
        parts = self._row_parts(T)
        runners = [self.ffn] if len(parts) == 1 else self.ffn.parts(len(parts))
        q, k, v = np.empty((H, T, hd), np.float32), np.empty((KV, T, hd), np.float32), np.empty((KV, T, hd), np.float32)
        masks = {}  # per window: the mask [1, 1, T, S] of the keys the cache gives (every layer alike)
        x = self._embed(ids)

        def run(part: Callable[[int, int, int], None]) -> None:
            if len(parts) == 1:
                part(0, 0, T)
            else:
                in_threads(lambda j: part(j, *parts[j]), len(parts))

        for i in range(s.num_layers):
            cos, sin = tables[i]
            run(lambda j, a, b: self._qkv_rows(i, x[a:b], cos[a:b], sin[a:b], q[:, a:b], k[:, a:b], v[:, a:b]))
            first = 0
            if cache is not None:
                keys, values, first = cache.extend(i, k, v)
            else:  # as a cache would store them
                keys, values = kv_rounded(k, self.kv_cache), kv_rounded(v, self.kv_cache)
            w = s.window(i)
            if w not in masks:
                masks[w] = causal_mask(positions, past + T, w)[None, None, :, first:]
            whole_ffn = len(parts) > 1 and self.ffn.modes[i] == "predictor"
            run(lambda j, a, b: self._attend_rows(i, x[a:b], q[:, a:b], keys, values, masks[w][:, :, a:b],
                                                  None if whole_ffn else runners[j]))
            if whole_ffn:
                x += self._ffn_rows(i, x, self.ffn)
        if len(parts) > 1:
            self.ffn.merge_parts()
        return x

    def _row_parts(self, T: int) -> list[tuple[int, int]]:
        """The row ranges ``(lo, hi)`` a prompt chunk of ``T`` tokens runs as: one per core
        (the Numba threads) with at least :data:`SPLIT_MIN_TOKENS` tokens each."""
        n = max(1, min(numba.get_num_threads(), T // SPLIT_MIN_TOKENS))
        return [(T * j // n, T * (j + 1) // n) for j in range(n)]

    def _qkv_rows(self, i: int, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, q: np.ndarray, k: np.ndarray,
                  v: np.ndarray) -> None:
        """Layer ``i``'s queries, keys and values of the rows ``x [t, d]`` (normed,
        projected, query/key norms, RoPE with ``cos, sin [t, dim]``) into ``q [H, t, hd]``,
        ``k, v [KV, t, hd]``."""
        s, p = self.spec, f"model.layers.{i}."
        t, H, KV, hd = x.shape[0], s.num_heads, s.num_kv_heads, s.head_dim
        qr, kr, vr = self._qkv(self._norm(x, LayerNorms.of(s, i).attn_in), p + "self_attn.")
        qr, kr = qr.reshape(t, H, hd), kr.reshape(t, KV, hd)
        if s.qk_norm:
            qr = rms_norm(qr, self._norm_weight(p + "self_attn.q_norm.weight"), s.norm_eps)
            kr = rms_norm(kr, self._norm_weight(p + "self_attn.k_norm.weight"), s.norm_eps)
        q[:] = apply_rope(qr.transpose(1, 0, 2), cos, sin)
        k[:] = apply_rope(kr.transpose(1, 0, 2), cos, sin)
        v[:] = vr.reshape(t, KV, hd).transpose(1, 0, 2)

    def _attend_rows(self, i: int, x: np.ndarray, q: np.ndarray, keys: np.ndarray, values: np.ndarray,
                     mask: np.ndarray, runner: FFNRunner | None) -> None:
        """Layer ``i`` on the rows ``x [t, d]``, in place: attention of their queries
        ``q [H, t, hd]`` over ``keys, values [KV, S, hd]`` where ``mask [1, 1, t, S]``,
        the output projection and residual, then, with a ``runner``, the FFN's."""
        s, p = self.spec, f"model.layers.{i}."
        t, H, KV, hd = x.shape[0], s.num_heads, s.num_kv_heads, s.head_dim
        scale, cap = np.float32(s.attention_scale), s.attn_logit_softcapping
        scores = softcap((q.reshape(KV, H // KV, t, hd) @ keys[:, None].transpose(0, 1, 3, 2)) * scale, cap)
        if scores.shape[-1] > 1:  # (one token's one key: nothing to mask)
            scores = np.where(mask, scores, _NEG)
        ctx = (softmax(scores) @ values[:, None]).reshape(H, t, hd).transpose(1, 0, 2).reshape(t, H * hd)
        a = self._proj(ctx, p + "self_attn.o_proj")
        norm = LayerNorms.of(s, i).attn_out
        if norm:
            a = self._norm(a, norm)
        x += a * np.float32(s.residual_multiplier)
        if runner is not None:
            x += self._ffn_rows(i, x, runner)

    def _ffn_rows(self, i: int, x: np.ndarray, runner: FFNRunner) -> np.ndarray:
        """Layer ``i``'s FFN branch of the rows ``x [t, d]``: normed, the FFN (by
        ``runner``), its output norm if any, times the residual multiplier."""
        norms = LayerNorms.of(self.spec, i)
        h = self._norm(x, norms.ffn_in)
        y = runner.many(i, h)
        if norms.ffn_out:
            y = self._norm(y, norms.ffn_out)
        return y * np.float32(self.spec.residual_multiplier)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        """Embedding rows ``[T, d]`` of ``ids``, times ``spec.embedding_multiplier``."""
        x = self.model.linear("model.embed_tokens.weight").take(ids)
        return x * np.float32(self.spec.embedding_multiplier) if self.spec.embedding_multiplier != 1 else x

    def _scaled(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` divided by ``spec.logits_scaling``, soft-capped by
        ``spec.final_logit_softcapping``."""
        if self.spec.logits_scaling != 1:
            logits = logits / np.float32(self.spec.logits_scaling)
        return softcap(logits, self.spec.final_logit_softcapping)

    def _step_layers(self) -> list[_StepLayer]:
        """Every layer's :class:`_StepLayer`, made on the first decode step (a prompt-only
        use never packs the grouped projections)."""
        if self._steps is None:
            m, s, steps = self.model, self.spec, []
            for i in range(s.num_layers):
                p = f"model.layers.{i}."
                names = tuple(f"{p}self_attn.{n}_proj" for n in "qkv")
                qk_norm = np.concatenate([np.tile(self._norm_weight(f"{p}self_attn.{n}_norm.weight"), (heads, 1))
                                          for n, heads in (("q", s.num_heads), ("k", s.num_kv_heads))]) \
                    if s.qk_norm else None
                norms = LayerNorms.of(s, i)
                steps.append(_StepLayer(
                    self._norm_weight(norms.attn_in), self._norm_weight(norms.ffn_in),
                    self._qkv_into(names), self._bias_of(names), m.linear(p + "self_attn.o_proj.weight"),
                    self._bias_of((p + "self_attn.o_proj",)), qk_norm,
                    self._norm_weight(norms.attn_out) if norms.attn_out else None,
                    self._norm_weight(norms.ffn_out) if norms.ffn_out else None))
            self._steps = steps
        return self._steps

    def _qkv_into(self, names: tuple[str, ...]) -> Callable[[np.ndarray, np.ndarray], None]:
        """``f(h [d], out)``: ``out = [W_q h | W_k h | W_v h]``, one kernel call when the three
        are stored alike (a :class:`~.runtime_load.LinearGroup`), else one each."""
        group = self.model.linear_group(tuple(n + ".weight" for n in names))
        if group is not None:
            return group.matvec_into
        linears = [self.model.linear(n + ".weight") for n in names]
        ends = np.cumsum([lin.shape[0] for lin in linears]).tolist()

        def each(h: np.ndarray, out: np.ndarray) -> None:
            for lin, a, b in zip(linears, [0] + ends[:-1], ends):
                lin.matvec_into(h, out[a:b])
        return each

    def _bias_of(self, names: tuple[str, ...]) -> np.ndarray | None:
        """The biases of the projections ``names`` end to end (None when they have none)."""
        if not any(self.model.has(n + ".bias") for n in names):
            return None
        return np.concatenate([self.model.vector(n + ".bias") if self.model.has(n + ".bias")
                               else np.zeros(self.model.linear(n + ".weight").shape[0], np.float32) for n in names])

    def _decode_step(self, ids: np.ndarray, cache: DecoderCache) -> np.ndarray:
        """The logits ``[vocab]`` of one new token ``ids [1]`` at position ``cache.length``
        (the cache extended): each layer's norms, projections, attention (one kernel, the
        cache written in place) and FFN through the Numba kernels, into buffers made once
        per step, with the weights of :meth:`_step_layers`."""
        s, m = self.spec, self.model
        hd, eps = s.head_dim, s.norm_eps
        nq, nkv = s.num_heads * hd, s.num_kv_heads * hd
        tables = layer_tables(self.ropes, np.array([cache.length]))
        scale, residual = np.float32(s.attention_scale), np.float32(s.residual_multiplier)
        softcap = np.float32(s.attn_logit_softcapping or 0)
        x = self._embed(ids)[0]
        h, proj, normed = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        qkv, ctx = np.empty(nq + 2 * nkv, np.float32), np.empty(nq, np.float32)
        q, k, v = qkv[:nq], qkv[nq:nq + nkv], qkv[nq + nkv:]
        for i, layer in enumerate(self._step_layers()):
            rms_norm_into(x, layer.input_norm, eps, h)
            layer.qkv(h, qkv)
            if layer.qkv_bias is not None:
                qkv += layer.qkv_bias
            if layer.qk_norm is not None:  # each query and key head over head_dim, in place (Qwen3, Gemma 3)
                heads = qkv[:nq + nkv].reshape(-1, hd)
                heads *= (np.float32(1) / np.sqrt(np.einsum("ij,ij->i", heads, heads) / np.float32(hd)
                                                  + np.float32(eps)))[:, None]
                heads *= layer.qk_norm
            k_store, v_store, slot, count = cache.step(i)
            cos, sin = tables[i]
            attention_step(q, k, v, cos[0], sin[0], k_store, v_store, slot, count, scale, softcap, ctx)
            layer.o_proj.matvec_into(ctx, proj)
            if layer.o_bias is not None:
                proj += layer.o_bias
            attn = proj
            if layer.attn_out_norm is not None:  # Gemma 3's sandwich norms
                rms_norm_into(proj, layer.attn_out_norm, eps, normed)
                attn = normed
            x += attn * residual if residual != 1 else attn
            rms_norm_into(x, layer.ffn_norm, eps, h)
            y = self.ffn.one(i, h)
            if layer.ffn_out_norm is not None:
                rms_norm_into(y, layer.ffn_out_norm, eps, normed)
                y = normed
            x += y * residual if residual != 1 else y
        rms_norm_into(x, self._norm_weight("model.norm.weight"), eps, h)
        return self._scaled(m.linear(self.lm_head).matvec(h))

    def stream(self, prompt_ids, max_new_tokens: int, sampler: Sampler | None = None,
               stop_at_eos: bool = True) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` generated token ids after the prompt (KV cache;
        the prompt is one prefill call)."""
        prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if prompt.size == 0:
            raise ValueError("generation needs a non-empty prompt")
        sampler = sampler or Sampler()
        eos = self.spec.eos_token_id
        eos_ids = set() if eos is None or not stop_at_eos else set(eos if isinstance(eos, list) else [eos])
        cache = self.new_cache(prompt.size + max_new_tokens)
        logits = self.forward(prompt, cache)
        for n in range(max_new_tokens):
            tok = sampler(logits)
            yield tok
            if tok in eos_ids or n + 1 == max_new_tokens:
                return
            logits = self.forward(np.array([tok]), cache)

    def generate(self, prompt_ids, max_new_tokens: int, sampler: Sampler | None = None,
                 stop_at_eos: bool = True) -> np.ndarray:
        """``prompt + generated`` token ids (int64)."""
        prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        new = list(self.stream(prompt, max_new_tokens, sampler, stop_at_eos))
        return np.concatenate([prompt, np.asarray(new, np.int64)])

    def generate_text(self, prompt: str, max_new_tokens: int = 32, sampler: Sampler | None = None) -> str:
        """The text generated after ``prompt`` (tokenized with the artifact's tokenizer)."""
        tok = self.model.require_tokenizer()
        tok.no_truncation()
        tok.no_padding()
        ids = tok.encode(prompt, add_special_tokens=True).ids
        out = self.generate(ids, max_new_tokens, sampler)
        return tok.decode(out[len(ids):].tolist(), skip_special_tokens=True)
