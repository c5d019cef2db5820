"""``sparseforge verify``: the artifact against the original model in onnxruntime on the
same held-out sequences; gates, exit codes (0 pass, 1 gate failed, 2 bad input), JSON."""
from __future__ import annotations

import json

import pytest
from _runtime_artifacts import bert_out, llama_out  # noqa: F401 (fixtures)

from sparseforge.toolchain.errors import InputError
from sparseforge.toolchain.verify import resolve_gates, verify


def _call(capsys, *args):
    from sparseforge.toolchain.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, *capsys.readouterr()


def test_verify_decoder_default_heldout_split(llama_out):
    r = verify(llama_out / "model.gguf", llama_out.parent / "source", num_sequences=6)
    assert r["family"] == "llama" and r["sequences"] == 6 and "held-out" in r["data"]
    assert r["reference_is_source"] is True
    for key in ("perplexity", "perplexity_reference", "ppl_increase", "top1_agreement", "mean_kl"):
        assert key in r
    assert 0.5 < r["top1_agreement"] <= 1 and r["mean_kl"] >= 0
    gate = r["gates"]["max_ppl_increase"]  # the conversion recipe's [verify] table, recorded in the artifact
    assert gate["limit"] == 0.5 and gate["source"] == "artifact" and r["passed"] == (r["ppl_increase"] <= 0.5)
    # keys and values rounded to float16: the same sequences, a perplexity a little apart
    half = verify(llama_out / "model.gguf", llama_out.parent / "source", num_sequences=6, kv_cache="f16")
    assert (r["kv_cache"], half["kv_cache"]) == ("f32", "f16")
    assert half["perplexity_reference"] == r["perplexity_reference"]
    assert 0 < abs(half["perplexity"] / r["perplexity"] - 1) < 1e-3


def test_verify_encoder_cli_gates_and_json(bert_out, tmp_path, capsys):
    src = bert_out.parent / "source"
    code, out, _ = _call(capsys, "verify", bert_out / "model.gguf", "--reference", src, "--min-cosine", "0.5",
                         "--json", tmp_path / "v.json")
    r = json.loads((tmp_path / "v.json").read_text())
    assert code == 0 and "PASSED" in out and r["passed"] and r["mean_cosine"] > 0.9
    assert r["min_cosine"] <= r["mean_cosine"] and r["gates"]["min_cosine"]["source"] == "option"
    code, out, _ = _call(capsys, "verify", bert_out / "model.gguf", "--reference", src, "--min-cosine", "1.0")
    assert code == 1 and "FAILED" in out  # the relufied model's mean cosine is below 1
    for bad in (["--min-cosine", "1.01"], ["--min-cosine", "nan"], ["--seq-len", "100000"]):
        assert _call(capsys, "verify", bert_out / "model.gguf", "--reference", src, *bad)[0] == 2, bad
    recipe = tmp_path / "r.toml"
    recipe.write_text('[verify]\nmin_cosine = 1.0\n[[pass]]\nname = "weight-stats"\n')
    code, out, _ = _call(capsys, "verify", bert_out / "model.gguf", "--reference", src, "--recipe", recipe,
                         "--data", bert_out.parent / "calib.txt", "--num-sequences", "4")
    assert code == 1 and "(recipe)" in out and "calib.txt" in out


def test_verify_bad_input_exit_2(bert_out, llama_out, tmp_path, capsys):
    art = bert_out / "model.gguf"
    code, _, err = _call(capsys, "verify", art, "--reference", llama_out.parent / "source")
    assert code == 2 and "is not the artifact's model" in err and err.count("\n") == 1
    code, _, err = _call(capsys, "verify", tmp_path / "missing.gguf", "--reference", bert_out.parent / "source")
    assert code == 2 and "not found" in err
    bad = tmp_path / "bad.gguf"
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    code, _, err = _call(capsys, "verify", bad, "--reference", bert_out.parent / "source")
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1
    code, _, err = _call(capsys, "verify", art, "--reference", tmp_path / "nowhere")
    assert code == 2 and "not found" in err


def test_gate_resolution(tmp_path):
    gates, src = resolve_gates({"min_cosine": None, "max_ppl_increase": 0.1}, None, {"verify": {"min_cosine": 0.9}})
    assert gates == {"min_cosine": 0.9, "max_ppl_increase": 0.1} and src == {"min_cosine": "artifact",
                                                                             "max_ppl_increase": "option"}
    bad = tmp_path / "bad.toml"
    bad.write_text("[verify]\nmin_cosine = 'high'\n")
    with pytest.raises(InputError):
        resolve_gates({}, bad, None)
