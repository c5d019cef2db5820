"""Tiny converted models shared by the runtime, verify, bench and report tests: the
tiny Llama (no tokenizer; token-id calibration) and the tiny BERT with its word-level
tokenizer, each through profile -> relufy -> profile -> predictors -> quantize ->
reorder -> pack, and the tiny Llama once more with every layer gate-first (its gates
stored apart from the bundles) in Q4_0. Built once per session (module-level cache)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

PROFILE = """
[[pass]]
name = "profile"
[pass.options]
calib = "{calib}"
seq_len = 16
num_sequences = 32
max_samples = 512
heldout_fraction = 0.2
"""

RECIPE = """
seed = 1
{verify}{profile}[[pass]]
name = "relufy"
[pass.options]
mode = "relu"
mean_correction = true
eval_sequences = 4
sweep = [0.5, 0.7]
{profile}[[pass]]
name = "predictors"
[pass.options]
ranks = [16]
max_epochs = 3
density_factor = 4.0
budget = 0.5
gate_first = "{gate_first}"
workers = 1
eval_sequences = -1
[[pass]]
name = "quantize"
[pass.options]
ffn = "{ffn}"
[[pass]]
name = "reorder"
[[pass]]
name = "pack"
"""

_CACHE: dict[str, Path] = {}


def packed_f32(checkpoint: Path, directory: Path) -> Path:
    """``checkpoint`` packed without sparsification, every weight float32: the artifact."""
    from sparseforge.toolchain.pipeline import convert_model

    recipe = directory / "recipe.toml"
    recipe.write_text('[[pass]]\nname = "quantize"\n[pass.options]\n'
                      'ffn = "f32"\nattention = "f32"\nembeddings = "f32"\nother = "f32"\n[[pass]]\nname = "pack"\n')
    convert_model(checkpoint, directory / "out", recipe=recipe)
    return directory / "out" / "model.gguf"


def stepwise_logits(rt, ids: np.ndarray, prompt: int) -> np.ndarray:
    """Logits ``[len(ids), vocab]`` of a decoder runtime: the first ``prompt`` tokens as one
    prefill, then one decode step per token (KV cache)."""
    cache = rt.new_cache()
    got = [rt.forward(ids[:prompt], cache, all_logits=True)] + [rt.forward([t], cache, all_logits=True)
                                                                for t in ids[prompt:]]
    assert cache.length == ids.size
    return np.concatenate(got)


def converted(kind: str, tiny_model, tiny_bert_tokenized, tmp_path_factory) -> Path:
    """The convert output directory (``model.gguf``, ``ir/``, ``report.json``) of the tiny
    ``llama``, ``llama-gate-first`` or ``bert``; the source checkpoint is
    ``converted(...).parent / "source"``."""
    if kind in _CACHE:
        return _CACHE[kind]
    from conftest import TEXT
    from sparseforge.toolchain.pipeline import convert_model

    d = tmp_path_factory.mktemp(f"rt-{kind}")
    if kind.startswith("llama"):  # the tiny Llama with the tiny BERT's word-level tokenizer (ids < 128 fit its vocab)
        llama, _ = tiny_model("llama")
        src = d / "llama-src"
        src.mkdir()
        for f in llama.iterdir():
            (src / f.name).symlink_to(f)
        (src / "tokenizer.json").symlink_to(tiny_bert_tokenized / "tokenizer.json")
        calib = d / "ids.npy"
        np.save(calib, np.random.default_rng(0).integers(0, 100, size=(60, 16)))
    else:
        src = tiny_bert_tokenized
        calib = d / "calib.txt"
        calib.write_text(TEXT * 3)
    verify = "[verify]\nmax_ppl_increase = 0.5\n" if kind == "llama" else ""  # recorded in the artifact
    gate_first, ffn = ("always", "q4_0") if kind == "llama-gate-first" else ("never", "q8_0")
    (d / "recipe.toml").write_text(RECIPE.format(verify=verify, profile=PROFILE.format(calib=calib),
                                                 gate_first=gate_first, ffn=ffn))
    (d / "source").symlink_to(src, target_is_directory=True)
    convert_model(src, d / "out", recipe=d / "recipe.toml", report_html=True)
    _CACHE[kind] = d / "out"
    return d / "out"


@pytest.fixture(scope="module")
def llama_out(tiny_model, tiny_bert_tokenized, tmp_path_factory) -> Path:
    return converted("llama", tiny_model, tiny_bert_tokenized, tmp_path_factory)


@pytest.fixture(scope="module")
def llama_gate_first_out(tiny_model, tiny_bert_tokenized, tmp_path_factory) -> Path:
    return converted("llama-gate-first", tiny_model, tiny_bert_tokenized, tmp_path_factory)


@pytest.fixture(scope="module")
def bert_out(tiny_model, tiny_bert_tokenized, tmp_path_factory) -> Path:
    return converted("bert", tiny_model, tiny_bert_tokenized, tmp_path_factory)
