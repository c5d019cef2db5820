"""The sparseforge runtime: run a GGUF artifact with the sparse FFN kernels.

```python
from sparseforge.toolchain.runtime import load_runtime, Sampler

rt = load_runtime("out/model.gguf")                 # encoder: EncoderRuntime
emb = rt.embed(["a sentence", "another one"])       # [2, d], L2-normalised
rt = load_runtime("llama/model.gguf", kv_cache="f16")  # decoder: DecoderRuntime
text = rt.generate_text("Once upon", 32, Sampler(greedy=False, top_p=0.9, seed=0))
```

Modules: :mod:`.runtime_load` (artifact, weights, kernels, predictors, FFN modes),
:mod:`.runtime_encoder` (embeddings), :mod:`.runtime_decoder` (KV cache, prefill,
decode, generation), :mod:`.runtime_sampling` (greedy / top-p).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .runtime_decoder import DecoderRuntime
from .runtime_encoder import EncoderRuntime
from .runtime_load import LINEAR_MODES, MODES, FFNRunner, LoadedModel, layer_modes
from .runtime_sampling import Sampler, top_p_probs

Runtime = Union[EncoderRuntime, DecoderRuntime]


def runtime_for(model: LoadedModel, mode: str = "sparse", *, kv_cache: str = "f32", **kwargs) -> Runtime:
    """The executor of an opened artifact: encoders embed (``kwargs``: ``max_length``),
    decoders generate with a KV cache of ``kv_cache`` (``f32`` or ``f16``; an encoder has
    none: ``f32`` only)."""
    if model.spec.causal:
        return DecoderRuntime(model, mode, kv_cache, **kwargs)
    if kv_cache != "f32":
        raise ValueError(f"kv_cache={kv_cache!r}: an encoder has no KV cache")
    return EncoderRuntime(model, mode, **kwargs)


def load_runtime(path: str | Path, mode: str = "sparse", *, linear: str = "auto", verify_checksums: bool = True,
                 **kwargs) -> Runtime:
    """Open (memory-map and validate) the artifact at ``path`` and return its runtime.

    ``mode``: ``sparse`` (each layer as the predictors pass chose), ``predictor``,
    ``gate-first`` or ``dense``; ``linear``: ``auto``, ``dequantize`` or ``quantized``
    (how attention/embedding/LM-head matrices are multiplied, and whether a quantized
    FFN keeps its parts in float32 after its first dense prefill; see :mod:`.runtime_load`);
    ``kwargs``: :func:`runtime_for`'s (``kv_cache``, ``max_length``)."""
    return runtime_for(LoadedModel.open(path, linear=linear, verify_checksums=verify_checksums), mode, **kwargs)


__all__ = ["DecoderRuntime", "EncoderRuntime", "FFNRunner", "LINEAR_MODES", "LoadedModel", "MODES", "Runtime",
           "Sampler", "layer_modes", "load_runtime", "runtime_for", "top_p_probs"]
