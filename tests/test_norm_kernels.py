"""The runtimes' norm and softmax kernels against numpy (float64); numpy and the kernels
only, so that ``make test-arm`` runs them on emulated aarch64 too."""
from __future__ import annotations

import numpy as np

from sparseforge.kernels.attention import add_layer_norm_rows, rms_norm_into, softmax_rows


def test_rms_norm_into():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(96).astype(np.float32) * 3
    w = rng.standard_normal(96).astype(np.float32)
    out = np.empty_like(x)
    rms_norm_into(x, w, 1e-5, out)
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-5) * w
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_add_layer_norm_rows_against_float64_numpy():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((7, 96)) * 3 + 5).astype(np.float32)  # an offset mean: cancellation
    r = rng.standard_normal((7, 96)).astype(np.float32)
    w, b = rng.standard_normal((2, 96)).astype(np.float32)
    for res in (r, None):
        v = x.astype(np.float64) + (0 if res is None else res)
        c = v - v.mean(1, keepdims=True)
        want = c / np.sqrt((c * c).mean(1, keepdims=True) + 1e-12) * w + b
        out = np.empty_like(x)
        add_layer_norm_rows(x, np.zeros((0, 0), np.float32) if res is None else res, w, b, 1e-12, out)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_softmax_rows_against_float64_numpy():
    rng = np.random.default_rng(2)
    s = (rng.standard_normal((64, 100)) * 8).astype(np.float32)
    s[3, 50:] = np.finfo(np.float32).min  # masked keys, as the encoder adds them
    s[4, 1:] = s[4, 0] - 85  # one key far ahead of the rest: the others are e^-85, i.e. 0
    v = s.astype(np.float64)
    want = np.exp(v - v.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    got = s.copy()
    softmax_rows(got)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9)
    assert np.all(got[3, 50:] == 0) and np.all(got[4, 1:] == 0)
    tiny = got[(got != 0)]
    assert tiny.min() >= np.finfo(np.float32).tiny  # no subnormals (slow in the BLAS calls after)
