"""The Hugging Face frontend on tiny random models, sharded checkpoints and all-MiniLM-L6-v2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparseforge.toolchain.errors import InputError
from sparseforge.toolchain.families import registered_architectures
from sparseforge.toolchain.frontends.hf import load_hf_checkpoint
from sparseforge.toolchain.frontends import load_model


def _state(model) -> dict[str, np.ndarray]:
    prefix = getattr(model, "base_model_prefix", "")
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.detach().float().numpy()
    return out


@pytest.mark.parametrize("kind", ["bert", "llama", "mistral", "qwen2"])
def test_tiny_checkpoint_imports_with_the_right_spec_and_tensors(tiny_model, kind):
    ckpt, model = tiny_model(kind)
    cfg = model.config
    ir = load_hf_checkpoint(ckpt)
    s = ir.spec
    assert s.architecture == cfg.architectures[0]
    assert (s.hidden_size, s.intermediate_size, s.num_layers, s.num_heads, s.vocab_size) == (
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size)
    assert len(ir.blocks) == cfg.num_hidden_layers
    state = _state(model)
    for name in ir.store.names():
        assert name in state, name
        assert np.array_equal(ir.store.get_f32(name), state[name]), name
    if kind == "bert":
        assert not s.gated and s.activation == "gelu" and s.norm == "layernorm" and not s.causal
    else:
        assert s.gated and s.activation == "silu" and s.norm == "rmsnorm" and s.causal
        assert s.num_kv_heads == cfg.num_key_value_heads
        assert s.attention_bias == (kind == "qwen2")
        assert s.tie_word_embeddings == bool(cfg.tie_word_embeddings)
    block = ir.blocks[1]
    n, d = cfg.intermediate_size, cfg.hidden_size
    assert ir.store.shape(block.up) == (n, d) and ir.store.shape(block.down) == (d, n)
    assert (block.gate is not None) == (kind != "bert")


def test_sharded_bf16_checkpoint(tiny_model, tmp_path):
    _, model = tiny_model("llama")
    bf16 = type(model)(model.config).to(torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    bf16.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ir = load_hf_checkpoint(tmp_path)
    shards = {ir.store.ref(n).file for n in ir.store.names()}
    assert len(shards) > 2
    ref = {k: v.float().numpy() for k, v in bf16.state_dict().items()}
    for name in ir.store.names():
        assert ir.store.dtype(name).name == "bfloat16"
        assert np.array_equal(ir.store.get_f32(name), ref[name])


def test_minilm(minilm_dir):
    ir = load_hf_checkpoint(minilm_dir)
    s = ir.spec
    assert (s.architecture, s.hidden_size, s.intermediate_size, s.num_layers, s.num_heads) == (
        "BertModel", 384, 1536, 6, 12)
    assert ir.tokenizer and ir.tokenizer.endswith("tokenizer.json")
    assert isinstance(ir.store.get(ir.blocks[0].up).base, np.memmap) or isinstance(ir.store.get(ir.blocks[0].up), np.memmap)


def _copy_ckpt(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_config_problems(tiny_model, tmp_path):
    ckpt, _ = tiny_model("llama")
    d = _copy_ckpt(ckpt, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(InputError, match="unknown architecture 'GPT2LMHeadModel'") as exc:
        load_hf_checkpoint(d)
    assert "config.json" in str(exc.value)
    for arch in registered_architectures():
        assert arch in str(exc.value)
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    with pytest.raises(InputError, match="has shape"):
        load_hf_checkpoint(d)
    (d / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(InputError, match="unsupported RoPE scaling 'yarn'"):
        load_hf_checkpoint(d)
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(InputError, match="no 'hidden_size'"):
        load_hf_checkpoint(d)
    (d / "config.json").unlink()
    with pytest.raises(InputError, match="config.json not found"):
        load_hf_checkpoint(d)
    with pytest.raises(InputError, match="neither a Hugging Face checkpoint .config.json. nor a sparseforge IR"):
        load_model(d)


def test_missing_weights_and_shards(tiny_model, tmp_path):
    ckpt, _ = tiny_model("bert")
    d = _copy_ckpt(ckpt, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"no \*.safetensors weights"):
        load_hf_checkpoint(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001.safetensors"}}))
    with pytest.raises(InputError, match="shard listed in") as exc:
        load_hf_checkpoint(d)
    assert "model-00001.safetensors" in str(exc.value)
