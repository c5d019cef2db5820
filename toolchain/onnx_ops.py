"""Sub-graph emitters for :mod:`.onnx_builder`: a small ONNX graph under construction and
one function per transformer piece (linear, norms, RoPE, attention, FFN).

Shapes use ``B`` batch, ``S`` sequence, ``d`` model width, ``H`` attention heads, ``K``
key/value heads, ``R = H / K`` query heads per key/value head, ``hd`` head dim. All
activations are float32. Weights stay in their canonical ``[out, in]`` layout and are
applied with ``Gemm(transB=1)`` on the tokens flattened to 2-D, so neither the files nor
onnxruntime hold a transposed copy.

FFN activations are :data:`ACTIVATIONS` entries ``fn(graph, z, block, name) -> value``;
a new kind (e.g. a thresholded ReLU reading its threshold from ``block.annotations``) is
one more entry.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from .ir import FFNBlock
from .reference.rope import Rope

OPSET = 20
NEG = float(np.finfo(np.float32).min)


class WeightSource(Protocol):
    """Makes the initializer of a store tensor (FLOAT or FLOAT16, canonical layout)."""

    def initializer(self, name: str) -> TensorProto: ...


class Graph:
    """Nodes, initializers and unique value names of a graph being built.

    ``input_ids`` [B, S] is expected as a graph input; ``dims`` ([B, S]), ``seq`` (S, a
    scalar) and ``positions`` ([S], 0..S-1) are derived from it once.
    """

    def __init__(self, weights: WeightSource) -> None:
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._weights = weights
        self._used: set[str] = {"input_ids", "attention_mask"}
        self._values: dict[tuple, str] = {}  # constants, cast weights, shapes: built once
        self.shapes: dict[str, tuple[int, ...]] = {}  # of the weights added so far
        self.dims = self.op("Shape", "input_ids", name="dims")
        self.seq = self.op("Gather", self.dims, self.const(np.array(1, np.int64), "one"), axis=0, name="seq")
        self.positions = self.op("Range", self.const(np.array(0, np.int64), "zero"), self.seq,
                                 self.const(np.array(1, np.int64), "one"), name="positions")

    def fresh(self, hint: str) -> str:
        """``hint``, or ``hint.N`` if that value name is taken."""
        name, n = hint, 1
        while name in self._used:
            name, n = f"{hint}.{n}", n + 1
        self._used.add(name)
        return name

    def op(self, op_type: str, *inputs: str, name: str | None = None, **attrs) -> str:
        """Append one single-output node; returns its output value name."""
        out = self.fresh(name or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, array: np.ndarray, hint: str) -> str:
        """An inline constant initializer (one per distinct dtype, shape and content)."""
        key = ("const", array.dtype.str, array.shape, array.tobytes())
        if key not in self._values:
            name = self.fresh(f"const.{hint}")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._values[key] = name
        return self._values[key]

    def ints(self, values: list[int], hint: str) -> str:
        return self.const(np.array(values, np.int64), hint)

    def scalar(self, value: float, hint: str) -> str:
        return self.const(np.array(value, np.float32), hint)

    def weight(self, name: str) -> str:
        """The store tensor ``name`` as a float32 value (float16 initializers get a Cast)."""
        key = ("weight", name)
        if key not in self._values:
            if name in self._used:
                raise ValueError(f"tensor name {name!r} clashes with a graph value name")
            init = self._weights.initializer(name)
            self._used.add(name)
            self.initializers.append(init)
            self.shapes[name] = tuple(init.dims)
            value = name
            if init.data_type == TensorProto.FLOAT16:
                value = self.op("Cast", name, to=TensorProto.FLOAT, name=f"{name}.f32")
            self._values[key] = value
        return self._values[key]

    def tokens_shape(self, width: int) -> str:
        """The shape value ``[B, S, width]``."""
        key = ("shape", width)
        if key not in self._values:
            self._values[key] = self.op("Concat", self.dims, self.ints([width], f"w{width}"),
                                        axis=0, name=f"shape.{width}")
        return self._values[key]


def linear(g: Graph, x: str, weight: str, bias: str | None, name: str | None = None) -> str:
    """``x W^T + b``: x [B, S, in], W [out, in] -> [B, S, out] (Gemm on [B*S, in])."""
    w = g.weight(weight)
    out, inp = g.shapes[weight]
    inputs = [g.op("Reshape", x, g.ints([-1, inp], f"flat{inp}"), name=f"{x}.2d"), w]
    if bias:
        inputs.append(g.weight(bias))
    y = g.op("Gemm", *inputs, transB=1, name=f"{weight}.gemm")
    return g.op("Reshape", y, g.tokens_shape(out), name=name or f"{weight}.out")


def layer_norm(g: Graph, x: str, weight: str, bias: str, eps: float, name: str | None = None) -> str:
    """LayerNorm over the last axis of x [..., d]."""
    return g.op("LayerNormalization", x, g.weight(weight), g.weight(bias), axis=-1, epsilon=eps, name=name)


def rms_norm(g: Graph, x: str, weight: str, eps: float, name: str | None = None, offset: float = 0.0) -> str:
    """``x / sqrt(mean(x^2) + eps) * (offset + w)`` over the last axis of x [..., d] (basic
    ops only; Gemma's norms have offset 1)."""
    var = g.op("ReduceMean", g.op("Mul", x, x), g.ints([-1], "last"), keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.scalar(eps, "eps"))))
    w = g.weight(weight)
    if offset:
        w = g.op("Add", w, g.scalar(offset, "norm_offset"), name=f"{weight}.offset")
    return g.op("Mul", g.op("Mul", x, inv), w, name=name)


