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


@pytest.mark.parametrize("kind", ["bert", "llama", "mistral", "mistral-swa", "qwen2", "granite"])
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
        assert s.sliding_window == (5 if kind == "mistral-swa" else None)
        granite = (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.attention_multiplier, cfg.logits_scaling) \
            if kind == "granite" else (1.0, 1.0, None, 1.0)
        assert (s.embedding_multiplier, s.residual_multiplier, s.attention_multiplier, s.logits_scaling) == granite
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
    (d / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "ntk", "factor": 4.0}}))
    with pytest.raises(InputError, match="unsupported RoPE scaling 'ntk'"):
        load_hf_checkpoint(d)
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["GraniteForCausalLM"],
                                               "residual_multiplier": -0.5}))
    with pytest.raises(InputError, match="'residual_multiplier' = -0.5 is not a positive number"):
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


@pytest.mark.parametrize("use, first", [(True, 0), (True, 1), (True, 2), (False, 0)])
@pytest.mark.parametrize("layer_types", [True, False])  # transformers 5 writes them; earlier configs did not
def test_qwen2_sliding_window_layers(use, first, layer_types, tmp_path):
    """Qwen2's window applies from layer ``max_window_layers`` on, with
    ``use_sliding_window``: transformers' own ``layer_types`` say which layers; a window on
    every layer is the spec's, on none is None, on some only is named layer by layer."""
    from transformers import Qwen2Config

    from sparseforge.toolchain.families.llama import Llama

    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=110, max_position_embeddings=128,
                      use_sliding_window=use, sliding_window=5, max_window_layers=first)
    kinds = set(cfg.layer_types)
    config = cfg.to_dict() | {"architectures": ["Qwen2ForCausalLM"]}
    if not layer_types:
        config.pop("layer_types")
    config["sliding_window"] = 5  # transformers drops it without use_sliding_window; a config may keep it
    spec = Llama.spec_from_config(config, tmp_path / "config.json")
    assert spec.sliding_window == (None if kinds == {"full_attention"} else 5)
    assert spec.layer_types == (cfg.layer_types if len(kinds) == 2 else None)
    assert [spec.window(i) for i in range(2)] == [5 if k == "sliding_attention" else None for k in cfg.layer_types]


@pytest.mark.parametrize("window, want", [(5, 5), (127, 127), (128, None), (4096, None), (None, None)])
def test_mistral_sliding_window(tiny_model, tmp_path, window, want):
    """A window shorter than the context is the spec's; one spanning every position (Mistral
    v0.2's 32768 of 32768, or longer) is no window."""
    from sparseforge.toolchain.frontends.hf import read_config
    from sparseforge.toolchain.families.llama import Llama

    config = read_config(tiny_model("mistral")[0]) | {"sliding_window": window}
    assert config["max_position_embeddings"] == 128
    assert Llama.spec_from_config(config, tmp_path / "config.json").sliding_window == want


def test_phi3_fused_matrices_read_as_their_parts(tiny_model, tmp_path):
    """Phi-3's qkv_proj and gate_up_proj become q/k/v and gate/up: row ranges of the same
    memory map, equal to transformers' own split (Phi3Attention / Phi3MLP), kept as row
    references when the IR is saved and loaded; a fused matrix of the wrong height is an
    InputError naming it."""
    from safetensors.torch import load_file, save_file

    from sparseforge.toolchain.ir import ModelIR

    ckpt, model = tiny_model("phi3")
    ir = load_hf_checkpoint(ckpt)
    s = ir.spec
    q, kv, n = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.intermediate_size
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    qkv, gate_up = attn.qkv_proj.weight.detach().numpy(), mlp.gate_up_proj.weight.detach().numpy()
    want = {"self_attn.q_proj": qkv[:q], "self_attn.k_proj": qkv[q:q + kv], "self_attn.v_proj": qkv[q + kv:],
            "mlp.gate_proj": gate_up[:n], "mlp.up_proj": gate_up[n:]}
    assert attn.qkv_proj.out_features == q + 2 * kv and mlp.gate_up_proj.out_features == 2 * n
    for part, arr in want.items():
        name = f"model.layers.1.{part}.weight"
        got = ir.store.get(name)
        assert isinstance(got.base, np.memmap) or isinstance(got, np.memmap), name
        assert np.array_equal(got, arr), name
        assert ir.store.ref(name).rows is not None
    assert ir.blocks[1].gate == "model.layers.1.mlp.gate_proj.weight"
    ir.save(tmp_path / "ir")
    back = ModelIR.load(tmp_path / "ir")
    assert back.store.ref("model.layers.0.self_attn.v_proj.weight").rows == (q + kv, q + 2 * kv)
    assert back.content_hash() == ir.content_hash()
    assert np.array_equal(back.store.get("model.layers.1.mlp.up_proj.weight"), want["mlp.up_proj"])

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((ckpt / "config.json").read_text())
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.mlp.gate_up_proj.weight"] = tensors["model.layers.0.mlp.gate_up_proj.weight"][:-2]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(InputError, match=r"'model.layers.0.mlp.gate_up_proj.weight' has shape \[190, 64\]; its 2 "
                                         r"parts \(gate_proj, up_proj\) need 192 rows"):
        load_hf_checkpoint(bad)


