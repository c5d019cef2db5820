"""benchmarks/kernels.py --smoke: runs end to end and writes its JSON and PNG."""
import importlib.util
import json
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "kernels.py"


def test_kernels_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--smoke", "--reps", "1", "--densities", "1.0", "0.1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "kernels_smoke.json").read_text())
    assert (tmp_path / "kernels_smoke.png").stat().st_size > 1000
    s = saved["shapes"]["smoke"]
    assert s["baselines"]["numpy_dense_f32_gemv_s"] > 0 and s["baselines"]["ort_matmulnbits4_ffn_s"] > 0
    for fmt in ("f32", "q8_0", "q4_0"):
        row = s["formats"][fmt]["densities"]["0.1"]
        assert row["ffn_s"] > 0 and row["rows_roofline_fraction"] > 0 and row["ffn_speedup_vs_ort_f32_ffn"] > 0
        # each repetition's roofline is the probe read just before it; the fraction is their median
        probes, reps_s = row["bandwidth_probes_bytes_per_s"], row["code_warm_reps_s"]
        for part, nbytes in (("rows", row["rows_bytes"]), ("ffn", row["ffn_bytes"])):
            assert len(probes[part]) == len(reps_s[part]) == saved["reps"] and min(probes[part]) > 0
            paired = [nbytes / b / t for b, t in zip(probes[part], reps_s[part])]
            assert abs(row[f"{part}_roofline_fraction"] - float(np.median(paired))) < 1e-9
        assert row["rows_s_code_warm"] == min(reps_s["rows"])
    assert "Q4_0 whole sparse FFN @10% vs numpy f32 GEMV (x)" in s["targets"]
    assert saved["machine"]["bandwidth_bytes_per_s"] > 0 and res["smoke"]