def rope_tables(g: Graph, rope: Rope) -> tuple[str, str]:
    """``cos, sin`` [S, dim] for positions 0..S-1, as ``rope`` makes them for one call over
    the S tokens (HF: angles ``pos * inv_freq`` in float32, each half of the head
    repeated; past ``rope.switch`` positions, ``longrope``'s long factors' frequencies and
    ``dynamic``'s of the base raised for S, :func:`_dynamic_inv_freq`; ``longrope`` and
    ``yarn``: the tables times ``attention_factor``)."""
    inv_freq = g.const(rope.inv_freq, "inv_freq")
    if rope.switch is not None:
        longer = g.op("Greater", g.seq, g.const(np.array(rope.switch, np.int64), "rope_switch"), name="rope.long")
        past = _dynamic_inv_freq(g, rope) if rope.scaling["type"] == "dynamic" else \
            g.const(rope.inv_freq_for(rope.switch + 1), "long_inv_freq")
        inv_freq = g.op("Where", longer, past, inv_freq, name="rope.inv_freq")
    pos = g.op("Unsqueeze", g.op("Cast", g.positions, to=TensorProto.FLOAT), g.ints([1], "ax1"))
    freqs = g.op("Mul", pos, inv_freq)  # [S, hd/2]
    emb = g.op("Concat", freqs, freqs, axis=-1, name="rope.angles")
    cos, sin = g.op("Cos", emb, name="rope.cos"), g.op("Sin", emb, name="rope.sin")
    if rope.attention_factor is None:
        return cos, sin
    factor = g.scalar(float(rope.attention_factor), "attention_factor")
    return g.op("Mul", cos, factor, name="rope.cos_scaled"), g.op("Mul", sin, factor, name="rope.sin_scaled")


def _dynamic_inv_freq(g: Graph, rope: Rope) -> str:
    """Dynamic NTK's frequencies [dim / 2] for a call over S positions, in float32 as
    :func:`~.reference.rope.rope_inv_freq`: ``1 / base^(2i / dim)`` with
    ``base = theta (factor S / L - factor + 1)^(dim / (dim - 2))``."""
    factor, dim = rope.scaling["factor"], rope.dim
    S = g.op("Cast", g.seq, to=TensorProto.FLOAT)
    stretch = g.op("Sub", g.op("Div", g.op("Mul", g.scalar(factor, "ntk_factor"), S),
                                g.scalar(float(rope.switch), "ntk_length")), g.scalar(factor - 1, "ntk_shift"))
    base = g.op("Mul", g.scalar(rope.theta, "ntk_theta"), g.op("Pow", stretch, g.scalar(dim / (dim - 2), "ntk_power")))
    exponents = g.const(np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim), "ntk_exponents")
    return g.op("Div", g.scalar(1.0, "one_f"), g.op("Pow", base, exponents), name="rope.ntk_inv_freq")


