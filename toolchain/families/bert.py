"""BERT encoders (``BertModel``, e.g. all-MiniLM-L6-v2): post-norm LayerNorm, GELU FFN."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from ..ir import ArchSpec, FFNBlock
from .base import ModelFamily, config_value, register

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@register
class Bert(ModelFamily):
    name = "bert"
    architectures = ("BertModel",)
    strip_prefixes = ("bert.",)
    ignored_tensors = ("embeddings.position_ids",)

    @classmethod
    def spec_from_config(cls, config: dict[str, Any], path: Path) -> ArchSpec:
        act = config.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise InputError(path, f"unsupported BERT hidden_act {act!r}; supported: {', '.join(_ACTIVATIONS)}")
        pos = config.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise InputError(path, f"unsupported position_embedding_type {pos!r} (only 'absolute')")
        d = config_value(config, "hidden_size", path)
        heads = config_value(config, "num_attention_heads", path)
        if d % heads:
            raise InputError(path, f"hidden_size {d} is not divisible by num_attention_heads {heads}")
        return ArchSpec(
            family=cls.name,
            architecture=config["architectures"][0],
            hidden_size=d,
            intermediate_size=config_value(config, "intermediate_size", path),
            num_layers=config_value(config, "num_hidden_layers", path),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=d // heads,
            vocab_size=config_value(config, "vocab_size", path),
            max_positions=config_value(config, "max_position_embeddings", path),
            activation=_ACTIVATIONS[act],
            gated=False,
            norm="layernorm",
            norm_eps=config_value(config, "layer_norm_eps", path, float, 1e-12),
            causal=False,
            attention_bias=True,
            mlp_bias=True,
            type_vocab_size=config_value(config, "type_vocab_size", path, int, 2),
            pad_token_id=config_value(config, "pad_token_id", path, int, 0),
        )

    @classmethod
    def post_ffn_norm(cls, layer: int) -> str | None:
        return f"encoder.layer.{layer}.output.LayerNorm"

    @classmethod
    def blocks(cls, spec: ArchSpec) -> list[FFNBlock]:
        return [
            FFNBlock(
                layer=i,
                up=f"encoder.layer.{i}.intermediate.dense.weight",
                up_bias=f"encoder.layer.{i}.intermediate.dense.bias",
                down=f"encoder.layer.{i}.output.dense.weight",
                down_bias=f"encoder.layer.{i}.output.dense.bias",
                activation=spec.activation,
            )
            for i in range(spec.num_layers)
        ]

    @classmethod
    def expected_shapes(cls, spec: ArchSpec) -> dict[str, tuple[int, ...]]:
        d, n = spec.hidden_size, spec.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "embeddings.word_embeddings.weight": (spec.vocab_size, d),
            "embeddings.position_embeddings.weight": (spec.max_positions, d),
            "embeddings.token_type_embeddings.weight": (spec.type_vocab_size, d),
            "embeddings.LayerNorm.weight": (d,),
            "embeddings.LayerNorm.bias": (d,),
        }
        for i in range(spec.num_layers):
            p = f"encoder.layer.{i}."
            for proj in ("query", "key", "value"):
                shapes[f"{p}attention.self.{proj}.weight"] = (d, d)
                shapes[f"{p}attention.self.{proj}.bias"] = (d,)
            shapes[f"{p}attention.output.dense.weight"] = (d, d)
            shapes[f"{p}attention.output.dense.bias"] = (d,)
            shapes[f"{p}attention.output.LayerNorm.weight"] = (d,)
            shapes[f"{p}attention.output.LayerNorm.bias"] = (d,)
            shapes[f"{p}intermediate.dense.weight"] = (n, d)
            shapes[f"{p}intermediate.dense.bias"] = (n,)
            shapes[f"{p}output.dense.weight"] = (d, n)
            shapes[f"{p}output.dense.bias"] = (d,)
            shapes[f"{p}output.LayerNorm.weight"] = (d,)
            shapes[f"{p}output.LayerNorm.bias"] = (d,)
        return shapes

    @classmethod
    def optional_shapes(cls, spec: ArchSpec) -> dict[str, tuple[int, ...]]:
        d = spec.hidden_size
        return {"pooler.dense.weight": (d, d), "pooler.dense.bias": (d,)}
