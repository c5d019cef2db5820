"""Llama-style decoders: Llama, Mistral, Qwen2, Qwen3, Phi-3 (RMSNorm, RoPE, GQA, SwiGLU
FFN; Qwen3 also RMS-normalises each head's query and key before RoPE; Mistral v0.1 and
Phi-3 attend a sliding window; Phi-3's checkpoints stack q/k/v and gate/up in one matrix
each, read as the separate matrices: :meth:`Llama.fused_tensors`; Phi-4-mini, also
``Phi3ForCausalLM``, rotates three quarters of each head; Granite scales the embeddings,
the residual branches, the attention scores and the logits: :func:`_granite`; Gemma 2
and Gemma 3 (text) normalise by ``1 + weight``, around both sublayers, and mix
sliding-window layers with full-attention ones, Gemma 2 soft-capping its attention scores
and logits, Gemma 3's sliding layers with a RoPE base of their own: :func:`_gemma`; a
multimodal Gemma 3 is read as its language model)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..ir import ArchSpec, FFNBlock
from ..reference.rope import ROPE_SCALING_KEYS, check_rope_scaling
from .base import ModelFamily, config_value, register

_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
#: transformers' ``Gemma3TextConfig`` defaults: a multimodal Gemma 3's ``text_config`` names
#: only what differs from them
_GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                             hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
                             tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                             pad_token_id=0, eos_token_id=1, bos_token_id=2)
#: a multimodal checkpoint's language-model tensors -> their text-only names
_TEXT_MODEL_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                        ("language_model.lm_head.", "lm_head."))
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _rope(config: dict[str, Any], arch: str, head_dim: int, max_pos: int,
          path: Path) -> tuple[float, dict[str, Any] | None, int | None]:
    """RoPE base, scaling (``ArchSpec.rope_scaling``) and ``ArchSpec.rotary_dim`` from
    ``rope_parameters`` (transformers 5) or ``rope_theta`` / ``rope_scaling`` /
    ``partial_rotary_factor`` (earlier configs): unscaled (``default``), ``linear``,
    ``llama3``, ``longrope`` (Phi-3 also names it ``su`` or ``yarn``), ``yarn``
    (:func:`_derived`) or ``dynamic``; other types are an InputError. The rotary dimensions are
    ``int(head_dim * partial_rotary_factor)``, as transformers takes them."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise InputError(path, "config.json: rope_parameters / rope_scaling is not an object")
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if arch == "Phi3ForCausalLM" and rope_type in ("su", "yarn"):  # as transformers' Phi3Config reads them
        rope_type = "longrope"
    if rope_type not in ("default", *ROPE_SCALING_KEYS):
        raise InputError(path, f"unsupported RoPE scaling {rope_type!r} (supported: unscaled, "
                               f"{', '.join(repr(t) for t in ROPE_SCALING_KEYS)})")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise InputError(path, f"config.json: partial_rotary_factor {json.dumps(partial)} is not a fraction in (0, 1]")
    dim = int(head_dim * partial)
    if dim < 2 or dim % 2:
        raise InputError(path, f"config.json: partial_rotary_factor {partial!r} rotates {dim} of each head's "
                               f"{head_dim} dimensions, not an even number")
    rotary_dim = dim if dim < head_dim else None
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise InputError(path, f"config.json: rope_theta {json.dumps(theta)} is not a number")
    if rope_type == "default":
        return float(theta), None, rotary_dim
    rope = {"type": rope_type, **(_derived(config, scaling, rope_type, arch, max_pos, path)
                                  if rope_type in ("longrope", "yarn") else
                                  {k: scaling.get(k) for k in ROPE_SCALING_KEYS[rope_type]})}
    if rope_type == "dynamic":  # transformers rescales past max_position_embeddings
        rope["original_max_position_embeddings"] = max_pos
    try:
        check_rope_scaling(rope, dim)
    except ValueError as exc:
        raise InputError(path, f"config.json: {exc}") from None
    return float(theta), {"type": rope_type, **{k: [float(v) for v in rope[k]] if kind is list else kind(rope[k])
                                                for k, kind in ROPE_SCALING_KEYS[rope_type].items()}}, rotary_dim