def rope(g: Graph, x: str, cos: str, sin: str, head_dim: int, dim: int) -> str:
    """``x cos + rotate_half(x) sin`` for x [..., S, hd] and cos, sin [S, dim],
    ``rotate_half([a, b]) = [-b, a]`` over the first ``dim`` dimensions; those past ``dim``
    pass unchanged (partial rotary embeddings)."""
    start, half, end, axis = g.ints([0], "start"), g.ints([dim // 2], "half"), g.ints([dim], "rot"), g.ints([-1], "last")
    part = x if dim == head_dim else g.op("Slice", x, start, end, axis)
    first = g.op("Slice", part, start, half, axis)
    second = g.op("Slice", part, half, end, axis)
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    out = g.op("Add", g.op("Mul", part, cos), g.op("Mul", rotated, sin), name=f"{x}.rope")
    if dim == head_dim:
        return out
    rest = g.op("Slice", x, end, g.ints([head_dim], "hd"), axis)
    return g.op("Concat", out, rest, axis=-1, name=f"{x}.rope_partial")


def soft_cap(g: Graph, x: str, cap: float) -> str:
    """``cap tanh(x / cap)`` (Gemma 2's soft-capping of attention scores and logits)."""
    c = g.scalar(cap, f"softcap{cap:g}")
    return g.op("Mul", g.op("Tanh", g.op("Div", x, c)), c)


def attention_mask(g: Graph, causal: bool, window: int | None = None) -> str:
    """Additive mask: 0 where a query may attend a key, float32 min elsewhere (padding
    keys; later keys when causal, and keys ``window`` or more positions back with a
    sliding window). [B, 1, 1, 1, S], or [B, 1, 1, S, S] when causal."""
    keep = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.ints([1, 2, 3], "ax123")), to=TensorProto.BOOL)
    if causal:
        rows = g.op("Unsqueeze", g.positions, g.ints([1], "ax1"))
        keep = g.op("And", g.op("LessOrEqual", g.positions, rows, name="causal"), keep)
        if window is not None:
            oldest = g.op("Sub", rows, g.const(np.array(window, np.int64), "window"))
            keep = g.op("And", g.op("Greater", g.positions, oldest, name="sliding_window"), keep)
    return g.op("Where", keep, g.scalar(0.0, "zero"), g.scalar(NEG, "neg"), name="mask")


