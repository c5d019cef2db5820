"""Scaled RoPE (Llama 3.1-3.3 ``llama3``, ``linear``): the inverse frequencies against
transformers', a converted checkpoint in the runtime against transformers' logits, and
clear errors for scaling the decoders do not compute."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sparseforge.toolchain.errors import InputError
from sparseforge.toolchain.frontends.hf import load_hf_checkpoint
from sparseforge.toolchain.reference.llama import rope_inv_freq

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


def _config(ckpt, tmp_path, **changes):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return d


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)), "unsupported RoPE scaling 'dynamic'"),
    (dict(rope_parameters=dict(rope_type="llama3", factor=8.0, high_freq_factor=4.0, rope_theta=1e4,
                               original_max_position_embeddings=16)), "low_freq_factor = null is not a positive number"),
    (dict(rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0,
                               rope_theta=1e4, original_max_position_embeddings=16)), "high_freq_factor 1.0 is not above"),
    (dict(rope_parameters=dict(rope_type="linear", factor=-2.0, rope_theta=1e4)), "factor = -2.0 is not a positive"),
    (dict(rope_parameters=None, rope_scaling=dict(type="linear", factor=2.0, original_max_position_embeddings=1.5)),
     None),  # older configs: ``rope_scaling`` with ``type``; keys a type does not use are ignored
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "partial_rotary_factor 0.5"),
])
def test_unsupported_rope_is_refused(tiny_model, tmp_path, changes, message):
    d = _config(tiny_model("llama3")[0], tmp_path, **changes)
    if message is None:
        assert load_hf_checkpoint(d).spec.rope_scaling == {"type": "linear", "factor": 2.0}
        return
    with pytest.raises(InputError, match=message) as exc:
        load_hf_checkpoint(d)
    assert "config.json" in str(exc.value)


def test_scaled_rope_onnx_export_takes_its_config(tiny_model, tiny_onnx, tmp_path):
    """The ONNX export of a Llama 3-style model: its rotary frequencies are not a plain
    series, so ``config.json`` must say how they were scaled, and it is checked against
    the graph's frequencies."""
    from sparseforge.toolchain.frontends.onnx import load_onnx

    directory, _ = tiny_model("llama3")
    d = tmp_path / "m"
    d.mkdir()
    for f in (tiny_onnx("llama3"), tiny_onnx("llama3").with_name("model.onnx.data")):
        if f.exists():
            shutil.copy(f, d / f.name)
    path = d / tiny_onnx("llama3").name
    with pytest.raises(InputError, match="cannot infer rope_theta from the graph; put the model's config.json"):
        load_onnx(path)
    config = json.loads((directory / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config))
    assert load_onnx(path).spec == load_hf_checkpoint(directory).spec
    config["rope_parameters"]["factor"] = 4.0
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"config.json's RoPE \(theta 500000, llama3 scaling: factor 4, .*\) does "
                                         "not give the graph's rotary frequencies"):
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
    ir.spec.rope_scaling = {"type": "yarn", "factor": 4.0}
    layouts, formats = layouts_for(ir, 64), {}
    meta = build_metadata(ir, layouts, formats, target="t", seed=0, pack_options={}, tokenizer=False)
    artifact_writer.write_artifact(tmp_path / "bad.gguf", meta, tensor_stream(ir, layouts, formats))
    code, _, err = inspect(tmp_path / "bad.gguf")
    assert code == 2 and err.startswith(f"error: {tmp_path / 'bad.gguf'}: model spec: RoPE scaling ") \
        and "is not one of the supported types (linear, llama3)" in err
