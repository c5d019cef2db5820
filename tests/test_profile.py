"""The profile pass: statistics equal a direct numpy computation over the same tokens."""
from __future__ import annotations

import json
from collections import Counter
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from sparseforge.toolchain.activation_stats import HIST_EDGES, LayerStats
from sparseforge.toolchain.calibration import Sequences, build_calibration
from sparseforge.toolchain.errors import InputError
from sparseforge.toolchain.frontends import load_model
from sparseforge.toolchain.pass_base import PassContext
from sparseforge.toolchain.samples import read_shards
from sparseforge.passes.profile import Profile, ProfileOptions, graph_with_taps

SPARSEFORGE = str(Path(sys.executable).with_name("sparseforge"))
from conftest import TEXT


def _direct_activations(graph: Path, blocks, seqs: Sequences):
    """Independent reference: our own onnxruntime session with the tapped values as
    outputs; returns per layer (x [tokens, d], a [tokens, n]) of the real tokens in order."""
    model = onnx.load(str(graph), load_external_data=False)
    names = [v for b in blocks for v in (b.input_value, b.activation_value)]
    for n in names:
        if n not in {o.name for o in model.graph.output}:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    so = ort.SessionOptions()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graph.parent))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in sess.get_inputs()}
    xs = {b.layer: [] for b in blocks}
    acts = {b.layer: [] for b in blocks}
    for i in range(len(seqs)):  # one sequence at a time, no padding at all
        n = int(seqs.lengths[i])
        feeds = {"input_ids": seqs.ids[i : i + 1, :n], "attention_mask": np.ones((1, n), np.int64)}
        if "token_type_ids" in inputs:
            feeds["token_type_ids"] = np.zeros((1, n), np.int64)
        out = dict(zip(names, sess.run(names, feeds)))
        for b in blocks:
            xs[b.layer].append(out[b.input_value][0])
            acts[b.layer].append(out[b.activation_value][0])
    return {b.layer: (np.concatenate(xs[b.layer]), np.concatenate(acts[b.layer])) for b in blocks}


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_statistics_equal_direct_numpy(kind, tiny_model, tiny_bert_tokenized, tmp_path):
    if kind == "bert":
        ir = load_model(tiny_bert_tokenized)
        opts = ProfileOptions(calib=None, seq_len=16, num_sequences=12, batch_size=5, max_samples=40, shard_size=16,
                              eps=1e-3)
        calib = tmp_path / "c.txt"
        calib.write_text(TEXT)
        opts = ProfileOptions(**{**opts.__dict__, "calib": str(calib)})
    else:
        ckpt, _ = tiny_model("llama")
        ir = load_model(ckpt)
        ids = np.random.default_rng(0).integers(0, ir.spec.vocab_size, size=(20, 24))
        ids[3, 10:] = -1  # a shorter row
        np.save(tmp_path / "ids.npy", ids)
        opts = ProfileOptions(calib=str(tmp_path / "ids.npy"), seq_len=24, num_sequences=15, batch_size=4,
                              max_samples=50, shard_size=32)
    work = tmp_path / "work"
    work.mkdir()
    res = Profile(opts)(ir, PassContext(work_dir=work, seed=3))
    out = res.ir
    train = Sequences(*[np.asarray(read_safetensors(out.files["calibration/train.safetensors"])[k])
                        for k in ("ids", "lengths")])
    graph, blocks = graph_with_taps(ir, tmp_path / "g")
    direct = _direct_activations(graph, blocks, train)
    for block in out.blocks:
        x, a = direct[block.layer]
        p = block.annotations["profile"]
        t = {k: out.store.get(v) for k, v in p["tensors"].items()}
        assert p["tokens"] == train.num_tokens == len(a)
        np.testing.assert_array_equal(t["count_active"], (np.abs(a) > opts.eps).sum(0))
        np.testing.assert_array_equal(t["count_positive"], (a > 0).sum(0))
        np.testing.assert_array_equal(t["max_abs"], np.abs(a).max(0))
        np.testing.assert_allclose(t["mean_abs"], np.abs(a).astype(np.float64).mean(0), rtol=1e-6)
        hist, _ = np.histogram(np.abs(a), bins=np.append(HIST_EDGES, np.inf))
        np.testing.assert_array_equal(t["hist"], hist)
        freq = (np.abs(a) > opts.eps).mean(0)
        assert p["sparsity"] == pytest.approx(1 - freq.mean(), abs=1e-12)
        order = t["rank"]
        assert sorted(order.tolist()) == list(range(a.shape[1]))
        assert np.all(np.diff(freq[order]) <= 0)
        # samples: exactly the FFN inputs and masks of the sampled tokens
        sx, smask, stok = read_shards([out.files[k] for k in p["sample_shards"]], a.shape[1])
        assert len(stok) == p["samples"] == min(opts.max_samples, len(a))
        assert len(set(stok.tolist())) == len(stok) and np.all(np.diff(stok) > 0)
        np.testing.assert_array_equal(sx, x[stok])
        np.testing.assert_array_equal(smask, np.abs(a[stok]) > opts.eps)
        assert len(p["sample_shards"]) == -(-len(stok) // opts.shard_size)
    report = json.loads(Path(out.files["profile/profile.json"]).read_text())
    assert [l["sparsity"] for l in report["layers"]] == [b.annotations["profile"]["sparsity"] for b in out.blocks]
    assert Path(out.files["profile/sparsity.png"]).read_bytes()[:4] == b"\x89PNG"


def read_safetensors(path):
    from sparseforge.toolchain.safetensors_io import SafetensorsFile

    f = SafetensorsFile(path)
    return {k: f.get(k) for k in f.keys()}


def test_taps_match_the_reference_executor(tiny_model, tmp_path):
    """The tapped values are the FFN input / activation the numpy reference computes."""
    from sparseforge.toolchain.reference import executor_for

    ckpt, _ = tiny_model("qwen2")
    ir = load_model(ckpt)
    graph, blocks = graph_with_taps(ir, tmp_path / "g")
    ids = np.random.default_rng(1).integers(0, ir.spec.vocab_size, size=(1, 9))
    direct = _direct_activations(graph, blocks, Sequences(ids, np.array([9])))
    captured = {}
    executor_for(ir).forward(ids, capture=lambda layer, x, a: captured.__setitem__(layer, (x, a)))
    for layer, (x, a) in direct.items():
        np.testing.assert_allclose(captured[layer][0], x, atol=1e-4)
        np.testing.assert_allclose(captured[layer][1], a, atol=1e-4)


def test_accumulator_memory_is_independent_of_tokens():
    rng = np.random.default_rng(0)
    small, big = LayerStats(n_ff=64), LayerStats(n_ff=64)
    small.update(rng.standard_normal((10, 64)).astype(np.float32))
    for _ in range(200):
        big.update(rng.standard_normal((50, 64)).astype(np.float32))
    assert big.tokens == 10_000 and small.tokens == 10
    assert small.nbytes() == big.nbytes() == 64 * (8 + 8 + 8 + 4) + 8 * len(HIST_EDGES)


def test_pass_state_does_not_grow_with_the_calibration_set(tiny_model, tmp_path):
    ckpt, _ = tiny_model("llama")
    ir = load_model(ckpt)
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, ir.spec.vocab_size, size=(64, 16)))
    sizes = []
    for n in (4, 48):
        work = tmp_path / f"w{n}"
        work.mkdir()
        out = Profile(ProfileOptions(calib=str(tmp_path / "ids.npy"), seq_len=16, num_sequences=n, max_samples=8))(
            ir, PassContext(work_dir=work)).ir
        names = [v for b in out.blocks for v in b.annotations["profile"]["tensors"].values()]
        sizes.append(sum(out.store.get(v).nbytes for v in names))
        assert sum(b.annotations["profile"]["samples"] for b in out.blocks) == 8 * len(out.blocks)
    assert sizes[0] == sizes[1]