def test_phi3_sharded_bf16_checkpoint(tiny_model, tmp_path):
    """Phi-3 in bf16 across several shards: every part of a fused matrix reads as the rows
    of transformers' bf16 parameter, from the shard that holds it."""
    _, model = tiny_model("phi3")
    bf16 = type(model)(model.config).to(torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    bf16.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ir = load_hf_checkpoint(tmp_path)
    state = {k: v.float().numpy() for k, v in bf16.state_dict().items()}
    s = ir.spec
    q, kv, n = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.intermediate_size
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        qkv, gate_up = state[p + "self_attn.qkv_proj.weight"], state[p + "mlp.gate_up_proj.weight"]
        for part, arr in (("self_attn.q_proj", qkv[:q]), ("self_attn.k_proj", qkv[q:q + kv]),
                          ("self_attn.v_proj", qkv[q + kv:]), ("mlp.gate_proj", gate_up[:n]),
                          ("mlp.up_proj", gate_up[n:])):
            assert ir.store.dtype(p + part + ".weight").name == "bfloat16"
            assert np.array_equal(ir.store.get_f32(p + part + ".weight"), arr), p + part
    assert len({ir.store.ref(n).file for n in ir.store.names()}) > 2


def test_gemma3_configs(tiny_model, tmp_path):
    """Gemma 3's config.json in the Hub's earlier form (``rope_theta``,
    ``rope_local_base_freq``, ``sliding_window_pattern``) reads as the form transformers 5
    writes (``layer_types``, ``rope_parameters`` per layer kind), which is transformers'
    own config; soft-capping is read when set; bidirectional attention and scaled RoPE in
    the sliding layers are refused. Gemma 2's caps default to transformers' 50 and 30."""
    ckpt, hf = tiny_model("gemma3")
    spec = load_hf_checkpoint(ckpt).spec
    assert spec.layer_types == hf.config.layer_types and spec.sliding_window == hf.config.sliding_window
    assert spec.local_rope_theta == hf.config.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert spec.rope_theta == hf.config.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert spec.attention_multiplier == hf.config.query_pre_attn_scalar ** -0.5 and spec.norm_offset == 1.0
    assert spec.embedding_multiplier == float(hf.model.embed_tokens.embed_scale) and spec.tie_word_embeddings
    d = _copy_ckpt(ckpt, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    old = {k: v for k, v in cfg.items() if k not in ("layer_types", "rope_parameters", "tie_word_embeddings")}
    old.update(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=3)
    (d / "config.json").write_text(json.dumps(old))
    assert load_hf_checkpoint(d).spec == spec
    (d / "config.json").write_text(json.dumps({**old, "final_logit_softcapping": 30.0}))
    assert load_hf_checkpoint(d).spec.final_logit_softcapping == 30.0 and spec.final_logit_softcapping is None
    (d / "config.json").write_text(json.dumps({**old, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}))
    gemma2 = load_hf_checkpoint(d).spec
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping) == (50.0, 30.0) and not gemma2.qk_norm
    for change, message in ((dict(final_logit_softcapping=-3.0), "final_logit_softcapping -3.0 is not a positive"),
                            (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
                            (dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
                             "RoPE scaling of the sliding-window layers"),
                            (dict(layer_types=["full_attention"] * 2), "layer_types .* for each of the 3 layers")):
        (d / "config.json").write_text(json.dumps({**old, **change}))
        with pytest.raises(InputError, match=message):
            load_hf_checkpoint(d)


def test_gemma3_multimodal_checkpoint_reads_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (Gemma 3 4B and up): its language model
    is read under text-only names, its vision tower and projector are left out (and
    listed), and the reference's logits of text match transformers'."""
    import torch
    import transformers

    from sparseforge.toolchain.reference import LlamaDecoder

    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, vocab_size=300, max_position_embeddings=128, sliding_window=4, sliding_window_pattern=3,
                query_pre_attn_scalar=24)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    ir = load_hf_checkpoint(tmp_path)
    assert ir.spec.architecture == "Gemma3ForCausalLM" and ir.spec.layer_types == model.config.text_config.layer_types
    ignored = ir.source["ignored_tensors"]
    assert ignored and all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in ignored)
    assert all(n.startswith("model.") for n in ir.store.names())
    ids = np.random.default_rng(0).integers(3, 290, 30)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    got = LlamaDecoder(ir).forward(ids[None])[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_gemma3_multimodal_config_takes_transformers_defaults(tmp_path):
    """gemma-3-4b's config.json names only what differs from transformers' Gemma3TextConfig
    defaults; the spec is what transformers reads from it."""
    import transformers

    from sparseforge.toolchain.families.llama import Llama
    from sparseforge.toolchain.reference.rope import Rope

    text = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text}
    want = transformers.Gemma3Config(text_config=dict(text)).text_config
    spec = Llama.spec_from_config(json.loads(json.dumps(raw)), tmp_path / "config.json")
    assert (spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.num_heads, spec.num_kv_heads,
            spec.head_dim, spec.vocab_size, spec.max_positions, spec.sliding_window) == (
        want.hidden_size, want.intermediate_size, want.num_hidden_layers, want.num_attention_heads,
        want.num_key_value_heads, want.head_dim, want.vocab_size, want.max_position_embeddings, want.sliding_window)
    assert spec.layer_types == want.layer_types and spec.tie_word_embeddings == want.tie_word_embeddings
    assert spec.attention_multiplier == want.query_pre_attn_scalar ** -0.5 and spec.norm_eps == want.rms_norm_eps
    assert spec.rope_scaling == {"type": "linear", "factor": 8.0} and spec.rope_theta == \
        want.rope_parameters["full_attention"]["rope_theta"]
    assert spec.local_rope_theta == want.rope_parameters["sliding_attention"]["rope_theta"]
    np.testing.assert_allclose(Rope.for_spec(spec).inv_freq, 1 / (1e6 ** (np.arange(0, 256, 2) / 256)) / 8, rtol=1e-6)
    with pytest.raises(InputError, match="without a text_config object"):
        Llama.spec_from_config({**raw, "text_config": None}, tmp_path / "config.json")
