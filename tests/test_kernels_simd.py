"""The quantized kernels on each x86 code path (``ffn.SIMD``: 2 VNNI, with GFNI nibble
unpacking when the host has it; 1 AVX2 without GFNI; 0 the generic form), each in a fresh
interpreter told a CPU with fewer features (``NUMBA_CPU_FEATURES``), against numpy on the
Q8_0/Q4_0-decoded weights."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

_CHECK = r"""
import json, sys
import numpy as np
from sparseforge.kernels import ffn, quant, row_tiles
from sparseforge.kernels.bundle import BundleLayout, pack_bundles
from sparseforge.kernels.runtime import LayerKernels, Predictor, predictor_logits_numpy

d, n = 128, 72
rng = np.random.default_rng(3)
g, u = (rng.standard_normal((2, n, d)) / np.sqrt(d)).astype(np.float32)
dn = (rng.standard_normal((d, n)) / np.sqrt(n)).astype(np.float32)
x = rng.standard_normal(d).astype(np.float32)
errs = {}
for fmt in ("q8_0", "q4_0"):
    lay = BundleLayout(fmt, d, n, True)
    k = LayerKernels(pack_bundles(g, u, dn, lay), lay, activation="relu")
    gq, uq, dq = (quant.roundtrip(w, fmt).astype(np.float64) for w in (g, u, dn.T))
    xq = quant.roundtrip(x, "q8_0").astype(np.float64)
    h = np.maximum(gq @ xq, 0) * (uq @ xq)
    idx = np.sort(rng.choice(n, 30, replace=False))
    hs = rng.standard_normal(30).astype(np.float32)
    y_ref = dq.T @ h
    scale = float(np.abs(y_ref).max())
    errs[fmt] = {
        "forward": float(np.abs(k.forward(x) - y_ref).max()) / scale,
        "rows": float(np.abs(k.rows(x, "up", idx) - (uq @ xq)[idx]).max()),
        "axpy": float(np.abs(k.axpy(hs, idx) - dq[idx].T @ hs).max()),
    }
w2 = np.ascontiguousarray(dn[:40].T)
p = Predictor(g[:40], w2, 0.0)
errs["predictor"] = float(np.abs(p.logits(x) - predictor_logits_numpy(g[:40], w2, None, None, x[None])[0]).max())
if row_tiles.SUPPORTED:
    for fmt in ("q8_0", "q4_0"):
        q = quant.encode(g[:37], fmt).reshape(37, -1)
        out = np.empty(37, np.float32)
        code = ffn.FORMAT_CODES[fmt]
        row_tiles.matvec_x8_par(x, (row_tiles.pack_x8(q, code),), np.array([37], np.int64), code, 2, out)
        want = quant.roundtrip(g[:37], fmt).astype(np.float64) @ quant.roundtrip(x, "q8_0").astype(np.float64)
        errs["tiles_" + fmt] = float(np.abs(out - want).max() / np.abs(want).max())
        X = rng.standard_normal((6, d)).astype(np.float32)  # four tokens at a time, then two
        outs = np.empty((6, 37), np.float32)
        row_tiles.matmul_x8_par(X, row_tiles.pack_x8(q, code), 37, code, 2, outs)
        want = quant.roundtrip(X, "q8_0").astype(np.float64) @ quant.roundtrip(g[:37], fmt).astype(np.float64).T
        errs["tiles_matmul_" + fmt] = float(np.abs(outs - want).max() / np.abs(want).max())
print(json.dumps({"simd": ffn.SIMD, "gfni": ffn.GFNI, "tiles": row_tiles.SUPPORTED, "errs": errs}))
"""


def _host_features() -> list[str]:
    from numba.core import codegen

    return str(codegen.get_host_cpu_features()).split(",")


def _without(feats: list[str], names: set[str]) -> str:
    return ",".join(("-" + f[1:]) if f[1:] in names else f for f in feats)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 code paths")
@pytest.mark.parametrize("path", [2, 1, 0])
def test_quantized_kernels_on_each_x86_path(path, tmp_path):
    feats = _host_features()
    have = {f[1:] for f in feats if f.startswith("+")}
    if path == 2 and not ("avxvnni" in have or {"avx512vnni", "avx512vl"} <= have):
        pytest.skip("this CPU has no VNNI")
    if path >= 1 and not {"avx2", "fma", "f16c"} <= have:
        pytest.skip("this CPU has no AVX2")
    drop = {1: {"avx512vnni", "avxvnni", "gfni"}, 0: {"avx2"}}.get(path, set())
    env = dict(os.environ, NUMBA_CPU_FEATURES=_without(feats, drop), NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["simd"] == path
    assert out["gfni"] == (path == 2 and "gfni" in have)
    for fmt in ("q8_0", "q4_0"):
        assert out["errs"][fmt]["forward"] < 1e-4, out
        assert out["errs"][fmt]["rows"] < 1e-4 and out["errs"][fmt]["axpy"] < 1e-4, out
    assert out["errs"]["predictor"] < 1e-4, out
    assert out["tiles"] == (path > 0)  # the tiled matvecs run on both vector paths
    if path:
        assert max(out["errs"][k] for k in ("tiles_q8_0", "tiles_q4_0", "tiles_matmul_q8_0", "tiles_matmul_q4_0")) < 1e-5, out
