"""``report.html``: one self-contained file (base64 PNG plots, no external resource) with
every section, written by ``convert``; rendered in headless Chromium when available."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from _runtime_artifacts import bert_out, llama_out  # noqa: F401 (fixtures)

from sparseforge.toolchain.report import SECTIONS, write_report


def test_report_sections_self_contained(bert_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(bert_out, out)
    text = (out / "report.html").read_text()  # written by convert (report_html=True)
    assert "Not available: run `sparseforge verify" in text
    (out / "verify.json").write_text(json.dumps({
        "passed": True, "mean_cosine": 0.99, "min_cosine": 0.97, "reference": "m", "family": "bert",
        "gates": {"min_cosine": {"value": 0.99, "limit": 0.98, "source": "default", "passed": True}}}))
    (out / "bench.json").write_text(json.dumps({
        "family": "bert", "runtime": {"dense": {"16": {"embeddings_per_s": 10.0}},
                                      "sparse": {"16": {"embeddings_per_s": 12.0}}},
        "onnxruntime": {"ort_f32": {"16": {"embeddings_per_s": 20.0}}}, "ratios": {"embed16_sparse_vs_ort_f32": 0.6},
        "peak_rss_mb": 100.0, "machine": {"cpu_count": 2, "load_average_1m": 0.5, "onnxruntime": "x"}}))
    text = write_report(out).read_text()
    for s in SECTIONS:
        assert f"<section id='{s}'>" in text
    assert "Not available" not in text.split("id='sweep'")[0]  # every section before sweep has data
    assert "PASSED" in text and "0.60x" in text
    assert len(re.findall(r"src='data:image/png;base64,", text)) == 6  # every section with data but verify
    assert not re.search(r"(src|href)=['\"](http|file|//)", text)  # nothing external


def test_report_renders_in_chromium(bert_out, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1000,3000", f"--screenshot={shot}", (bert_out / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=60)
    img = imread(shot)[..., :3]
    assert img.shape[:2] == (3000, 1000)
    rows = img.std(axis=(1, 2))
    assert img.std() > 0.05 and (rows > 0.01).mean() > 0.3  # text and plots down the page, not a blank sheet
    blue = (img[..., 2] > 0.6) & (img[..., 0] < 0.3)  # the plots' bars / lines (matplotlib C0 blue)
    assert blue.sum() > 1000
    assert np.abs(img[:200] - 1).max() > 0.5  # the title and summary render at the top


def test_report_decoder_bench_and_verify(llama_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(llama_out, out)
    row = {"decode_tokens_per_s": 5.0, "prefill_tokens_per_s": 50.0}
    bench = {"family": "llama", "runtime": {"dense": row, "sparse": {**row, "decode_tokens_per_s": 9.0}},
             "onnxruntime": {"ort_f32": row}, "ratios": {"decode_sparse_vs_ort_f32": 1.8},
             "peak_rss_mb": 10.0, "machine": {}}
    verify = {"passed": False, "perplexity": 11.0, "perplexity_reference": 10.0, "ppl_increase": 0.1,
              "top1_agreement": 0.9, "mean_kl": 0.01, "reference": "m",
              "gates": {"max_ppl_increase": {"value": 0.1, "limit": 0.05, "source": "option", "passed": False}}}
    text = write_report(out, verify=verify, bench=bench).read_text()
    assert "FAILED" in text and "+10.00%" in text and "1.80x" in text
    assert len(re.findall(r"src='data:image/png;base64,", text)) == 6
