"""Scaled RoPE (Llama 3.1-3.3 ``llama3``, ``linear``, Phi-3 128k / Phi-3.5 ``longrope``):
the inverse frequencies against transformers', converted checkpoints in the reference, the
ONNX graph, the torch twin and the runtime against transformers' logits, and clear errors
for scaling the decoders do not compute."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import copy_export

from sparseforge.toolchain.errors import InputError
from sparseforge.toolchain.frontends.hf import load_hf_checkpoint
from sparseforge.toolchain.families.llama import Llama
from sparseforge.toolchain.reference.rope import Rope, rope_inv_freq

LLAMA31 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)


@pytest.mark.parametrize("head_dim, theta, params, max_positions", [
    (128, 500000.0, LLAMA31, 131072),  # Llama 3.1 8B
    (64, 500000.0, dict(LLAMA31, factor=32.0), 131072),  # Llama 3.2 1B
    (16, 10000.0, dict(LLAMA31, original_max_position_embeddings=16), 128),
    (64, 10000.0, dict(rope_type="linear", factor=4.0), 2048),
])
def test_inv_freq_matches_transformers(head_dim, theta, params, max_positions):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, rope_theta=theta,
                                      rope_scaling=params, max_position_embeddings=max_positions)
    want = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")[0].numpy()
    scaling = {("type" if k == "rope_type" else k): v for k, v in params.items()}
    got = rope_inv_freq(head_dim, theta, scaling)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=4e-7, atol=0)  # float32 pow may differ by an ulp
    assert not np.allclose(got, rope_inv_freq(head_dim, theta), rtol=1e-3)  # the scaling changed them


def test_llama3_checkpoint_in_the_runtime(tiny_model, tmp_path):
    """A Llama 3-style checkpoint packed without sparsification: prefill and decode steps
    over positions past ``original_max_position_embeddings`` against transformers."""
    import torch

    from _runtime_artifacts import packed_f32, stepwise_logits

    from sparseforge.toolchain.artifact_reader import Artifact
    from sparseforge.toolchain.runtime import load_runtime

    ckpt, hf = tiny_model("llama3")
    assert load_hf_checkpoint(ckpt).spec.rope_scaling == {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}
    artifact = packed_f32(ckpt, tmp_path)
    assert Artifact.open(artifact).spec.rope_scaling["type"] == "llama3"
    ids = np.random.default_rng(5).integers(0, 100, 40)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    got = stepwise_logits(load_runtime(artifact, mode="dense"), ids, 20)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def _factors(n: int, top: float) -> list[float]:
    return [round(float(v), 4) for v in np.geomspace(1.0, top, n)]


@pytest.mark.parametrize("arch, config", [
    # Phi-3-mini-128k's form: the original length at the top level, the factor from the lengths
    ("Phi3ForCausalLM", dict(hidden_size=3072, num_attention_heads=32, max_position_embeddings=131072,
                             original_max_position_embeddings=4096, rope_theta=10000.0,
                             rope_scaling=dict(type="longrope", short_factor=_factors(48, 1.2),
                                               long_factor=_factors(48, 60.0)))),
    # Phi-3-medium-128k's earlier name "su" (transformers 5 renames it to longrope only after
    # validating the config, and then misses the original length: it is compared as longrope)
    ("Phi3ForCausalLM", dict(hidden_size=5120, num_attention_heads=40, max_position_embeddings=131072,
                             original_max_position_embeddings=4096, rope_theta=10000.0,
                             rope_scaling=dict(type="su", short_factor=_factors(64, 1.1),
                                               long_factor=_factors(64, 30.0)))),
    # no top-level original length: Phi3Config's default, 4096
    ("Phi3ForCausalLM", dict(hidden_size=1024, num_attention_heads=8, max_position_embeddings=32768,
                             rope_theta=10000.0, rope_scaling=dict(type="longrope", short_factor=_factors(64, 1.1),
                                                                   long_factor=_factors(64, 30.0)))),
    # Phi-4-mini: RoPE over 96 of each head's 128 dimensions, tied embeddings
    ("Phi3ForCausalLM", dict(hidden_size=3072, num_attention_heads=24, num_key_value_heads=8,
                             max_position_embeddings=131072, original_max_position_embeddings=4096,
                             partial_rotary_factor=0.75, rope_theta=10000.0, tie_word_embeddings=True,
                             rope_scaling=dict(type="longrope", short_factor=_factors(48, 1.1),
                                               long_factor=_factors(48, 50.0)))),
    # another family: the original length and the attention factor inside the scaling
    ("LlamaForCausalLM", dict(hidden_size=512, num_attention_heads=8, max_position_embeddings=8192,
                              rope_theta=500000.0, rope_scaling=dict(
                                  rope_type="longrope", short_factor=_factors(32, 1.5), long_factor=_factors(32, 8.0),
                                  original_max_position_embeddings=1024, attention_factor=1.1))),
    ("LlamaForCausalLM", dict(hidden_size=512, num_attention_heads=8, max_position_embeddings=8192,
                              rope_theta=500000.0, rope_scaling=dict(
                                  rope_type="longrope", short_factor=_factors(32, 1.5), long_factor=_factors(32, 8.0),
                                  factor=4.0))),
])
def test_longrope_tables_match_transformers(arch, config, tmp_path):
    """The short and long inverse frequencies and the attention factor read from a
    config.json against transformers' own reading of it, on both sides of the switch."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = {"architectures": [arch], "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 32, **config}
    as_longrope = dict(raw, rope_scaling=dict(raw["rope_scaling"], type="longrope"))
    hf_config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**as_longrope)
    spec = Llama.spec_from_config(json.loads(json.dumps(raw)), tmp_path / "config.json")
    assert spec.rope_scaling["type"] == "longrope"
    rope = Rope.for_spec(spec)
    assert spec.rotary_dim == (96 if "partial_rotary_factor" in config else None)
    original = hf_config.rope_parameters["original_max_position_embeddings"]
    assert rope.switch == original
    for seq_len, got in ((None, rope.inv_freq), (original, rope.inv_freq), (original + 1, rope.inv_freq_for(original + 1))):
        want, factor = ROPE_INIT_FUNCTIONS["longrope"](hf_config, "cpu", seq_len=seq_len)
        np.testing.assert_allclose(got, want.numpy(), rtol=4e-7, atol=0)
        assert rope.attention_factor == np.float32(factor)
    assert not np.allclose(rope.inv_freq, rope.inv_freq_for(original + 1), rtol=1e-3)
    positions = np.arange(original - 2, original + 1)
    cos, sin = rope.cos_sin(positions[:2])
    cos_long, _ = rope.cos_sin(positions)  # the call reaching past the original length
    assert np.abs(cos[:, 0]).max() <= rope.attention_factor and not np.allclose(cos, cos_long[:2], rtol=1e-3)
    np.testing.assert_allclose(cos * cos + sin * sin, np.float32(factor) ** 2, rtol=1e-5)


