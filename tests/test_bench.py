"""``sparseforge bench`` and the synthetic large-model decode benchmark (``--smoke``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _runtime_artifacts import bert_out, llama_out  # noqa: F401 (fixtures)

from sparseforge.toolchain.artifact_reader import Artifact
from sparseforge.toolchain.bench import bench, cpu_description
from sparseforge.toolchain.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_bench_decoder(llama_out):
    r = bench(llama_out / "model.gguf", modes=("dense", "predictor"), prompt_tokens=8, decode_tokens=3, repeats=1)
    for m in ("dense", "predictor"):
        row = r["runtime"][m]
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0
        assert 0 <= row["predictor_overhead"] < 1
        spec = Artifact.open(llama_out / "model.gguf").spec  # keys and values of 8 + 3 + 1 positions
        assert row["kv_cache_bytes"] == 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4 * 12
    assert r["runtime"]["dense"]["predictor_overhead"] == 0
    assert r["onnxruntime"]["ort_f32"]["decode_tokens_per_s"] > 0
    for k in ("decode_predictor_vs_dense", "decode_predictor_vs_ort_f32", "prefill_dense_vs_ort_f32"):
        assert r["ratios"][k] > 0
    assert r["peak_rss_mb"] >= r["rss_after_runtime_load_mb"] > 0
    half = bench(llama_out / "model.gguf", modes=("dense",), prompt_tokens=8, decode_tokens=3, repeats=1, ort=False,
                 kv_cache="f16")
    assert (r["kv_cache"], half["kv_cache"]) == ("f32", "f16")
    assert 2 * half["runtime"]["dense"]["kv_cache_bytes"] == r["runtime"]["dense"]["kv_cache_bytes"]
    with pytest.raises(InputError, match="100 prompt \\+ 29 decode tokens are beyond the model's 128 positions"):
        bench(llama_out / "model.gguf", prompt_tokens=100, decode_tokens=29, repeats=1)


@pytest.mark.skipif(not Path("/sys/devices/system/cpu/cpu0/cache").is_dir(), reason="no sysfs cache description")
def test_cpu_description_agrees_with_glibc():
    """The per-core cache sizes read from sysfs agree with glibc's (``getconf``, from
    CPUID) where glibc knows them (not L3: glibc reports the socket's, sysfs the one cpu0
    shares); LLVM's host CPU name is the one llvmlite reports."""
    import llvmlite.binding as llvm

    cpu = cpu_description()
    assert cpu["llvm_cpu"] == llvm.get_host_cpu_name()
    checked = 0
    for level, name in (("L1d", "LEVEL1_DCACHE_SIZE"), ("L2", "LEVEL2_CACHE_SIZE")):
        try:
            glibc = int(subprocess.run(["getconf", name], capture_output=True, text=True, check=True).stdout or 0)
        except (OSError, ValueError, subprocess.CalledProcessError):
            continue
        if glibc > 0 and level in cpu["cache_bytes"]:
            assert cpu["cache_bytes"][level] == glibc, level
            checked += 1
    if checked == 0:
        pytest.skip("glibc does not report the cache sizes here")


def test_bench_encoder_default_lengths_fit_the_model(bert_out):
    r = bench(bert_out / "model.gguf", modes=("sparse",), batch=1, repeats=1, ort=False)
    assert r["seq_lens"] == [16, 64]  # 128 is beyond the test model's 64 positions


def test_bench_encoder_cli(bert_out, tmp_path, capsys):
    from sparseforge.toolchain.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", str(bert_out / "model.gguf"), "--seq-lens", "8,16", "--batch", "2", "--repeats", "1",
              "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "b.json").read_text())
    assert exc.value.code == 0 and "emb/s" in out and "peak RSS" in out
    assert set(r["runtime"]) == {"dense", "sparse"} and set(r["runtime"]["sparse"]) == {"8", "16"}
    assert r["ratios"]["embed16_sparse_vs_ort_f32"] > 0
    with pytest.raises(SystemExit) as exc:
        main(["bench", str(bert_out / "model.gguf"), "--modes", "fast"])
    assert exc.value.code == 2 and "--modes" in capsys.readouterr().err
    garbage = tmp_path / "x.onnx"
    garbage.write_bytes(b"not a protobuf" * 8)
    for args, says in ((["--threads", "0"], "--threads"), (["--seq-lens", "16,,32"], "--seq-lens"),
                       (["--json", str(tmp_path)], "is a directory"),
                       (["--seq-lens", "8,65"], "sequence length 65 is beyond the model's 64 positions"),
                       (["--ort-graph", f"g={garbage}"], "not a loadable ONNX model")):
        with pytest.raises(SystemExit) as exc:
            main(["bench", str(bert_out / "model.gguf"), "--seq-lens", "8", "--batch", "1", "--repeats", "1", *args])
        assert exc.value.code == 2 and says in capsys.readouterr().err, args


def test_synthetic_decode_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "SPARSEFORGE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "synthetic_decode.py"), "--smoke",
                           "--output", str(out), "--threads", "1", "--rounds", "2"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["shape"] == "smoke" and abs(r["mean_measured_density"] - 0.10) < 0.05
    for fmt, ort in (("f32", "ort_f32"), ("q8_0", "ort_matmulnbits_q8"), ("q4_0", "ort_matmulnbits_q4")):
        f = r["formats"][fmt]
        f = next(iter(f.values()))  # one thread count
        assert f["ort_baseline"] == ort and f["sparse_vs_ort"] > 0
        ratios = [q["sparse_vs_ort"] for q in f["rounds"]]
        assert len(ratios) == 2 and f["sparse_vs_ort"] == min(ratios)  # the lower median of two rounds
        assert f["sparse_vs_ort"] == f["runtime"]["predictor"]["decode_tokens_per_s"] / \
            f["onnxruntime"][ort]["decode_tokens_per_s"]
        assert f["runtime"]["predictor"]["mean_ffn_density"] < 0.3  # the predictor selects ~10% of neurons
        assert f["runtime"]["gate-first"]["mean_ffn_density"] < 0.3
        assert f["runtime"]["gate_first_bundled"]["mean_ffn_density"] < 0.3
        art = Artifact.open(f["gate_first_artifact"])  # gate-first mode ran on gates stored apart
        assert all(lay.gate_apart for lay in art.layouts) and not any(".predictor." in n for n in art.tensor_names)
        art.close()
    import onnx

    for bits in (4, 8):  # each quantized format against MatMulNBits of its own width
        graph = next((tmp_path / "cache" / "models").glob(f"*/work-density*/ort-q{bits}/model.onnx"))
        nodes = [n for n in onnx.load(str(graph), load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
        assert nodes and all(onnx.helper.get_attribute_value(a) == bits
                             for n in nodes for a in n.attribute if a.name == "bits")