def _derived(config: dict[str, Any], scaling: dict[str, Any], rope_type: str, arch: str, max_pos: int,
             path: Path) -> dict[str, Any]:
    """``longrope``'s and ``yarn``'s values as transformers derives them:
    ``original_max_position_embeddings`` from the config's top level (Phi-3's default
    4096), else from the scaling, else ``max_position_embeddings``; ``factor`` as given,
    else ``max_position_embeddings / original_max_position_embeddings``;
    ``attention_factor`` as given, else for ``longrope`` ``sqrt(1 + ln(factor) /
    ln(original_max_position_embeddings))``, for ``yarn`` ``0.1 ln(factor) + 1`` (with
    ``mscale`` and ``mscale_all_dim``: the ratio of that with each as the log's
    multiplier), 1 where ``factor`` is at most 1; ``yarn``'s ``beta_fast`` 32,
    ``beta_slow`` 1 and ``truncate`` true unless given."""
    original = config.get("original_max_position_embeddings", 4096 if arch == "Phi3ForCausalLM" else
                          scaling.get("original_max_position_embeddings", max_pos))
    values = {"original_max_position_embeddings": original, "attention_factor": scaling.get("attention_factor")}
    if rope_type == "longrope":
        values.update(short_factor=scaling.get("short_factor"), long_factor=scaling.get("long_factor"))
    else:
        values.update(factor=scaling.get("factor"), beta_fast=scaling.get("beta_fast") or 32.0,
                      beta_slow=scaling.get("beta_slow") or 1.0, truncate=scaling.get("truncate", True))
    if isinstance(original, bool) or not isinstance(original, int) or original < 2:
        return values  # check_rope_scaling names what is wrong
    factor = scaling.get("factor")
    if factor is None:
        factor = max_pos / original
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise InputError(path, f"config.json: RoPE scaling {rope_type!r}: factor = {json.dumps(factor)} is not a "
                               "positive number")
    if rope_type == "yarn":
        values["factor"] = factor
    if values["attention_factor"] is not None:
        return values
    if rope_type == "longrope":
        values["attention_factor"] = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        return values

    def mscale(multiplier: float) -> float:
        return 0.1 * multiplier * math.log(factor) + 1.0 if factor > 1 else 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    values["attention_factor"] = mscale(m) / mscale(m_all) if m and m_all else mscale(1.0)
    return values


