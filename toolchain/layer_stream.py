"""Layer-streamed runs of an IR for profiling and quality checks of models too large to
hold in memory as float32.

The onnxruntime path (:class:`~.ffn_tap.FFNTap`) loads the whole graph: every weight as
float32 in one session. :class:`StreamTap` instead runs the numpy reference executor
(``toolchain.reference``), which reads each weight from the tensor store (memory-mapped
or decoded) when a layer needs it and lets it go after: a batch of calibration sequences
is carried through the model layer by layer, so peak memory is one layer's float32
weights plus the batch's activations, whatever the model's size. The weights are read
once per batch, so the streamed path runs batches as large as the activation budget
allows (:func:`stream_batch`).

:func:`make_tap` picks the path: ``streaming="auto"`` streams when the model's float32
weights exceed ``memory_budget_mb``, ``"always"`` / ``"never"`` force it. Both taps give
the same values to float32 rounding (tested: statistics and histograms on random Llama
and BERT models), and the same interface: :meth:`visit` calls ``fn(layer, x, a)`` per
layer with the FFN input ``[B, T, d]`` and activation ``[B, T, n_ff]`` (padding rows
included; consumers select the real tokens) and returns the model's output (BERT: last
hidden states; decoders: logits when ``logits`` is set).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .errors import PassError
from .ir import ANNOTATION_PREFIX, ModelIR

STREAMING = ("auto", "always", "never")
LayerFn = Callable[[int, np.ndarray, np.ndarray], None]
_VOCAB_CHUNK = 8192  # LM head rows converted to float32 at a time


def float32_weight_bytes(ir: ModelIR) -> int:
    """Bytes of the model's weights as float32 (what one onnxruntime session holds)."""
    return 4 * sum(int(np.prod(ir.store.shape(n), dtype=np.int64)) for n in ir.store.names()
                   if not n.startswith(ANNOTATION_PREFIX))


def use_streaming(ir: ModelIR, streaming: str, memory_budget_mb: float) -> bool:
    """Whether to stream: ``always``, ``never``, or (``auto``) when the float32 weights
    exceed ``memory_budget_mb``."""
    if streaming not in STREAMING:
        raise PassError(f"streaming must be one of {', '.join(STREAMING)}, got {streaming!r}")
    if streaming != "auto":
        return streaming == "always"
    return float32_weight_bytes(ir) > memory_budget_mb * 1024 * 1024


def stream_batch(ir: ModelIR, seq_len: int, memory_budget_mb: float) -> int:
    """Sequences per streamed batch: the activations of a layer (float32 and the float64
    temporaries of the activation functions, ~``24 d + 40 n_ff`` bytes a token, plus the
    attention scores) within a quarter of ``memory_budget_mb``; at least one."""
    s = ir.spec
    per_token = 24 * s.hidden_size + 40 * s.intermediate_size + 8 * s.num_heads * seq_len
    return max(1, int(memory_budget_mb * 1024 * 1024 / 4) // max(1, per_token * seq_len))


class StreamTap:
    """The reference executor of ``ir`` with FFN taps (``taps`` lists the layers as
    :class:`~.ffn_tap.FFNTap`'s does; run it through :func:`visit`)."""

    def __init__(self, ir: ModelIR) -> None:
        from .reference import BertEncoder, LlamaDecoder

        self.ir = ir
        self.taps = [(b.layer, None, None) for b in ir.blocks]
        if ir.spec.family == "bert":
            self.model = BertEncoder(ir)
        elif ir.spec.family == "llama":
            self.model = LlamaDecoder(ir)
        else:
            raise PassError(f"no layer-streamed executor for the {ir.spec.family!r} family")

    def visit(self, ids: np.ndarray, mask: np.ndarray, fn: LayerFn, *, output: bool = False) -> np.ndarray | None:
        """Run a batch; ``fn(layer, x [B, T, d], a [B, T, n_ff])`` per layer, in layer
        order; returns the model's output when ``output`` (else None)."""
        B, T = ids.shape
        valid = np.asarray(mask).reshape(-1) != 0

        def capture(layer: int, x: np.ndarray, a: np.ndarray) -> None:
            if valid.all():
                fn(layer, x.reshape(B, T, -1), a.reshape(B, T, -1))
                return
            xf = np.zeros((B * T, x.shape[-1]), np.float32)
            af = np.zeros((B * T, a.shape[-1]), np.float32)
            xf[valid], af[valid] = x, a
            fn(layer, xf.reshape(B, T, -1), af.reshape(B, T, -1))

        if self.ir.spec.family == "bert":
            return self.model.hidden_states(ids, mask, capture=capture)
        hidden = self.model.forward(ids, attention_mask=mask, capture=capture, head=False)
        return self._logits(hidden) if output else None

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        """The LM head over ``hidden [B, T, d]``, a chunk of vocabulary rows at a time."""
        table = self.model.store.get(self.model.lm_head)
        x = hidden.reshape(-1, hidden.shape[-1])
        out = np.empty((x.shape[0], table.shape[0]), np.float32)
        for lo in range(0, table.shape[0], _VOCAB_CHUNK):
            out[:, lo: lo + _VOCAB_CHUNK] = x @ np.asarray(table[lo: lo + _VOCAB_CHUNK], dtype=np.float32).T
        return out.reshape(*hidden.shape[:-1], -1)


def visit(tap, ids: np.ndarray, mask: np.ndarray, fn: LayerFn, *, output: bool = False) -> np.ndarray | None:
    """:meth:`StreamTap.visit` for either tap (an :class:`~.ffn_tap.FFNTap` runs the batch
    at once, then hands out its layers)."""
    if isinstance(tap, StreamTap):
        return tap.visit(ids, mask, fn, output=output)
    out, taps = tap.run_with_output(ids, mask)
    for layer, x, a in taps:
        fn(layer, x, a)
    return out


def make_tap(ir: ModelIR, directory: Path, *, streaming: str = "auto", memory_budget_mb: float = 2048,
             threads: int | None = None):
    """An :class:`~.ffn_tap.FFNTap` over the IR's graph (built in ``directory`` if needed)
    or, when :func:`use_streaming`, a :class:`StreamTap`."""
    if use_streaming(ir, streaming, memory_budget_mb):
        return StreamTap(ir)
    from sparseforge.passes.profile import graph_with_taps

    from .ffn_tap import FFNTap

    graph, blocks = graph_with_taps(ir, directory)
    return FFNTap(graph, blocks, threads=threads)