def test_calibration_is_deterministic_and_split(tiny_bert_tokenized, tmp_path):
    tok = str(tiny_bert_tokenized / "tokenizer.json")
    calib = tmp_path / "c.txt"
    calib.write_text(TEXT)
    kw = dict(tokenizer=tok, vocab_size=120, seq_len=10, num_sequences=1000, heldout_fraction=0.25)
    a = build_calibration(calib, seed=1, **kw)
    b = build_calibration(calib, seed=1, **kw)
    c = build_calibration(calib, seed=2, **kw)
    assert np.array_equal(a.train.ids, b.train.ids) and not np.array_equal(a.train.ids, c.train.ids)
    # independent windowing with the tokenizers library
    t = Tokenizer.from_file(tok)
    t.no_padding()
    t.no_truncation()
    body = t.encode(TEXT, add_special_tokens=False).ids
    windows = [tuple([2] + body[i : i + 8] + [3]) for i in range(0, len(body), 8)]
    got = [tuple(s.ids[s_i, : s.lengths[s_i]]) for s in (a.train, a.heldout) for s_i in range(len(s))]
    assert Counter(got) == Counter(windows)
    assert len(a.heldout) == int(np.ceil(0.25 * len(windows)))
    assert len(a.train) == len(windows) - len(a.heldout)