def attention(g: Graph, x: str, proj: dict[str, tuple[str, str | None]], heads: int, kv_heads: int,
              head_dim: int, mask: str, rope_cs: tuple[str, str] | None,
              head_norms: dict[str, str] | None = None, eps: float = 0.0, rotary_dim: int | None = None,
              scale: float | None = None, norm_offset: float = 0.0, softcap: float | None = None) -> str:
    """Multi-head attention with grouped key/value heads: x [B, S, d] -> [B, S, d].

    ``proj`` maps q/k/v/o to (weight, bias or None). Queries are grouped [B, K, R, S, hd]
    against keys/values [B, K, 1, S, hd] (broadcast = HF ``repeat_kv``). ``head_norms``
    maps q/k to the weight of an RMSNorm (``eps``, ``norm_offset``) over each head, before
    RoPE (Qwen3, Gemma 3);
    RoPE rotates the first ``rotary_dim`` dimensions of each head (None: all of them); the
    scores are scaled by ``scale`` (None: ``head_dim ** -0.5``), then soft-capped
    (:func:`soft_cap`) by ``softcap``.
    """
    rep = heads // kv_heads

    def split(name: str, group: int) -> str:  # [B, S, K*group*hd] -> [B, K, group, S, hd]
        y = g.op("Reshape", linear(g, x, *proj[name]), g.ints([0, 0, kv_heads, group, head_dim], f"heads{group}"))
        y = g.op("Transpose", y, perm=[0, 2, 3, 1, 4], name=f"{proj[name][0]}.heads")
        if head_norms and name in head_norms:
            y = rms_norm(g, y, head_norms[name], eps, offset=norm_offset)
        return rope(g, y, *rope_cs, head_dim, rotary_dim or head_dim) if rope_cs and name in ("q", "k") else y

    q, k, v = split("q", rep), split("k", 1), split("v", 1)
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 2, 4, 3]))  # [B, K, R, S, S]
    scores = g.op("Mul", scores, g.scalar(1.0 / math.sqrt(head_dim) if scale is None else scale, "scale"))
    scores = g.op("Add", scores if softcap is None else soft_cap(g, scores, softcap), mask)
    ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # [B, K, R, S, hd]
    ctx = g.op("Transpose", ctx, perm=[0, 3, 1, 2, 4])  # [B, S, K, R, hd]
    ctx = g.op("Reshape", ctx, g.ints([0, 0, heads * head_dim], "merge"))
    return linear(g, ctx, *proj["o"])


Activation = Callable[[Graph, str, FFNBlock, str], str]


def _threshold(g: Graph, block: FFNBlock, what: str, value: float) -> str:
    return g.scalar(float(value), f"ffn.{block.layer}.{what}_threshold")


def _keep_where(g: Graph, cond: str, z: str, name: str) -> str:
    """``z`` where ``cond`` holds, else 0 (named ``name``)."""
    return g.op("Where", cond, z, g.scalar(0.0, "zero"), name=name)


ACTIVATIONS: dict[str, Activation] = {
    "gelu": lambda g, z, block, name: g.op("Gelu", z, name=name),
    "gelu_tanh": lambda g, z, block, name: g.op("Gelu", z, approximate="tanh", name=name),
    "silu": lambda g, z, block, name: g.op("Mul", z, g.op("Sigmoid", z), name=name),
    "relu": lambda g, z, block, name: g.op("Relu", z, name=name),
    "fatrelu": lambda g, z, block, name: _keep_where(g, g.op("Greater", z, _threshold(g, block, "fat", block.activation_threshold)), z, name),
}
"""FFN activation kinds by ``FFNBlock.activation``: ``fn(graph, z, block, name)`` emits
``act(z)`` for the pre-activation ``z`` [B, S, n_ff] as a value called ``name``."""


def ffn(g: Graph, block: FFNBlock, x: str, act_name: str) -> str:
    """One FFN block on x [B, S, d] -> [B, S, d]; the activation feeding the down
    projection ([B, S, n_ff]) is the value ``act_name``."""
    try:
        act = ACTIVATIONS[block.activation]
    except KeyError:
        raise ValueError(f"layer {block.layer}: no ONNX builder for FFN activation {block.activation!r} "
                         f"(known: {', '.join(sorted(ACTIVATIONS))})") from None
    up = linear(g, x, block.up, block.up_bias)
    thresholded = block.output_threshold > 0
    h_name = f"ffn.{block.layer}.h" if thresholded else act_name
    if block.gate:
        gate = act(g, linear(g, x, block.gate, block.gate_bias), block, f"ffn.{block.layer}.gate_act")
        if block.up_activation == "relu":
            up = g.op("Relu", up)
        elif block.up_activation is not None:
            raise ValueError(f"layer {block.layer}: unknown up activation {block.up_activation!r} (known: relu)")
        h = g.op("Mul", gate, up, name=h_name)
    else:
        h = act(g, up, block, h_name)
    if thresholded:
        keep = g.op("Greater", g.op("Abs", h), _threshold(g, block, "output", block.output_threshold))
        h = _keep_where(g, keep, h, act_name)
    return linear(g, h, block.down, block.down_bias)
