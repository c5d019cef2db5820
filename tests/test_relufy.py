"""The relufy pass: modes, thresholds, mean correction, quality figures, ONNX parity, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import TEXT
from sparseforge.passes.profile import Profile, ProfileOptions
from sparseforge.passes.relufy import Relufy, RelufyOptions
from sparseforge.toolchain.calibration import calibration_split as _split
from sparseforge.toolchain.errors import PassError
from sparseforge.toolchain.frontends import load_model
from sparseforge.toolchain.onnx_builder import build_onnx
from sparseforge.toolchain.pass_manager import PassManager
from sparseforge.toolchain.reference import executor_for
from sparseforge.toolchain.samples import read_shards

SPARSEFORGE = str(Path(sys.executable).with_name("sparseforge"))


@pytest.fixture(scope="module")
def profiled(tiny_model, tiny_bert_tokenized, tmp_path_factory):
    """``profiled(kind)`` -> a profiled IR of the tiny bert (text) or llama (token ids)."""
    cache = {}

    def make(kind):
        if kind not in cache:
            d = tmp_path_factory.mktemp(f"prof-{kind}")
            if kind == "bert":
                (d / "c.txt").write_text(TEXT * 4)
                ir, calib = load_model(tiny_bert_tokenized), str(d / "c.txt")
                opts = ProfileOptions(calib=calib, seq_len=16, num_sequences=40, heldout_fraction=0.25)
            else:
                ir = load_model(tiny_model(kind)[0])
                np.save(d / "ids.npy", np.random.default_rng(0).integers(0, ir.spec.vocab_size, size=(48, 20)))
                opts = ProfileOptions(calib=str(d / "ids.npy"), seq_len=20, num_sequences=40, heldout_fraction=0.25)
            result = PassManager([Profile(opts)], cache_dir=d / "cache").run(ir)
            cache[kind] = result.ir
        return cache[kind]

    return make


def _relufy(ir, **kw):
    return PassManager([Relufy(RelufyOptions(sweep=(0.6,), **kw))]).run(ir)


def _onnx_matches_reference(ir, tmp_path):
    built = build_onnx(ir, tmp_path / "g", ffn_outputs=False)
    sess = ort.InferenceSession(str(built.path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(5).integers(0, ir.spec.vocab_size, size=(2, 11))
    mask = np.ones_like(ids)
    out = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    ex = executor_for(ir)
    ref = ex.forward(ids) if ir.spec.causal else ex.hidden_states(ids, mask)
    return float(np.abs(out - ref).max())


def test_threshold_mode_hits_the_target_and_keeps_the_activation(profiled, tmp_path):
    ir = profiled("llama")
    res = _relufy(ir, mode="threshold", target_sparsity=0.6)
    out = res.ir
    assert all(b.activation == "silu" and b.output_threshold > 0 for b in out.blocks)
    assert res.records[0].stats["mean_sparsity"] == pytest.approx(0.6, abs=0.06)
    assert _onnx_matches_reference(out, tmp_path) <= 1e-4
    assert not any(n.startswith("sparseforge.profile.") for n in out.store.names())


def test_drelu_and_relu_modes(profiled, tmp_path):
    out = _relufy(profiled("llama"), mode="drelu").ir
    assert all(b.activation == "relu" and b.up_activation == "relu" for b in out.blocks)
    assert _onnx_matches_reference(out, tmp_path / "l") <= 1e-4
    out = _relufy(profiled("bert"), mode="relu").ir
    assert all(b.activation == "relu" and b.up_activation is None for b in out.blocks)
    assert _onnx_matches_reference(out, tmp_path / "b") <= 1e-4


def test_quality_figures_match_an_independent_computation(profiled):
    """Cosine (encoder) and perplexity (decoder) against the numpy reference executors."""
    bert = profiled("bert")
    res = _relufy(bert, mode="relu")
    held = _split(bert, "heldout")
    embed = lambda ir: executor_for(ir).embed(held.ids, held.mask)  # noqa: E731
    cos = (embed(bert) * embed(res.ir)).sum(1)
    stats = res.records[0].stats
    assert stats["mean_cosine"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert stats["min_cosine"] == pytest.approx(float(cos.min()), abs=1e-5)

    llama = profiled("llama")
    res = _relufy(llama, mode="drelu")
    held = _split(llama, "heldout")

    def ppl(ir):
        logits = executor_for(ir).forward(held.ids, attention_mask=held.mask).astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        valid = (held.mask[:, 1:] * held.mask[:, :-1]).astype(bool)
        nll = -np.take_along_axis(logp[:, :-1], held.ids[:, 1:, None], -1)[..., 0][valid]
        return float(np.exp(nll.mean()))

    stats = res.records[0].stats
    assert stats["perplexity_reference"] == pytest.approx(ppl(llama), rel=1e-4)
    assert stats["perplexity"] == pytest.approx(ppl(res.ir), rel=1e-4)


def test_mean_correction_shifts_the_down_bias_by_the_mean_difference(profiled):
    bert = profiled("bert")
    out = _relufy(bert, mode="relu", mean_correction=True).ir
    for old, new in zip(bert.blocks, out.blocks):
        x, _, _ = read_shards([bert.files[k] for k in old.annotations["profile"]["sample_shards"]],
                              bert.spec.intermediate_size)
        w_up, b_up = bert.store.get_f32(old.up).astype(np.float64), bert.store.get_f32(old.up_bias)
        z = x.astype(np.float64) @ w_up.T + b_up
        import math

        gelu = 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
        delta = (gelu - np.maximum(z, 0)).mean(0)
        expect = bert.store.get_f32(old.down_bias) + bert.store.get_f32(old.down).astype(np.float64) @ delta
        np.testing.assert_allclose(out.store.get_f32(new.down_bias), expect, atol=2e-5)


def test_report_files(profiled):
    res = _relufy(profiled("bert"), mode="threshold", target_sparsity=0.5)  # keeps the attached files alive
    out = res.ir
    report = json.loads(Path(out.files["relufy/relufy.json"]).read_text())
    assert set(report) >= {"before", "after", "untrained", "sweep", "thresholds", "modes"}
    assert report["sweep"][0]["target"] == 0.6 and 0 < report["sweep"][0]["mean_sparsity"] < 1
    for name in ("sparsity.png", "sweep.png"):
        assert Path(out.files[f"relufy/{name}"]).read_bytes()[:4] == b"\x89PNG"


def test_requirements(profiled, tiny_model):
    with pytest.raises(PassError, match="needs a gated FFN"):
        _relufy(profiled("bert"), mode="drelu")
    with pytest.raises(PassError, match="run the 'profile' pass first"):
        _relufy(load_model(tiny_model("llama")[0]))
    with pytest.raises(PassError, match="target_sparsity"):
        _relufy(profiled("llama"), mode="threshold", target_sparsity=1.5)
    with pytest.raises(PassError, match="layers"):
        _relufy(profiled("llama"), layer_modes={"7": "relu"})
    with pytest.raises(PassError, match="layer_sparsity names layers"):
        _relufy(profiled("llama"), layer_sparsity={"7": 0.5})
    with pytest.raises(PassError, match="layer_sparsity for layer 0 must be in"):
        _relufy(profiled("llama"), layer_sparsity={"0": 1.0})


def test_layer_sparsity_overrides_the_target_of_one_layer(profiled):
    res = _relufy(profiled("llama"), mode="threshold", target_sparsity=0.6, layer_sparsity={"0": 0.3})
    per_layer = res.records[0].stats["per_layer_sparsity"]
    assert per_layer[0] == pytest.approx(0.3, abs=0.06)
    assert all(s == pytest.approx(0.6, abs=0.06) for s in per_layer[1:])
    # recorded (cache key, pass log) only when set: recipes without it keep their bytes
    assert Relufy(RelufyOptions(layer_sparsity={"0": 0.3})).options_dict()["layer_sparsity"] == {"0": 0.3}
    assert "layer_sparsity" not in Relufy(RelufyOptions()).options_dict()


def _run(*args, cwd):
    env = {**os.environ, "SPARSEFORGE_CACHE_DIR": str(cwd / ".cache")}
    return subprocess.run([SPARSEFORGE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_cli_bad_options_exit_2(tiny_bert_tokenized, tmp_path):
    (tmp_path / "c.txt").write_text(TEXT)
    base = ["relufy", str(tiny_bert_tokenized), "--calib", "c.txt", "--seq-len", "16", "-o", "out"]
    cases = [(["--mode", "gelu2"], "Invalid value for '--mode'"),
             (["--target-sparsity", "1.2"], "target_sparsity must be in (0, 1)"),
             (["--mode", "drelu"], "needs a gated FFN"),
             (["--layer-mode", "0"], "LAYER=MODE"),
             (["--layer-mode", "0=sigmoid"], "unknown mode 'sigmoid'"),
             (["--layer-sparsity", "0=lots"], "'lots' is not a number"),
             (["--mode", "threshold", "--layer-sparsity", "0=1.5"], "layer_sparsity for layer 0 must be in")]
    for extra, message in cases:
        res = _run(*base, *extra, cwd=tmp_path)
        assert res.returncode == 2, (extra, res.stderr)
        assert message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()
    res = _run(*base, "--mode", "relu", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "profile" in res.stdout and "relufy" in res.stdout
    assert json.loads((tmp_path / "out" / "relufy.json").read_text())["modes"]["0"] == "relu"


def test_local_fit_reduces_the_ffn_error(profiled):
    bert = profiled("bert")
    a = _relufy(bert, mode="relu", local_steps=40)
    b = _relufy(bert, mode="relu", local_steps=40)
    fits = json.loads(Path(a.ir.files["relufy/relufy.json"]).read_text())["local_fit"]
    assert len(fits) == len(bert.blocks)
    assert all(f["rel_error_after"] < f["rel_error_before"] for f in fits)
    plain = _relufy(bert, mode="relu")
    assert a.records[0].stats["mean_cosine"] > plain.records[0].stats["mean_cosine"]
    for block in a.ir.blocks:  # deterministic, and the FFN weights changed
        np.testing.assert_array_equal(a.ir.store.get(block.up), b.ir.store.get(block.up))
        assert not np.array_equal(a.ir.store.get(block.up), bert.store.get(block.up))


def test_local_fit_with_the_threshold_in_the_loop_hits_the_target(profiled):
    from sparseforge.passes.relufy import _apply_mode
    from sparseforge.toolchain.local_distill import ffn_inputs, fit_ffn
    from sparseforge.toolchain.reference.ffn import ffn_forward

    bert = profiled("bert")
    student = bert.evolve()
    _apply_mode(student.blocks[1], "fatrelu", 0.0)
    x = ffn_inputs(bert, _split(bert, "train"), only=1)[1]
    stats = fit_ffn(bert, student, 1, x, steps=30, lr=1e-3, batch_size=64, l1=0.0, seed=0, target_sparsity=0.9)
    t = student.blocks[1].output_threshold
    assert t > 0 and stats["threshold"] == t
    seen = []
    ffn_forward(student.store, student.blocks[1], x, capture=lambda _l, _x, h: seen.append(h))
    assert abs(float((seen[0] == 0).mean()) - 0.9) < 0.03  # threshold set on a subset of these rows


def test_ffn_inputs_match_the_numpy_reference(profiled):
    """The torch twin's FFN inputs (real tokens, batch-major) against the numpy executor's."""
    from sparseforge.toolchain.local_distill import ffn_inputs

    for kind in ("bert", "llama"):
        ir = profiled(kind)
        seqs = _split(ir, "train").head(6)
        ref: dict[int, list[np.ndarray]] = {}
        ex = executor_for(ir)
        for ids, mask in seqs.batches(4):
            def capture(layer, x, _h):
                ref.setdefault(layer, []).append(np.array(x))
            if ir.spec.causal:
                ex.forward(ids, attention_mask=mask, capture=capture)
            else:
                ex.hidden_states(ids, mask, capture=capture)
        every = ffn_inputs(ir, seqs, batch_size=4)
        assert sorted(every) == sorted(ref) == [b.layer for b in ir.blocks]
        for layer in every:
            np.testing.assert_allclose(every[layer], np.concatenate(ref[layer]), atol=1e-4)
            np.testing.assert_array_equal(ffn_inputs(ir, seqs, only=layer, batch_size=4)[layer], every[layer])


def test_post_norm_local_fit_measures_the_block_output(profiled):
    """BERT's local fit compares LayerNorm(x + FFN(x)), checked against a numpy LayerNorm."""
    from sparseforge.passes.relufy import _apply_mode
    from sparseforge.toolchain.families import family_named
    from sparseforge.toolchain.local_distill import _post_norm, ffn_inputs, fit_ffn
    from sparseforge.toolchain.reference.ffn import ffn_forward

    bert = profiled("bert")
    norm = family_named("bert").post_ffn_norm(1)
    assert norm == "encoder.layer.1.output.LayerNorm" and family_named("llama").post_ffn_norm(1) is None
    x = ffn_inputs(bert, _split(bert, "train"), only=1)[1]
    y = ffn_forward(bert.store, bert.blocks[1], x) + x
    mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    target = (y - mu) / np.sqrt(var + bert.spec.norm_eps) * bert.store.get(norm + ".weight") \
        + bert.store.get(norm + ".bias")
    post, post_np = _post_norm(bert, norm)
    np.testing.assert_allclose(post_np(x, y - x), target, atol=1e-5)
    student = bert.evolve()
    _apply_mode(student.blocks[1], "relu", 0.0)
    stats = fit_ffn(bert, student, 1, x, steps=30, lr=1e-3, batch_size=64, l1=0.0, seed=0, targets=target,
                    post=post)
    out = ffn_forward(student.store, student.blocks[1], x) + x
    mu, var = out.mean(-1, keepdims=True), out.var(-1, keepdims=True)
    got = (out - mu) / np.sqrt(var + bert.spec.norm_eps) * bert.store.get(norm + ".weight") \
        + bert.store.get(norm + ".bias")
    rel = float(((got - target) ** 2).mean() / (target ** 2).mean())
    assert stats["rel_error_after"] == pytest.approx(rel, rel=1e-3)
    assert stats["rel_error_after"] < stats["rel_error_before"]