@pytest.mark.parametrize("arch, config", [
    # Qwen2.5 / Qwen3 model cards' long-context setting
    ("Qwen2ForCausalLM", dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                              max_position_embeddings=131072,
                              rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=32768))),
    # the original length at the top level; rounding kept off; other ramp bounds
    ("LlamaForCausalLM", dict(hidden_size=512, num_attention_heads=8, rope_theta=10000.0, max_position_embeddings=8192,
                              original_max_position_embeddings=2048,
                              rope_scaling=dict(rope_type="yarn", factor=4.0, truncate=False, beta_fast=16.0,
                                                beta_slow=2.0))),
    # DeepSeek's form: the attention factor from mscale / mscale_all_dim
    ("LlamaForCausalLM", dict(hidden_size=1024, num_attention_heads=8, rope_theta=10000.0,
                              max_position_embeddings=163840,
                              rope_scaling=dict(rope_type="yarn", factor=40.0, mscale=1.0, mscale_all_dim=0.707,
                                                original_max_position_embeddings=4096))),
    # a ramp reaching past the middle of the head (clamped at its last dimension), and one
    # with equal bounds (widened by 0.001)
    ("LlamaForCausalLM", dict(hidden_size=512, num_attention_heads=8, rope_theta=10000.0, max_position_embeddings=524288,
                              rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=131072))),
    ("LlamaForCausalLM", dict(hidden_size=512, num_attention_heads=8, rope_theta=10000.0, max_position_embeddings=8192,
                              rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=2048,
                                                beta_fast=6.0, beta_slow=6.0, truncate=False))),
    # over part of each head
    ("Qwen2ForCausalLM", dict(hidden_size=512, num_attention_heads=4, rope_theta=1e6, max_position_embeddings=32768,
                              partial_rotary_factor=0.5,
                              rope_scaling=dict(type="yarn", factor=8.0, original_max_position_embeddings=4096))),
])
def test_yarn_tables_match_transformers(arch, config, tmp_path):
    """YaRN's inverse frequencies and attention factor read from a config.json against
    transformers' own reading of it."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = {"architectures": [arch], "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 32, **config}
    hf_config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**raw)
    spec = Llama.spec_from_config(json.loads(json.dumps(raw)), tmp_path / "config.json")
    rope = Rope.for_spec(spec)
    want, factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    assert want.numel() == rope.inv_freq.size and rope.attention_factor == np.float32(factor) and factor != 1
    np.testing.assert_allclose(rope.inv_freq, want.numpy(), rtol=4e-7, atol=0)
    plain = rope_inv_freq(spec.rotary_dim or spec.head_dim, spec.rope_theta)
    assert np.isclose(rope.inv_freq[0], plain[0]) and not np.allclose(rope.inv_freq, plain, rtol=1e-3)
    cos, sin = rope.cos_sin(np.arange(3))
    np.testing.assert_allclose(cos * cos + sin * sin, np.float32(factor) ** 2, rtol=1e-5)


@pytest.mark.parametrize("config", [
    dict(hidden_size=512, num_attention_heads=8, rope_theta=10000.0, max_position_embeddings=4096,
         rope_scaling=dict(type="dynamic", factor=2.0)),
    dict(hidden_size=1024, num_attention_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
         partial_rotary_factor=0.5, rope_scaling=dict(rope_type="dynamic", factor=3.5)),
])
def test_dynamic_ntk_tables_match_transformers(config, tmp_path):
    """Dynamic NTK's inverse frequencies read from a config.json against transformers'
    at the lengths its forward passes them (a tensor: ``max(position_ids) + 1``): unscaled
    up to ``max_position_embeddings``, then those of a base raised for each length."""
    import torch
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = {"architectures": ["LlamaForCausalLM"], "intermediate_size": 64, "num_hidden_layers": 1,
           "vocab_size": 32, **config}
    hf_config = transformers.LlamaConfig(**raw)
    spec = Llama.spec_from_config(json.loads(json.dumps(raw)), tmp_path / "config.json")
    L = config["max_position_embeddings"]
    assert spec.rope_scaling == {"type": "dynamic", "factor": config["rope_scaling"]["factor"],
                                 "original_max_position_embeddings": L}
    rope = Rope.for_spec(spec)
    plain = rope_inv_freq(spec.rotary_dim or spec.head_dim, spec.rope_theta)
    want, factor = ROPE_INIT_FUNCTIONS["dynamic"](hf_config, "cpu")  # at init: unscaled
    np.testing.assert_allclose(rope.inv_freq, want.numpy(), rtol=4e-7, atol=0)
    np.testing.assert_array_equal(rope.inv_freq, plain)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    for end in (L // 2, L, L + 1, 3 * L + 17):  # growing, as one sequence's calls
        want, factor = ROPE_INIT_FUNCTIONS["dynamic"](hf_config, "cpu", seq_len=torch.tensor(end))
        got = rope.inv_freq_for(end)
        np.testing.assert_allclose(got, want.numpy(), rtol=4e-7, atol=0)
        assert factor == 1 and (end > L) == (not np.allclose(got, plain, rtol=1e-4))
        positions = np.arange(end - 3, end)  # a call's tables, as transformers' forward makes them
        with torch.no_grad():
            hf_cos, hf_sin = rotary(torch.zeros(1), torch.from_numpy(positions)[None])
        for ours, theirs in zip(rope.cos_sin(positions), (hf_cos[0].numpy(), hf_sin[0].numpy())):
            # angles of up to `end` radians from frequencies a float32 rounding or two apart
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=2.5e-7 * end)


@pytest.mark.parametrize("kind", ["phi3-longrope", "phi4-mini", "qwen2-yarn", "llama-dynamic"])
def test_scaled_checkpoint_against_transformers(tiny_model, tmp_path, kind, monkeypatch):
    """A Phi-3 with LongRoPE (the long factors past 16 positions), a Phi-4-mini-style
    model that also rotates only half of each head, a Qwen2 with YaRN and a Llama with
    dynamic NTK scaling (its base raised for each length past 16) against
    transformers, below and past 16 positions: the numpy reference, the ONNX graph in
    onnxruntime and the torch twin over whole sequences; the runtime over a whole
    sequence (also 6 tokens at a time), and as a prompt of 12 then decode steps, against
    transformers with its KV cache (with LongRoPE and dynamic NTK, each call past the switch uses the tables of its
    own length, the cached keys keep those they were rotated with)."""
    import inspect

    import onnxruntime as ort
    import torch
    from transformers import DynamicCache

    from _runtime_artifacts import packed_f32

    from sparseforge.toolchain.onnx_builder import build_onnx
    from sparseforge.toolchain.reference import LlamaDecoder
    from sparseforge.toolchain.runtime import load_runtime
    from sparseforge.toolchain.torch_model import build_torch_model

    ckpt, hf = tiny_model(kind)
    ir = load_hf_checkpoint(ckpt)
    assert ir.spec.rope_scaling.get("attention_factor", 1.0) == pytest.approx(hf.model.rotary_emb.attention_scaling)
    assert ir.spec.rotary_dim == (8 if kind == "phi4-mini" else None) and 2 * hf.model.rotary_emb.inv_freq.numel() \
        == (ir.spec.rotary_dim or ir.spec.head_dim)
    ids = np.random.default_rng(7).integers(3, hf.config.vocab_size, 40)

    def rel(got, want) -> float:
        return float(np.abs(got - want).max() / np.abs(want).max())

    built = build_onnx(ir, tmp_path / "onnx")
    session = ort.InferenceSession(str(built.path), providers=["CPUExecutionProvider"])
    twin = build_torch_model(ir)
    for T in (12, 40):
        batch = ids[None, :T]
        with torch.no_grad():
            want = hf(torch.from_numpy(batch)).logits[0].numpy()
            got_twin = twin(torch.from_numpy(batch)).numpy()[0]
        assert rel(LlamaDecoder(ir).forward(batch)[0], want) < 1e-4, T
        onnx_out = session.run([built.output], {"input_ids": batch, "attention_mask": np.ones_like(batch)})[0][0]
        assert rel(onnx_out, want) < 1e-4 and rel(got_twin, want) < 1e-4, T

    rt = load_runtime(packed_f32(ckpt, tmp_path), mode="dense")
    with torch.no_grad():
        whole = hf(torch.from_numpy(ids[None])).logits[0].numpy()
        # transformers 5 calls it ``cache``, and warns of the earlier ``past_key_values``
        kv = {"cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values":
              DynamicCache(config=hf.config)}
        steps = [hf(torch.from_numpy(ids[None, :12]), **kv).logits[0]]
        steps += [hf(torch.tensor([[t]]), **kv).logits[0] for t in ids[12:24]]
        stepwise = torch.cat(steps).numpy()
    assert rel(rt.forward(ids, all_logits=True), whole) < 1e-4
    from sparseforge.toolchain import runtime_decoder

    monkeypatch.setattr(runtime_decoder, "PREFILL_CHUNK", 6)  # the prompt 6 tokens at a time, the call's tables
    assert rel(rt.forward(ids, all_logits=True), whole) < 1e-4 and rel(rt.forward(ids), whole[-1]) < 1e-4
    cache = rt.new_cache()
    got = [rt.forward(ids[:12], cache, all_logits=True)] + [rt.forward([t], cache, all_logits=True) for t in ids[12:24]]
    assert rel(np.concatenate(got), stepwise) < 1e-4
    if kind != "qwen2-yarn":  # the switch shows in the logits, well above the tolerance
        assert rel(stepwise, whole[:24]) > 5e-4


def _config(ckpt, tmp_path, **changes):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return d


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters=dict(rope_type="ntk", factor=2.0, rope_theta=1e4)), "unsupported RoPE scaling 'ntk'"),
    (dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4)), "'dynamic': factor = null is not a positive"),
    (dict(rope_parameters=dict(rope_type="llama3", factor=8.0, high_freq_factor=4.0, rope_theta=1e4,
                               original_max_position_embeddings=16)), "low_freq_factor = null is not a positive number"),
    (dict(rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0,
                               rope_theta=1e4, original_max_position_embeddings=16)), "high_freq_factor 1.0 is not above"),
    (dict(rope_parameters=dict(rope_type="linear", factor=-2.0, rope_theta=1e4)), "factor = -2.0 is not a positive"),
    (dict(rope_parameters=None, rope_scaling=dict(type="linear", factor=2.0, original_max_position_embeddings=1.5)),
     None),  # older configs: ``rope_scaling`` with ``type``; keys a type does not use are ignored
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.1875)),
     "partial_rotary_factor 0.1875 rotates 3 of each head's 16 dimensions, not an even number"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=1.5)),
     "partial_rotary_factor 1.5 is not a fraction in \\(0, 1\\]"),
    (dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 7, long_factor=[2.0] * 8,
                               original_max_position_embeddings=16)),
     "short_factor has 7 values, not one per rotary frequency \\(8\\)"),
    (dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 8,
                               long_factor=[2.0] * 7 + [0.0], original_max_position_embeddings=16)),
     "long_factor is not a list of positive numbers"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=16,
                               truncate="yes")), "'yarn': truncate = \"yes\" is not true or false"),
    (dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 8, long_factor=[2.0] * 8,
                               original_max_position_embeddings=16, factor="big")),
     "factor = \"big\" is not a positive number"),
])
def test_unsupported_rope_is_refused(tiny_model, tmp_path, changes, message):
    d = _config(tiny_model("llama3")[0], tmp_path, **changes)
    if message is None:
        assert load_hf_checkpoint(d).spec.rope_scaling == {"type": "linear", "factor": 2.0}
        return
    with pytest.raises(InputError, match=message) as exc:
        load_hf_checkpoint(d)
    assert "config.json" in str(exc.value)


@pytest.mark.parametrize("kind, factor, scaling", [("llama3", 4.0, "theta 500000, llama3 scaling: factor 4, "),
                                                  ("qwen2-yarn", 2.0, "theta 1e\\+06, yarn scaling: factor 2, ")])
def test_scaled_rope_onnx_export_takes_its_config(tiny_model, tiny_onnx, tmp_path, kind, factor, scaling):
    """The ONNX export of a Llama 3-style or a YaRN model: its rotary frequencies are not
    a plain series, so ``config.json`` must say how they were scaled, and it is checked
    against the graph's frequencies."""
    from sparseforge.toolchain.frontends.onnx import load_onnx

    directory, _ = tiny_model(kind)
    path = copy_export(tiny_onnx(kind), tmp_path / "m")
    with pytest.raises(InputError, match="cannot infer rope_theta from the graph; put the model's config.json"):
        load_onnx(path)
    config = json.loads((directory / "config.json").read_text())
    (path.parent / "config.json").write_text(json.dumps(config))
    assert load_onnx(path).spec == load_hf_checkpoint(directory).spec
    config["rope_parameters"]["factor"] = factor
    (path.parent / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=rf"config.json's RoPE \({scaling}.*\) does not give the graph's rotary "
                                         "frequencies"):
        load_onnx(path)