def test_long_text_is_tokenized_in_pieces_and_capped(tiny_bert_tokenized, tmp_path, monkeypatch):
    from sparseforge.toolchain import calibration

    tok = str(tiny_bert_tokenized / "tokenizer.json")
    calib = tmp_path / "c.txt"
    calib.write_text((TEXT + "\n") * 40)
    kw = dict(tokenizer=tok, vocab_size=120, seq_len=10, num_sequences=1000, heldout_fraction=0.25, seed=1)
    whole = build_calibration(calib, **kw)
    monkeypatch.setattr(calibration, "PIECE_CHARS", 3 * len(TEXT) // 2)  # pieces of one or two lines
    pieces = build_calibration(calib, **kw)
    np.testing.assert_array_equal(pieces.train.ids, whole.train.ids)  # cut at line breaks: the same tokens
    np.testing.assert_array_equal(pieces.heldout.ids, whole.heldout.ids)
    monkeypatch.setattr(calibration, "MAX_TEXT_BYTES", calib.stat().st_size - 1)
    with pytest.raises(InputError, match="more than"):
        build_calibration(calib, **kw)
    with pytest.raises(InputError, match="/dev/zero: more than"):  # read no further than the cap
        build_calibration("/dev/zero", **kw)


def _run(*args, cwd):
    env = {**os.environ, "SPARSEFORGE_CACHE_DIR": str(cwd / ".cache")}
    return subprocess.run([SPARSEFORGE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_bad_calibration_input_exits_2(tiny_bert_tokenized, tiny_model, tmp_path):
    model = str(tiny_bert_tokenized)
    cases = {
        "missing.txt": None,
        "empty.txt": b"",
        "latin1.txt": "caf\xe9 cr\xe8me".encode("latin-1"),
        "controls.txt": b"\x01\x02\x03\n\x04\n",
        "floats.npy": np.ones((2, 4), np.float32),
        "big.npy": np.array([[1, 2, 500]], np.int64),
        "negative.npy": np.array([[4, -5, 6]], np.int64),  # only -1 pads
        "notes.jsonl": b'{"txt": "hello"}\n',
        "random.npy": bytes(range(256)),
    }
    expect = {"missing.txt": "not found", "empty.txt": "empty", "latin1.txt": "not UTF-8",
              "controls.txt": "shorter than one token", "floats.npy": "dtype float32",
              "big.npy": "token id 500", "negative.npy": "token id -5 is outside the vocabulary", "notes.jsonl": "line 1 has no string field 'text'",
              "random.npy": "not a .npy file"}
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            np.save(path, content)
        res = _run("profile", model, "--calib", str(path), "--seq-len", "16", "-o", str(tmp_path / "out"),
                   cwd=tmp_path)
        assert res.returncode == 2, (name, res.stderr)
        assert str(path) in res.stderr and expect[name] in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    res = _run("profile", model, "-o", str(tmp_path / "out"), cwd=tmp_path)  # default seq_len 128 > 64 positions
    assert res.returncode == 2 and "seq_len 128 exceeds the model's 64 positions" in res.stderr


def test_profile_command_writes_report_and_plots(tiny_bert_tokenized, tmp_path):
    calib = tmp_path / "c.txt"
    calib.write_text(TEXT)
    res = _run("profile", str(tiny_bert_tokenized), "--calib", str(calib), "--seq-len", "16",
               "--num-sequences", "8", "-o", "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for f in ("profile.json", "sparsity.png", "frequency.png", "report.json", "ir/manifest.json"):
        assert (tmp_path / "out" / f).is_file(), f
    report = json.loads((tmp_path / "out" / "profile.json").read_text())
    assert len(report["layers"]) == 2 and 0 <= report["summary"]["mean_sparsity"] <= 1
    res2 = _run("profile", str(tiny_bert_tokenized), "--calib", str(calib), "--seq-len", "16",
                "--num-sequences", "8", "-o", "out2", cwd=tmp_path)
    assert " cached " in res2.stdout
    assert (tmp_path / "out2" / "profile.json").read_bytes() == (tmp_path / "out" / "profile.json").read_bytes()
