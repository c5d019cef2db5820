"""The decoder runtime's cached decode steps against one forward over the whole sequence
(the decode-step attention, norm and softmax kernels on their own:
tests/test_norm_kernels.py)."""
from __future__ import annotations

import numpy as np
from _runtime_artifacts import llama_out  # noqa: F401 (fixture)

from sparseforge.toolchain.runtime import load_runtime


def test_decoder_decode_steps_match_full_forward(llama_out):
    rt = load_runtime(llama_out / "model.gguf", mode="dense", linear="dequantize")
    ids = np.random.default_rng(3).integers(0, 100, 20)
    want = rt.forward(ids, all_logits=True)
    cache = rt.new_cache()  # 16 positions, grown at the 17th (a decode step)
    got = [rt.forward(ids[:12], cache, all_logits=True)] + [rt.forward([t], cache)[None] for t in ids[12:]]
    assert cache.length == ids.size
    np.testing.assert_allclose(np.concatenate(got), want, rtol=0, atol=1e-4 * np.abs(want).max())
