"""benchmarks/train_tiny_llama.py in smoke mode: the checkpoint it writes loads in the HF
frontend, the numpy reference decoder agrees with transformers on it, its tokenizer adds
``<s>``, and a second run on the same directory reuses the model."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_tiny_llama.py"


def _script_module():
    spec = importlib.util.spec_from_file_location("train_tiny_llama", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return sys.modules[spec.name]


def _run(out: Path, cache: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "SPARSEFORGE_CACHE_DIR": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--threads", "2"],
                          capture_output=True, text=True, env=env, timeout=120)
    return proc, time.time() - start


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny_llama")
    out = tmp / "model"
    proc, seconds = _run(out, tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, seconds, tmp


def _snapshot(directory: Path) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in directory.iterdir()}


def test_smoke_run_writes_a_complete_checkpoint(smoke_run):
    out, proc, seconds, _ = smoke_run
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_log.json", "heldout.jsonl"):
        assert (out / name).is_file(), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_act"] == "silu" and config["tie_word_embeddings"] is False
    log = json.loads((out / "train_log.json").read_text())
    assert log["complete"] and log["training"]["steps"] == log["settings"]["steps"] == 20
    assert log["corpus"]["python_version"] and len(log["corpus"]["digest"]) == 64
    assert log["curve"][-1]["step"] == 20
    final = log["final"]
    assert np.isfinite(final["heldout_ppl"]) and final["heldout_ppl"] > 1.0
    assert final["unigram_ppl"]["heldout_all"] > 1.0
    records = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert records and all(isinstance(r["text"], str) and r["text"] for r in records)
    held = set(log["corpus"]["heldout_paths"])
    assert {r["path"] for r in records} <= held and not held & set(log["corpus"]["train_paths"])


def test_checkpoint_loads_with_the_scripts_dims(smoke_run):
    from sparseforge.toolchain.frontends import load_model

    out = smoke_run[0]
    smoke = _script_module().SMOKE
    ir = load_model(out)
    s = ir.spec
    assert (s.family, s.architecture) == ("llama", "LlamaForCausalLM")
    assert (s.hidden_size, s.intermediate_size, s.num_layers, s.num_heads, s.num_kv_heads) == (
        smoke.hidden_size, smoke.intermediate_size, smoke.num_layers, smoke.num_heads, smoke.num_kv_heads)
    assert s.head_dim == smoke.hidden_size // smoke.num_heads
    assert s.max_positions == smoke.max_positions and s.vocab_size == smoke.vocab_size
    assert s.activation == "silu" and s.gated and not s.tie_word_embeddings
    assert (s.pad_token_id, s.bos_token_id, s.eos_token_id) == (0, 1, 2)
    assert len(ir.blocks) == smoke.num_layers
    assert ir.tokenizer == str(out / "tokenizer.json")


def test_tokenizer_puts_bos_first(smoke_run):
    from tokenizers import Tokenizer

    from sparseforge.toolchain.calibration import special_tokens

    out = smoke_run[0]
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("def f(x):\n    return x + 1\n")
    assert enc.ids[0] == 1 and enc.tokens[0] == "<s>" and len(enc.ids) > 3
    assert special_tokens(tok) == ([1], [])
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert tok.decode(tok.encode("x = 1\n").ids) == "x = 1\n"


def test_reference_decoder_matches_transformers(smoke_run):
    import torch
    import transformers
    from tokenizers import Tokenizer

    from sparseforge.toolchain.frontends import load_model
    from sparseforge.toolchain.reference.llama import LlamaDecoder

    out = smoke_run[0]
    text = json.loads((out / "heldout.jsonl").read_text().splitlines()[0])["text"]
    ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids[:48]
    assert ids[0] == 1 and len(ids) == 48
    ids = np.array([ids], dtype=np.int64)
    ref = LlamaDecoder(load_model(out)).forward(ids)
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    assert ref.shape == expected.shape == (1, 48, model.config.vocab_size)
    np.testing.assert_allclose(ref, expected, atol=1e-4, rtol=0)


def test_second_run_reuses_the_model(smoke_run):
    out, first, first_seconds, tmp = smoke_run
    before = _snapshot(out)
    proc, seconds = _run(out, tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert "cached" in proc.stdout and "step " not in proc.stdout
    assert _snapshot(out) == before
    assert seconds < max(15.0, first_seconds / 2)