@pytest.mark.parametrize("rope, message", [
    (dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=16),
     "'longrope' RoPE scaling .* is read from checkpoints, not from ONNX exports"),
    (dict(rope_type="default", partial_rotary_factor=0.5), "partial rotary embeddings are read from checkpoints"),
    (dict(rope_type="dynamic", factor=2.0), "'dynamic' RoPE scaling .* is read from checkpoints"),
])
def test_onnx_export_with_longrope_or_partial_rotary_is_refused(tiny_model, tiny_onnx, tmp_path, rope, message):
    """An ONNX export whose config.json has LongRoPE or dynamic NTK (the graph's tables
    would have to change with the sequence length) or partial rotary embeddings: the
    checkpoint is asked for instead."""
    from sparseforge.toolchain.frontends.onnx import load_onnx

    path = copy_export(tiny_onnx("llama3"), tmp_path / "m")
    config = json.loads((tiny_model("llama3")[0] / "config.json").read_text())
    config["rope_parameters"] = dict(rope, rope_theta=5e5)
    (path.parent / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=message):
        load_onnx(path)


def test_onnx_graph_rotating_part_of_each_head_is_refused(tiny_onnx, tmp_path):
    """A graph (no config.json) whose rotary frequencies cover half of each head: read
    as a whole-head RoPE it would be a different model, so it is an InputError."""
    import onnx
    from onnx import numpy_helper

    from sparseforge.toolchain.frontends.onnx import load_onnx

    path = copy_export(tiny_onnx("llama"), tmp_path / "m")
    model = onnx.load(path, load_external_data=False)
    inv_freq = next(i for i in model.graph.initializer if i.name.endswith("rotary_emb.inv_freq"))
    inv_freq.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inv_freq)[:4].copy(), inv_freq.name))
    onnx.save(model, path)
    with pytest.raises(InputError, match="RoPE rotates 8 of each head's 16 dimensions"):
        load_onnx(path)


