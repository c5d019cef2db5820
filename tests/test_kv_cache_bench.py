"""benchmarks/kv_cache.py --smoke: runs end to end, writes its JSON and PNG, and its
kernel timings are of the right computation (numpy's attention over the same cache)."""
import importlib.util
import json
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "kv_cache.py"


def test_kv_cache_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kv_cache", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--smoke", "--reps", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "kv_cache_smoke.json").read_text())
    assert (tmp_path / "kv_cache_smoke.png").stat().st_size > 1000
    shape = mod.SMOKE_SHAPES["smoke"]
    for context, row in saved["shapes"]["smoke"].items():
        elements = 2 * shape["layers"] * shape["kv_heads"] * (int(context) + 1) * shape["head_dim"]
        assert (row["f32"]["kv_cache_bytes"], row["f16"]["kv_cache_bytes"]) == (4 * elements, 2 * elements)
        assert row["kernel_vs_numpy_max_abs"] < 1e-5
        for dtype in ("f32", "f16"):
            r = row[dtype]
            assert r["step_s"] == min(r["step_reps_s"]) > 0 and len(r["read_reps_s"]) == len(r["step_reps_s"]) == 2
            want = float(np.median(np.array(r["read_reps_s"]) / np.array(r["step_reps_s"])))
            assert abs(r["read_fraction"] - want) < 1e-12
        assert abs(row["f16_speedup"] - row["f32"]["step_s"] / row["f16"]["step_s"]) < 1e-12
