"""benchmarks/kernels.py --smoke: runs end to end and writes its JSON and PNG."""
import importlib.util
import json
from pathlib import Path

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
        # the roofline of a density is the mean of the two probes around its timings
        probes = row["bandwidth_probes_bytes_per_s"]
        assert len(probes) == 2 and min(probes) > 0
        roofline_s = row["rows_bytes"] / (sum(probes) / 2)
        assert abs(row["rows_roofline_fraction"] - roofline_s / row["rows_s_code_warm"]) < 1e-9
    assert "Q4_0 whole sparse FFN @10% vs numpy f32 GEMV (x)" in s["targets"]
    assert saved["machine"]["bandwidth_bytes_per_s"] > 0 and res["smoke"]