def test_artifact_with_unsupported_rope_scaling_exits_2(tiny_model, tmp_path, capsys):
    """``inspect`` shows an artifact's RoPE scaling, and refuses (exit 2) an artifact whose
    spec carries scaling the runtime does not compute."""
    from sparseforge.toolchain import artifact_writer
    from sparseforge.toolchain.artifact_build import build_metadata, layouts_for, tensor_stream
    from sparseforge.toolchain.cli import main
    from sparseforge.toolchain.ir import ModelIR
    from sparseforge.toolchain.pipeline import convert_model

    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[pass]]\nname = "quantize"\n[[pass]]\nname = "pack"\n')
    convert_model(tiny_model("llama3")[0], tmp_path / "out", recipe=recipe)

    def inspect(path) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exc:
            main(["inspect", str(path)])
        captured = capsys.readouterr()
        return exc.value.code, captured.out, captured.err

    code, out, _ = inspect(tmp_path / "out" / "model.gguf")
    assert code == 0 and ("rope llama3 scaling: factor 8, low_freq_factor 1, high_freq_factor 4, "
                          "original_max_position_embeddings 16") in out
    ir = ModelIR.load(tmp_path / "out" / "ir")
    ir.spec.rope_scaling = {"type": "ntk", "factor": 4.0}
    layouts, formats = layouts_for(ir, 64), {}
    meta = build_metadata(ir, layouts, formats, target="t", seed=0, pack_options={}, tokenizer=False)
    artifact_writer.write_artifact(tmp_path / "bad.gguf", meta, tensor_stream(ir, layouts, formats))
    code, _, err = inspect(tmp_path / "bad.gguf")
    assert code == 2 and err.startswith(f"error: {tmp_path / 'bad.gguf'}: model spec: RoPE scaling ") \
        and "is not one of the supported types (linear, llama3, longrope, yarn, dynamic)" in err
