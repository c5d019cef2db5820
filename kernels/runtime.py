"""Python entry points over :mod:`.ffn`: one FFN layer's bundles ready to run.

``LayerKernels(blob, layout, activation=..., gate=None)`` holds a layer's bundles (``f16``
widened to ``f32`` once), and the gate matrix of a ``gate_apart`` layout, and runs:

* ``forward(x, idx=None)``: one token; ``idx`` the active neurons (sorted int32/int64),
  None for dense; returns ``y [d]`` (and ``h`` for the listed neurons with ``return_h``);
* ``gate_first(x)``: dReLU/ReLU-gated FFNs: ``act(x Wg)`` for every neuron, then up/down
  of the positive ones only (exact). A gate-apart layer's gate pass reads its own matrix
  (``gate_matvec``, when the caller sets one, e.g. the runtime's tiled Q4_0 matvec; the
  row kernel otherwise), and ``forward`` takes the listed neurons' gates from it too;
* ``rows(x, part, idx)`` / ``axpy(h, idx)``: the row-gather matvec and the down axpy;
* ``prefill(X, masks=None)``: T tokens; reads each neuron of the union of the masks once
  and computes it for the tokens whose mask is set, or switches to dense tiles (BLAS
  sgemm on the f32 bundles in place, or on dequantized rows) when the mask density
  (token-neuron pairs set / ``T n``) is at least :meth:`LayerKernels.dense_density` of
  ``T`` (:func:`measure_crossover` measures the switch point on the machine).

``Predictor(w1, b1, w2, b2, threshold)`` evaluates the low-rank MLP and selects the
neurons whose logit is ``>= threshold`` (or the top k). It runs in Q8_0 when ``d`` is a
multiple of 32 (:func:`predictor_format`), reading a quarter of the float32 bytes, as one
kernel call per token (``ffn.predictor_select_q8_0_*``): the first layer with the FFN
kernels' row dot (``W1`` rows and ``x`` quantized), the second as axpys of quantized
``W2^T`` rows for the positive hidden units, each thread over its own range of neurons,
then the threshold;
:func:`predictor_logits_numpy` is the same arithmetic in numpy, which the predictors
pass calibrates thresholds with.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import ffn, quant
from .bundle import BundleLayout, pack_bundles, unpack_bundles

_EMPTY = np.zeros(0, np.float32)
_NO_F32_ROWS = np.zeros((0, 0), np.float32)  # the float32 operand of a kernel given quantized rows
_LUT = quant.F16_TO_F32


def activation_spec(activation: str, gated: bool, up_activation: str | None = None,
                    threshold: float = 0.0) -> tuple[int, int, float]:
    """(act code, up_relu, act threshold) of an FFN activation; ``drelu`` is the gated
    ReLU x ReLU shorthand."""
    if activation == "drelu":
        if not gated:
            raise ValueError("drelu needs a gated FFN")
        activation, up_activation = "relu", "relu"
    if activation not in ffn.ACT_CODES:
        raise ValueError(f"unsupported activation {activation!r}; supported: {', '.join(ffn.ACT_CODES)}, drelu")
    if up_activation not in (None, "relu"):
        raise ValueError(f"unsupported up activation {up_activation!r}")
    return ffn.ACT_CODES[activation], int(up_activation == "relu"), float(threshold)


def _bias(b, size, name):
    if b is None:
        return _EMPTY
    b = np.ascontiguousarray(b, np.float32)
    if b.shape != (size,):
        raise ValueError(f"{name} has shape {b.shape}; expected ({size},)")
    return b


def roundtrip_q8_0(X: np.ndarray) -> np.ndarray:
    """``X [..., k]`` as the quantized kernels see it: each row Q8_0-quantized and decoded
    (``quant.roundtrip(X, "q8_0")`` bit for bit, through :func:`ffn.roundtrip_q8_0_rows`)."""
    X = np.ascontiguousarray(X, np.float32)
    out = np.empty_like(X)
    ffn.roundtrip_q8_0_rows(X.reshape(-1, X.shape[-1]), out.reshape(-1, X.shape[-1]))
    return out


def _idx(idx, n):
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if idx.ndim != 1 or not ffn.indices_within(idx, n):
        raise ValueError(f"neuron indices must be a 1-D array within [0, {n})")
    return idx


class LayerKernels:
    """One FFN layer's bundles plus its activation, ready for the kernels."""

    def __init__(self, blob: np.ndarray, layout: BundleLayout, activation: str = "relu",
                 up_activation: str | None = None, activation_threshold: float = 0.0,
                 output_threshold: float = 0.0, gate_bias=None, up_bias=None, down_bias=None,
                 nchunks: int | None = None, crossover: float | None = None, serial_below: int = 1 << 18,
                 gate: np.ndarray | None = None, keep_float32: bool = False) -> None:
        """``gate``: a ``gate_apart`` layout's gate as :func:`~.bundle.encode_gate` gives it
        (required exactly then). ``keep_float32``: quantized layers keep their parts
        dequantized (float32 ``[n, d]`` each, made by the first dense prefill: 3.8x the
        Q8_0 bytes, 7.1x the Q4_0 bytes) instead of dequantizing them on every dense
        prefill (threads that race to make a part make the same floats)."""
        if (gate is not None) != layout.gate_apart:
            raise ValueError("the gate matrix must be given exactly when the layout is gate_apart")
        blob = np.ascontiguousarray(blob, dtype=np.uint8).reshape(layout.n_neurons, layout.stride)
        if layout.fmt == "f16":
            g, u, dn = unpack_bundles(blob, layout)
            layout = BundleLayout("f32", layout.d_model, layout.n_neurons, layout.gated, layout.align,
                                  layout.gate_apart)
            blob = pack_bundles(g, u, dn, layout)
            if gate is not None:
                gate = np.asarray(gate, np.float16).astype(np.float32)
        self.layout = layout
        self._part_bytes = layout.part_bytes
        self.blob = blob
        self.fmt = ffn.FORMAT_CODES[layout.fmt]
        self.d, self.n, self.gated = layout.d_model, layout.n_neurons, layout.gated
        if self.fmt == ffn.F32:
            self.wf, self.wq = blob.view(np.float32), np.zeros((1, 1), np.int8)
            unit = 4
        else:
            self.wf, self.wq = np.zeros((1, 1), np.float32), blob.view(np.int8)
            unit = 1
        self.po = {p: layout.part_offset(p) // unit for p in layout.parts}
        self.po_g = self.po.get("gate", 0)
        self.gate_apart = layout.gate_apart
        self.gate_matvec = None  # optional: x [d] -> the n gate pre-activations (no bias) of a gate-apart layer
        if gate is None:
            self.gf, self.gq = self.wf, self.wq  # the gate rows: in the bundles, at po_g
        elif self.fmt == ffn.F32:
            self.gf, self.gq = np.ascontiguousarray(gate, np.float32).reshape(self.n, self.d), self.wq
        else:
            self.gf, self.gq = self.wf, np.ascontiguousarray(gate).view(np.int8).reshape(self.n, layout.part_bytes)
        self.act, self.up_relu, self.act_t = activation_spec(activation, self.gated, up_activation,
                                                             activation_threshold)
        self.out_t = float(output_threshold)
        self.bg = _bias(gate_bias, self.n, "gate bias") if self.gated else _EMPTY
        self.bu = _bias(up_bias, self.n, "up bias")
        self.bd = _bias(down_bias, self.d, "down bias")
        self.nchunks = nchunks or ffn.default_chunks()
        fit = SWITCH_FITS["f32" if layout.fmt == "f32" else "quantized"]  # f16 was widened to f32 above
        self.crossover = fit.crossover(self.d) if crossover is None else float(crossover)
        self.slope = fit.slope
        self.serial_below = serial_below
        self._all = np.arange(self.n, dtype=np.int64)
        self.keep_float32 = keep_float32
        self._float32: dict[tuple[int, bool], np.ndarray] = {}  # (part offset, gate) -> [n, d]

    def _serial(self, idx: np.ndarray, parts: int) -> bool:
        """Run in the calling thread when the weights touched are fewer than ``serial_below`` bytes."""
        return idx.shape[0] * parts * self._part_bytes < self.serial_below

    # -- one token -------------------------------------------------------------------
    def forward(self, x: np.ndarray, idx: np.ndarray | None = None, return_h: bool = False, _gpre=_EMPTY):
        x = np.ascontiguousarray(x, np.float32)
        if self.gate_apart and _gpre.shape[0] == 0:  # the gates come from the gate matrix
            _gpre = self.gates(x) if idx is None else self.rows(x, "gate", idx)
        idx = self._all if idx is None else _idx(idx, self.n)
        h = np.empty(idx.shape[0], np.float32)
        y = np.empty(self.d, np.float32)
        kernel = ffn.ffn_sparse_ser if self._serial(idx, 3) else ffn.ffn_sparse_par
        kernel(x, self.wf, self.wq, idx, self.fmt, self.d, int(self.gated), self.act,
                       np.float32(self.act_t), self.up_relu, np.float32(self.out_t), self.po_g, self.po["up"],
                       self.po["down"], self.bg, self.bu, self.bd, _LUT, self.nchunks, _gpre, h, y)
        return (y, h) if return_h else y

    def rows(self, x: np.ndarray, part: str, idx: np.ndarray | None = None) -> np.ndarray:
        """Pre-activations ``W_part[idx] x (+ bias)`` of the gate or up rows."""
        x = np.ascontiguousarray(x, np.float32)
        idx = self._all if idx is None else _idx(idx, self.n)
        if part == "gate" and self.gated:
            wf, wq, po, bias = self.gf, self.gq, self.po_g, self.bg
        elif part == "up":
            wf, wq, po, bias = self.wf, self.wq, self.po["up"], self.bu
        else:
            raise ValueError(f"rows() takes {'gate or up' if self.gated else 'up'}; got {part!r}")
        out = np.empty(idx.shape[0], np.float32)
        kernel = ffn.rows_sparse_ser if self._serial(idx, 1) else ffn.rows_sparse_par
        kernel(x, wf, wq, idx, self.fmt, self.d, po, bias, _LUT, self.nchunks, out)
        return out

    def gates(self, x: np.ndarray) -> np.ndarray:
        """Every neuron's gate pre-activation ``Wg x (+ bias)`` (``gate_matvec`` when set)."""
        if self.gate_matvec is None:
            return self.rows(x, "gate")
        g = self.gate_matvec(np.ascontiguousarray(x, np.float32))
        if self.bg.size:
            g += self.bg
        return g

    def axpy(self, h: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        """``sum_p h[p] * down[:, idx[p]]`` (no bias)."""
        idx = self._all if idx is None else _idx(idx, self.n)
        h = np.ascontiguousarray(h, np.float32)
        if h.shape != idx.shape:
            raise ValueError("h and idx must have the same length")
        y = np.empty(self.d, np.float32)
        kernel = ffn.axpy_sparse_ser if self._serial(idx, 1) else ffn.axpy_sparse_par
        kernel(h, self.wf, self.wq, idx, self.fmt, self.d, self.po["down"], _LUT, self.nchunks, y)
        return y

    def _gate_threshold(self) -> np.float32:
        """The gate value a gate-first neuron must exceed (ValueError: not a layer that has one)."""
        if not self.gated or self.act not in (ffn.RELU, ffn.FATRELU):
            raise ValueError("gate-first needs a gated FFN with a relu/fatrelu gate")
        return np.float32(self.act_t if self.act == ffn.FATRELU else 0.0)

    def gate_first(self, x: np.ndarray, return_idx: bool = False):
        """Exact FFN of a ReLU-family gated layer: all gates first, then only positives."""
        t = self._gate_threshold()
        g = self.gates(x)
        idx = np.empty(self.n, np.int64)
        m = ffn.select_positive(g, t, idx)
        idx = idx[:m]
        y = self.forward(x, idx, _gpre=np.ascontiguousarray(g[idx]) if m else np.zeros(1, np.float32)[:0])
        return (y, idx) if return_idx else y

    # -- many tokens -----------------------------------------------------------------
    def gate_masks(self, X: np.ndarray) -> np.ndarray:
        """``[T, n]`` bool: the neurons of a ReLU-family gated layer whose gate is above its
        threshold for each token of ``X [T, d]`` (the others output 0: :meth:`prefill` with
        these masks is exact), the gates multiplied densely in :meth:`dense_tile` tiles
        (sgemm; quantized gates dequantized a tile at a time, ``X`` rounded to Q8_0 as the
        kernels round it)."""
        t = self._gate_threshold()
        Xk, tile, buf = self._tiling(np.ascontiguousarray(X, np.float32), None)
        masks = np.empty((X.shape[0], self.n), np.bool_)
        for lo in range(0, self.n, tile):
            hi = min(self.n, lo + tile)
            masks[:, lo:hi] = self._tile_product(Xk, lo, hi, self.po_g, buf, self.bg, gate=True) > t
        return masks

    def dense_density(self, tokens: int, threads: tuple[int, int] = (1, 1)) -> float:
        """The mask density at and above which dense tiles beat the sparse kernel for a
        call of ``tokens`` tokens with ``threads`` = (the sparse kernel's threads, BLAS
        sgemm's threads): ``crossover`` (the switch point at :data:`CROSSOVER_TOKENS`
        tokens, equal thread counts) times ``(CROSSOVER_TOKENS / tokens) ** slope`` (the
        format's :class:`SwitchFit`) times ``threads[0] / threads[1]``. Dense tiles cost
        sgemm per token (after a dequantization per neuron in quantized layers), the
        sparse kernel a dot per token-neuron pair, so the more tokens, the lower the
        density at which dense wins; above 1 the sparse kernel always runs."""
        ratio = max(int(threads[0]), 1) / max(int(threads[1]), 1)
        return self.crossover * (CROSSOVER_TOKENS / max(int(tokens), 1)) ** self.slope * ratio

    def prefill(self, X: np.ndarray, masks: np.ndarray | None = None, mode: str = "auto",
                threads: tuple[int, int] = (1, 1)) -> np.ndarray:
        """``Y [T, d]`` for ``X [T, d]``; ``masks [T, n]`` bool (None: all neurons).
        ``mode``: ``auto`` (dense when the mask density >= ``dense_density(T, threads)``),
        ``sparse``, ``dense``."""
        X = np.ascontiguousarray(X, np.float32)
        if X.ndim != 2 or X.shape[1] != self.d:
            raise ValueError(f"X must be [T, {self.d}]")
        T = X.shape[0]
        if masks is not None:
            masks = np.ascontiguousarray(masks, dtype=np.bool_)
            if masks.shape != (T, self.n):
                raise ValueError(f"masks must be [T, {self.n}]")
            density = np.count_nonzero(masks) / max(T * self.n, 1)
        else:
            density = 1.0
        if mode == "dense" or (mode == "auto" and density >= self.dense_density(T, threads)):
            return self._prefill_dense(X, masks)
        union = np.flatnonzero(masks.any(axis=0)).astype(np.int64) if masks is not None else self._all
        Y = np.empty_like(X)
        ffn.ffn_prefill_sparse(X, self.wf, self.wq, union, masks if masks is not None else np.zeros((0, 0), np.bool_),
                               self.fmt, self.d, int(self.gated), self.act, np.float32(self.act_t), self.up_relu,
                               np.float32(self.out_t), self.po_g, self.po["up"], self.po["down"], self.bg, self.bu,
                               self.bd, _LUT, self.nchunks, self.gf, self.gq, self.gate_apart, Y)
        return Y

    def _part_tile(self, lo: int, hi: int, po: int, buf: np.ndarray, gate: bool = False) -> np.ndarray:
        """Part ``po`` of neurons ``lo..hi`` (``gate``: the gate rows, wherever they are) as
        float32 ``[hi - lo, d]``: for f32 bundles a view of the bundles (rows one bundle
        stride apart, which sgemm reads in place; a 2048 x 5632 gated layer's tiles at 8 /
        128 tokens: 13.1 / 39.5 ms, against 23.9 / 51.4 ms copying each part out first),
        a view of the kept float32 part (``keep_float32``), otherwise dequantized into
        ``buf``."""
        wf, wq = (self.gf, self.gq) if gate else (self.wf, self.wq)
        if self.fmt == ffn.F32:
            return wf[lo:hi, po:po + self.d]
        if self.keep_float32:
            part = self._float32.get((po, gate))
            if part is None:
                part = np.empty((self.n, self.d), np.float32)
                ffn.dequantize_rows(wf, wq, 0, self.n, self.fmt, self.d, po, _LUT, part)
                self._float32[po, gate] = part
            return part[lo:hi]
        w = buf[:hi - lo]
        ffn.dequantize_rows(wf, wq, lo, hi, self.fmt, self.d, po, _LUT, w)
        return w

    @property
    def _dequantizes_tiles(self) -> bool:
        """Whether each dense prefill tile is dequantized into a buffer (quantized parts
        not kept in float32)."""
        return self.fmt != ffn.F32 and not self.keep_float32

    def dense_tile(self, tokens: int) -> int:
        """Neurons per dense prefill tile of ``tokens`` tokens: :data:`TILE_NEURONS` when
        each tile is dequantized into a buffer; otherwise as many as keep the ``[tokens,
        tile]`` activations within :data:`TILE_FLOATS` (at least :data:`TILE_NEURONS`, at
        most the layer), fewer and larger sgemm calls (all-MiniLM-L6-v2 Q8_0 kept in
        float32, 8 x 16 tokens: 16.2 -> 15.0 ms a batch for 512 -> 1536)."""
        if self._dequantizes_tiles:
            return TILE_NEURONS
        return int(min(self.n, max(TILE_NEURONS, TILE_FLOATS // max(int(tokens), 1))))

    def _prefill_dense(self, X: np.ndarray, masks: np.ndarray | None, tile: int | None = None) -> np.ndarray:
        """Dense tiles of ``tile`` neurons (default :meth:`dense_tile`): sgemm, activation,
        sgemm (quantized parts dequantized first, and X quantized to Q8_0, as the sparse
        kernels do)."""
        Xk, tile, buf = self._tiling(X, tile)
        Y = np.zeros_like(X) + (self.bd if self.bd.size else 0)
        empty_mask = np.zeros((0, 0), np.bool_)
        for lo in range(0, self.n, tile):
            hi = min(self.n, lo + tile)
            U = self._tile_product(Xk, lo, hi, self.po["up"], buf, self.bu)
            G = self._tile_product(Xk, lo, hi, self.po_g, buf, self.bg, gate=True) if self.gated else U
            U = np.ascontiguousarray(U)
            m = np.ascontiguousarray(masks[:, lo:hi]) if masks is not None else empty_mask
            ffn.apply_activation_2d(np.ascontiguousarray(G), U, m, self.gated, self.act, np.float32(self.act_t),
                                    self.up_relu, np.float32(self.out_t))
            Y += U @ self._part_tile(lo, hi, self.po["down"], buf)
        return Y

    def _tiling(self, X: np.ndarray, tile: int | None) -> tuple[np.ndarray, int, np.ndarray]:
        """``(Xk, tile, buf)`` of a dense pass over ``X [T, d]``: ``X`` as the kernels see
        it (rounded to Q8_0 for quantized parts), the neurons per tile (``tile``, default
        :meth:`dense_tile`) and the buffer tiles are dequantized into (if they are)."""
        tile = tile or self.dense_tile(X.shape[0])
        Xk = X if self.fmt == ffn.F32 else roundtrip_q8_0(X)
        return Xk, tile, np.empty((tile, self.d), np.float32) if self._dequantizes_tiles else _NO_F32_ROWS

    def _tile_product(self, Xk: np.ndarray, lo: int, hi: int, po: int, buf: np.ndarray, bias: np.ndarray,
                      gate: bool = False) -> np.ndarray:
        """``[T, hi - lo]``: ``Xk [T, d]`` times neurons ``lo..hi`` of part ``po``
        (:meth:`_part_tile`) transposed, plus ``bias[lo:hi]`` if there is a bias."""
        P = Xk @ self._part_tile(lo, hi, po, buf, gate).T
        if bias.size:
            P += bias[lo:hi]
        return P


TILE_NEURONS = 512
"""Neurons per dense prefill tile dequantized per call (a ``[512, d]`` float32 buffer:
a quantized layer is never held whole in float32 unless ``keep_float32``)."""
TILE_FLOATS = 1 << 21
"""Bound on a dense prefill tile's ``[T, tile]`` activations (8 MB) when its weights need
no dequantization (:meth:`LayerKernels.dense_tile`)."""

CROSSOVER_TOKENS = 32
"""The token count at which ``LayerKernels.crossover`` is stated."""


@dataclass(frozen=True)
class SwitchFit:
    """Where dense prefill tiles start to beat the sparse kernel, fitted per kind of
    weights to the points measured on a 2-core x86 machine (docs/kernels.md): the mask
    density ``at_2048`` at :data:`CROSSOVER_TOKENS` tokens, equal thread counts and
    d = 2048, scaled by ``(d / 2048) ** d_exponent`` (a dot's fixed cost weighs more in
    short rows) and by ``(CROSSOVER_TOKENS / T) ** slope`` at T tokens."""

    at_2048: float
    d_exponent: float
    slope: float

    def crossover(self, d: int) -> float:
        """The switch point at :data:`CROSSOVER_TOKENS` tokens, equal thread counts, for
        ``d``-wide rows."""
        return self.at_2048 * (d / 2048) ** self.d_exponent


SWITCH_FITS = {
    # f32 tiles multiply the bundles in place: a least-squares fit (log space) to the
    # 2048 x 5632 gated and 384 x 1536 layers' points
    "f32": SwitchFit(at_2048=0.73, d_exponent=0.23, slope=0.47),
    # quantized tiles dequantize first, the sparse kernel reads int8: 2048 x 5632 gated
    # Q4_0 (Q8_0 within 10% of Q4_0 on the same layer); a 384 x 1536 Q4_0 layer's point
    # (0.20 at 32 tokens, threads 1 / 2) puts d_exponent at 0.64-1.04
    "quantized": SwitchFit(at_2048=2.4, d_exponent=0.7, slope=0.65),
}


def measure_crossover(kernels: LayerKernels, tokens: int = CROSSOVER_TOKENS,
                      densities=(0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0), seed: int = 0, repeat: int = 2,
                      threads: tuple[int, int] = (1, 1)) -> float:
    """The smallest mask density (of ``densities``) at which dense prefill of ``tokens``
    tokens beats the sparse kernel on this machine, with ``threads`` = (the sparse
    kernel's threads, sgemm's threads) as the caller has set them, restated at
    :data:`CROSSOVER_TOKENS` tokens and equal thread counts and set as
    ``kernels.crossover`` (returned); when dense never wins, the switch point is taken as
    twice the last density."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((tokens, kernels.d)).astype(np.float32)

    def best(fn):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    kernels.prefill(X[:2], None, mode="sparse")  # compile outside the timing
    kernels.prefill(X[:2], None, mode="dense")
    found = 2.0 * densities[-1]
    for dens in densities:
        masks = rng.random((tokens, kernels.n)) < dens
        if best(lambda: kernels.prefill(X, masks, mode="dense")) <= best(lambda: kernels.prefill(X, masks, mode="sparse")):
            found = dens
            break
    kernels.crossover = found * (tokens / CROSSOVER_TOKENS) ** kernels.slope * threads[1] / threads[0]
    return kernels.crossover


def predictor_format(d: int) -> str:
    """``q8_0`` when a predictor's input width ``d`` is a multiple of 32, else ``f32``."""
    return "q8_0" if d % quant.BLOCK == 0 else "f32"


def _padded(k: int) -> int:
    return -(-k // quant.BLOCK) * quant.BLOCK


def predictor_w2t_q8_0(w2: np.ndarray) -> np.ndarray:
    """``W2 [n, r]`` as Q8_0 rows of ``W2^T`` (``[r, n]``, ``n`` zero-padded to a multiple
    of 32), the int8 view: the second layer runs as ``r`` axpys over the neurons."""
    w2t = np.asarray(w2, np.float32).T
    return quant.quantize_q8_0(np.pad(w2t, ((0, 0), (0, _padded(w2t.shape[1]) - w2t.shape[1])))).view(np.int8)


def predictor_effective_weights(w1: np.ndarray, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(W1 [r, d], W2 [n, r])`` as :class:`Predictor`'s arithmetic sees them, float32:
    with Q8_0 (:func:`predictor_format`), ``W1`` rows and ``W2^T`` rows decoded from Q8_0."""
    w1 = np.asarray(w1, np.float32)
    w2 = np.asarray(w2, np.float32)
    if predictor_format(w1.shape[1]) != "q8_0":
        return w1, w2
    return quant.roundtrip(w1, "q8_0"), quant.dequantize_q8_0(predictor_w2t_q8_0(w2).view(np.uint8))[:, :w2.shape[0]].T


def predictor_logits_numpy(w1: np.ndarray, w2: np.ndarray, b1: np.ndarray | None, b2: np.ndarray | None,
                           X: np.ndarray, effective: bool = False) -> np.ndarray:
    """Logits ``[T, n]`` of inputs ``X [T, d]`` with :class:`Predictor`'s arithmetic, in
    numpy: with Q8_0 (:func:`predictor_format`), ``X`` and ``W1`` rows quantized for the
    first layer, ``W2^T`` rows quantized for the second (the hidden vector stays float32).
    ``effective``: ``w1``/``w2`` are already :func:`predictor_effective_weights`."""
    if not effective:
        w1, w2 = predictor_effective_weights(w1, w2)
    X = np.asarray(X, dtype=np.float32)
    if predictor_format(w1.shape[1]) == "q8_0":
        X = roundtrip_q8_0(X)
    h = X @ w1.T
    if b1 is not None and np.size(b1):
        h += b1
    np.maximum(h, np.float32(0), out=h)
    z = h @ w2.T
    if b2 is not None and np.size(b2):
        z += b2
    return z


class Scratch:
    """Named float32 work buffers that calls made one at a time share (one set per
    runtime): decoded weights live only while a call uses them, and fresh pages are not
    faulted in again for every layer (decoding a predictor's 2 + 5.8 MB of float32 into
    new arrays cost 4-7 ms here, into these buffers 0.2 ms)."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 ``shape`` array (contents undefined), grown when too small."""
        size = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = self._buffers[name] = np.empty(size, np.float32)
        return buf[:size].reshape(shape)


PREDICTOR_BATCH_MAX = 96
"""Tokens up to which a Q8_0 predictor's prefill runs its multi-token kernel
(:func:`~.ffn.predictor_logits_q8_0_batch`; more: decoded rows and sgemm)."""
PREDICTOR_STEP_BYTES = 1 << 17
"""Bytes of weights the multi-token predictor kernel reads for every token before the next step."""


@dataclass
class Predictor:
    """A layer's neuron predictor: ``logits = relu(x W1^T + b1) W2^T + b2``; a neuron is
    predicted active when its logit is ``>= threshold``.

    ``w1 [r, d]`` and ``w2 [n, r]`` are read once here. A Q8_0 predictor keeps only its
    Q8_0 rows (a quarter of the float32 bytes) and sets ``w1``/``w2`` to None; a float32
    one keeps them as given (a memory-mapped artifact's tensors stay in the file)."""

    w1: np.ndarray | None
    w2: np.ndarray | None
    threshold: float = 0.0
    b1: np.ndarray | None = None
    b2: np.ndarray | None = None
    serial_below: int = 1 << 18  # bytes of W2 below which evaluation stays in the calling thread

    def __post_init__(self) -> None:
        w1 = np.ascontiguousarray(self.w1, np.float32)
        w2 = np.ascontiguousarray(self.w2, np.float32)
        self.rank, self.d, self.n = w1.shape[0], w1.shape[1], w2.shape[0]
        if w2.shape[1] != self.rank:
            raise ValueError(f"w2 must be [n, {self.rank}]")
        self.b1 = _bias(self.b1, self.rank, "b1")
        self.b2 = _bias(self.b2, self.n, "b2")
        self._hidden = np.empty(self.rank, np.float32)
        self._idx = np.empty(self.n, np.int64)
        self.fmt = predictor_format(self.d)
        if self.fmt == "q8_0":
            self._q1 = quant.quantize_q8_0(w1).view(np.int8)
            self._q2t = predictor_w2t_q8_0(w2)
            self._acc = np.empty(_padded(self.n), np.float32)
            self.w1 = self.w2 = None
        else:
            self.w1, self.w2 = w1, w2
            self._logits = np.empty(self.n, np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of weights read per token."""
        if self.fmt == "q8_0":
            return int(self._q1.nbytes + self._q2t.nbytes)
        return int(self.w1.nbytes + self.w2.nbytes)

    @property
    def serial(self) -> bool:
        """True when evaluation stays in the calling thread (second layer's stored bytes
        below ``serial_below``)."""
        return (self._q2t.nbytes if self.fmt == "q8_0" else self.w2.nbytes) < self.serial_below

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits ``[n]`` of one token ``x [d]`` (a buffer reused by the next call)."""
        x = np.ascontiguousarray(x, np.float32)
        if self.fmt == "q8_0":
            self._select_q8_0(x, np.float32(np.inf))
            return self._acc[:self.n]
        kernel = ffn.predictor_logits_ser if self.serial else ffn.predictor_logits_par
        kernel(x, self.w1, self.b1, self.w2, self.b2, ffn.default_chunks(), self._hidden, self._logits)
        return self._logits

    def _select_q8_0(self, x: np.ndarray, t: np.float32) -> int:
        """One fused kernel call: hidden units, logits (into ``_acc``) and the neurons
        with ``logit >= t`` (into ``_idx``, ascending); returns their count."""
        kernel = ffn.predictor_select_q8_0_ser if self.serial else ffn.predictor_select_q8_0_par
        return kernel(x, self._q1, self.b1, self._q2t, self.b2, self.n, t, _LUT,
                      ffn.num_threads(), self._hidden, self._acc, self._idx)

    def logits_batch(self, X: np.ndarray, scratch: Scratch | None = None) -> np.ndarray:
        """Logits ``[T, n]`` of ``X [T, d]`` (prefill), the arithmetic of :meth:`logits`.
        A Q8_0 predictor runs up to :data:`PREDICTOR_BATCH_MAX` tokens through its
        multi-token kernel (each token the one-token kernel's arithmetic); more, its
        rows are decoded into float32 buffers of ``scratch``
        (the predictors of a model share one; None: a new one) and
        :func:`predictor_logits_numpy` multiplies (BLAS sgemm)."""
        X = np.ascontiguousarray(X, np.float32)
        if self.fmt != "q8_0":
            return predictor_logits_numpy(self.w1, self.w2, self.b1, self.b2, X, effective=True)
        if X.shape[0] <= PREDICTOR_BATCH_MAX:
            T = X.shape[0]
            Z = np.empty((T, self._acc.shape[0]), np.float32)
            ffn.predictor_logits_q8_0_batch(X, self._q1, self.b1, self._q2t, self.b2, self.n, _LUT, ffn.default_chunks(),
                                            PREDICTOR_STEP_BYTES, Z)
            return Z[:, :self.n]
        scratch = scratch if scratch is not None else Scratch()
        w1 = scratch.buffer("predictor.w1", (self.rank, self.d))
        w2t = scratch.buffer("predictor.w2t", (self.rank, _padded(self.n)))
        ffn.dequantize_rows(_NO_F32_ROWS, self._q1, 0, self.rank, ffn.Q8_0, self.d, 0, _LUT, w1)
        ffn.dequantize_rows(_NO_F32_ROWS, self._q2t, 0, self.rank, ffn.Q8_0, w2t.shape[1], 0, _LUT, w2t)
        return predictor_logits_numpy(w1, w2t[:, :self.n].T, self.b1, self.b2, X, effective=True)

    def select(self, x: np.ndarray, top_k: int | None = None) -> np.ndarray:
        """Active neuron indices (ascending): logits >= threshold, or the ``top_k`` largest."""
        if top_k is not None:
            m = ffn.select_topk(self.logits(x), int(top_k), self._idx)
            return self._idx[:m].copy()
        if self.fmt == "q8_0":
            m = self._select_q8_0(np.ascontiguousarray(x, np.float32), np.float32(self.threshold))
        else:  # select_positive takes logit > t
            t = np.nextafter(np.float32(self.threshold), np.float32(-np.inf))
            m = ffn.select_positive(self.logits(x), t, self._idx)
        return self._idx[:m].copy()