def _granite(config: dict[str, Any], path: Path) -> dict[str, float]:
    """Granite's four scalars (transformers' defaults 1; ``attention_multiplier`` replaces
    ``head_dim ** -0.5``)."""
    values = {k: config_value(config, k, path, float, 1.0) for k in
              ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")}
    for k, v in values.items():
        if not (math.isfinite(v) and v > 0):
            raise InputError(path, f"config.json: {k!r} = {v} is not a positive number")
    return values


def _sliding_window(config: dict[str, Any], arch: str, layers: int, max_pos: int,
                    path: Path) -> tuple[int | None, list[str] | None]:
    """``ArchSpec.sliding_window`` and ``layer_types`` from ``sliding_window`` (None when it
    is absent or spans every position) and the layers' kinds: ``layer_types``
    (transformers 5); before it Qwen2/Qwen3's window applied only with
    ``use_sliding_window``, on the layers from ``max_window_layers`` on (28 unless given),
    and Gemma's on all but every ``sliding_window_pattern``-th layer (Gemma 2: every
    second, Gemma 3: sixth). ``layer_types`` is None when every layer is alike."""
    window = config_value(config, "sliding_window", path, int, None)
    qwen = arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
    if window is None or window >= max_pos or (qwen and not config.get("use_sliding_window", False)):
        return None, None
    kinds = config.get("layer_types")
    if kinds is None and arch in _GEMMA:
        pattern = config_value(config, "sliding_window_pattern", path, int, 2 if arch == "Gemma2ForCausalLM" else 6)
        kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    elif kinds is None:  # configs before transformers 5
        first = config.get("max_window_layers", 28) if qwen else 0
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise InputError(path, f"config.json: max_window_layers {json.dumps(first)} is not a layer count")
        first = min(first, layers)
        kinds = ["full_attention"] * first + ["sliding_attention"] * (layers - first)
    if not isinstance(kinds, list) or len(kinds) != layers or not set(kinds) <= {"sliding_attention", "full_attention"}:
        raise InputError(path, f"config.json: layer_types {json.dumps(kinds)} is not one 'sliding_attention' or "
                               f"'full_attention' for each of the {layers} layers")
    if set(kinds) == {"full_attention"}:
        return None, None
    if set(kinds) == {"sliding_attention"}:
        return window, None
    return window, list(kinds)


def _gemma(config: dict[str, Any], arch: str, d: int, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Gemma 2 / Gemma 3 (text): the config as the full-attention layers' RoPE reads it and
    the spec's Gemma fields: norms times ``1 + weight``, sandwich norms, embeddings times
    ``sqrt(d)``, attention scores times ``query_pre_attn_scalar ** -0.5``, soft-capped
    attention scores and logits (Gemma 2's defaults 50 and 30; Gemma 3's none). Gemma 3's
    full-attention layers take theta 1e6 unless given and ``rope_scaling``; its sliding
    layers their own unscaled base (``rope_local_base_freq`` or
    ``rope_parameters["sliding_attention"]``, 10000 unless given). Bidirectional attention
    is an InputError."""
    if config.get("use_bidirectional_attention"):
        raise InputError(path, "config.json: use_bidirectional_attention (an encoder) is not supported")
    gemma3 = arch == "Gemma3ForCausalLM"
    caps = {key: config_value(config, key, path, float, None if gemma3 else default)
            for key, default in (("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0))}
    for key, cap in caps.items():
        if cap is not None and not (math.isfinite(cap) and cap > 0):
            raise InputError(path, f"config.json: {key} {cap} is not a positive number")
    rope_config, local_theta = config, None
    params = config.get("rope_parameters") or {}
    if gemma3 and isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
        full.setdefault("rope_theta", 1e6)
        rope_config = {**config, "rope_parameters": full}
        if (local.get("rope_type") or local.get("type") or "default") != "default":
            raise InputError(path, f"config.json: RoPE scaling of the sliding-window layers {json.dumps(local)} is "
                                   "not supported")
        local_theta = local.get("rope_theta", 10000.0)
    elif gemma3:
        rope_config = {**config, "rope_theta": config.get("rope_theta", 1e6)}
        local_theta = config.get("rope_local_base_freq", 10000.0)
    if local_theta is not None and (isinstance(local_theta, bool) or not isinstance(local_theta, (int, float))
                                    or not local_theta > 1):
        raise InputError(path, f"config.json: the sliding layers' RoPE base {json.dumps(local_theta)} is not a "
                               "number above 1")
    scalar = config_value(config, "query_pre_attn_scalar", path, float, 256.0)
    if not scalar > 0:
        raise InputError(path, f"config.json: query_pre_attn_scalar {scalar} is not positive")
    return rope_config, dict(norm_offset=1.0, sandwich_norms=True, embedding_multiplier=d ** 0.5,
                             attention_multiplier=scalar ** -0.5,
                             local_rope_theta=None if local_theta is None else float(local_theta), **caps)


@register
class Llama(ModelFamily):
    name = "llama"
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "Phi3ForCausalLM", "GraniteForCausalLM", *_GEMMA, "Gemma3ForConditionalGeneration")
    ignored_tensors = ()

    @classmethod
    def canonical_name(cls, name: str) -> str | None:
        """A multimodal Gemma 3's language-model tensors by their text-only names (its
        vision tower's are not weights of the spec, so the import leaves them out)."""
        for prefix, canonical in _TEXT_MODEL_PREFIXES:
            if name.startswith(prefix):
                return canonical + name[len(prefix):]
        return super().canonical_name(name)

    @classmethod
    def spec_from_config(cls, config: dict[str, Any], path: Path) -> ArchSpec:
        """The spec of a ``config.json``; a multimodal Gemma 3's is its language model's (a
        ``Gemma3ForCausalLM`` from ``text_config`` over transformers' defaults)."""
        arch = config["architectures"][0]
        if arch == "Gemma3ForConditionalGeneration":
            text = config.get("text_config")
            if not isinstance(text, dict):
                raise InputError(path, "config.json: Gemma3ForConditionalGeneration without a text_config object")
            tied = config.get("tie_word_embeddings", True)
            return cls.spec_from_config({**_GEMMA3_TEXT_DEFAULTS, "tie_word_embeddings": tied, **text,
                                         "architectures": ["Gemma3ForCausalLM"]}, path)
        act = config.get("hidden_act") or config.get("hidden_activation") or "silu"
        if act not in _ACTIVATIONS:
            raise InputError(path, f"unsupported hidden_act {act!r}; supported: {', '.join(_ACTIVATIONS)}")
        d = config_value(config, "hidden_size", path)
        heads = config_value(config, "num_attention_heads", path)
        kv = config_value(config, "num_key_value_heads", path, int, heads)
        head_dim = config_value(config, "head_dim", path, int, d // heads)
        if heads % kv:
            raise InputError(path, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        max_pos = config_value(config, "max_position_embeddings", path, int, 2048)
        layers = config_value(config, "num_hidden_layers", path)
        gemma = arch in _GEMMA
        rope_config, extra = _gemma(config, arch, d, path) if gemma else (config, {})
        if arch == "GraniteForCausalLM":
            extra = _granite(config, path)
        theta, rope_scaling, rotary_dim = _rope(rope_config, arch, head_dim, max_pos, path)
        window, layer_types = _sliding_window(config, arch, layers, max_pos, path)
        return ArchSpec(
            family=cls.name,
            architecture=arch,
            hidden_size=d,
            intermediate_size=config_value(config, "intermediate_size", path),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            vocab_size=config_value(config, "vocab_size", path),
            max_positions=max_pos,
            activation=_ACTIVATIONS[act],
            gated=True,
            norm="rmsnorm",
            norm_eps=config_value(config, "rms_norm_eps", path, float, 1e-6),
            causal=True,
            rope_theta=theta,
            rope_scaling=rope_scaling,
            attention_bias=arch == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", gemma)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
            sliding_window=window,
            layer_types=layer_types,
            rotary_dim=rotary_dim,
            **extra,
            pad_token_id=config.get("pad_token_id"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
        )

    @classmethod
    def fused_tensors(cls, spec: ArchSpec) -> dict[str, list[tuple[str, int, int]]]:
        """Phi-3: ``self_attn.qkv_proj`` is q, k, v and ``mlp.gate_up_proj`` gate, up, one
        after the other along the rows."""
        if spec.architecture != "Phi3ForCausalLM":
            return {}
        q, kv, n = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
        fused = {}
        for i in range(spec.num_layers):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            fused[a + "qkv_proj.weight"] = [(a + "q_proj.weight", 0, q), (a + "k_proj.weight", q, q + kv),
                                            (a + "v_proj.weight", q + kv, q + 2 * kv)]
            fused[m + "gate_up_proj.weight"] = [(m + "gate_proj.weight", 0, n), (m + "up_proj.weight", n, 2 * n)]
        return fused

    @classmethod
    def blocks(cls, spec: ArchSpec) -> list[FFNBlock]:
        blocks = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}.mlp."
            blocks.append(
                FFNBlock(
                    layer=i,
                    gate=f"{p}gate_proj.weight",
                    up=f"{p}up_proj.weight",
                    down=f"{p}down_proj.weight",
                    gate_bias=f"{p}gate_proj.bias" if spec.mlp_bias else None,
                    up_bias=f"{p}up_proj.bias" if spec.mlp_bias else None,
                    down_bias=f"{p}down_proj.bias" if spec.mlp_bias else None,
                    activation=spec.activation,
                )
            )
        return blocks

    @classmethod
    def expected_shapes(cls, spec: ArchSpec) -> dict[str, tuple[int, ...]]:
        d, n, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
        q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, d), "model.norm.weight": (d,)}
        if not spec.tie_word_embeddings:
            shapes["lm_head.weight"] = (spec.vocab_size, d)
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            shapes[f"{p}input_layernorm.weight"] = (d,)
            shapes[f"{p}post_attention_layernorm.weight"] = (d,)
            shapes[f"{p}self_attn.q_proj.weight"] = (q, d)
            shapes[f"{p}self_attn.k_proj.weight"] = (kv, d)
            shapes[f"{p}self_attn.v_proj.weight"] = (kv, d)
            shapes[f"{p}self_attn.o_proj.weight"] = (d, q)
            if spec.qk_norm:
                shapes[f"{p}self_attn.q_norm.weight"] = (hd,)
                shapes[f"{p}self_attn.k_norm.weight"] = (hd,)
            if spec.sandwich_norms:
                shapes[f"{p}pre_feedforward_layernorm.weight"] = (d,)
                shapes[f"{p}post_feedforward_layernorm.weight"] = (d,)
            if spec.attention_bias:
                shapes[f"{p}self_attn.q_proj.bias"] = (q,)
                shapes[f"{p}self_attn.k_proj.bias"] = (kv,)
                shapes[f"{p}self_attn.v_proj.bias"] = (kv,)
            shapes[f"{p}mlp.gate_proj.weight"] = (n, d)
            shapes[f"{p}mlp.up_proj.weight"] = (n, d)
            shapes[f"{p}mlp.down_proj.weight"] = (d, n)
            if spec.mlp_bias:
                shapes[f"{p}mlp.gate_proj.bias"] = (n,)
                shapes[f"{p}mlp.up_proj.bias"] = (n,)
                shapes[f"{p}mlp.down_proj.bias"] = (d,)
        return shapes

    @classmethod
    def optional_shapes(cls, spec: ArchSpec) -> dict[str, tuple[int, ...]]:
        d = spec.hidden_size
        out: dict[str, tuple[int, ...]] = {}
        if spec.tie_word_embeddings:
            out["lm_head.weight"] = (spec.vocab_size, d)
        if spec.attention_bias:
            for i in range(spec.num_layers):
                out[f"model.layers.{i}.self_attn.o_proj.bias"] = (d,)
        return out
