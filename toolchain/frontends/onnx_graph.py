"""Structural pattern matching on ONNX graphs: linears, norms, FFNs and attention blocks.

Optimised exports rename or constant-fold weights (the dynamo exporter stores
``x @ W^T`` weights as anonymous ``[in, out]`` initializers such as ``val_41``), so
weights are identified by the role they play in the graph, never by their names.
Value shapes in the docstrings use ``t`` for the leading (batch, sequence) dims.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from ..errors import InputError
from .onnx_initializers import OnnxInitializers

#: ops that only convert or forward a value
_PASS = ("Identity", "Cast")
#: ops whose first input is the data and the others are shape/index parameters
_DATA_FIRST = {"Reshape", "Expand", "Slice", "Unsqueeze", "Squeeze", "Tile", "Gather", "GatherElements",
               "GatherND", "Flatten", "Pad", "Transpose", "Identity", "Cast", "Split"}
#: ops that only look at shapes; tracing stops there
_SHAPE_ONLY = {"Shape", "Size", "Range", "ConstantOfShape", "EyeLike"}
#: layout ops between an attention output and the output projection
_LAYOUT = {"Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten"}
_GELU_CUBIC = (0.044715, 0.044715 * np.sqrt(2 / np.pi))


@dataclass(frozen=True)
class Weight:
    """A constant tensor by key; ``transpose``: the stored tensor must be transposed to
    reach the canonical ``nn.Linear`` layout ``[out, in]``; ``rows``: only those rows of
    the canonical tensor (a fused projection's part)."""

    key: str
    transpose: bool = False
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class Linear:
    """``out = x @ W^T + b``: a MatMul (+ bias Add) or Gemm with a constant 2-D weight.

    ``x`` is ``[t, in]``, ``out`` (after the bias Add, if any) ``[t, out]``;
    ``shape`` is the canonical weight shape ``(out, in)``. A part of a fused projection
    (Phi-3's q/k/v, gate/up) is a linear of its own: ``node`` is the Slice or Split
    taking it, ``out`` that node's output. ``out`` names a linear; ``node`` orders them.
    """

    node: int
    x: str
    out: str
    weight: Weight
    bias: Weight | None
    shape: tuple[int, int]


@dataclass(frozen=True)
class Norm:
    """LayerNorm or RMSNorm over the last axis: ``x`` and ``out`` are ``[t, d]``, weights ``[d]``."""

    kind: str  # "layernorm" | "rmsnorm"
    x: str
    out: str
    weight: Weight
    bias: Weight | None
    eps: float


@dataclass(frozen=True)
class FFN:
    """``down(act(gate(x)) * up(x))`` (gated) or ``down(act(up(x)))``; ``input`` is ``x``
    ``[t, d]``, ``activation_value`` the down projection's input ``[t, n]``."""

    up: Linear
    down: Linear
    gate: Linear | None
    activation: str

    @property
    def input(self) -> str:
        return self.up.x

    @property
    def activation_value(self) -> str:
        return self.down.x


@dataclass(frozen=True)
class Attention:
    """One attention block: projections found from the query / key sides of ``QK^T``,
    the value side of ``softmax @ V``, and the first linear after the output."""

    node: int
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    q_side: str  # the query value entering QK^T (after RoPE), [b, h, s, head_dim]


class Graph:
    """Index of a top-level ONNX graph: producers, consumers and constant lookup."""

    def __init__(self, path: Path, tensors: OnnxInitializers) -> None:
        self.path = path
        self.tensors = tensors
        self._ranks: dict[str, int] | None = None  # value -> rank, from the shape annotations (on first use)
        graph = tensors.model.graph
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        defined = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
        for idx, node in enumerate(self.nodes):
            for v in node.input:
                if v not in defined:
                    raise InputError(path, f"corrupt or truncated ONNX graph: node {node.name or idx} "
                                           f"uses value {v!r}, which is not defined before it")
                self.consumers.setdefault(v, []).append(idx)
            for v in node.output:
                self.producer[v] = idx
                defined.add(v)
        for out in graph.output:
            if out.name not in defined:
                raise InputError(path, f"corrupt or truncated ONNX graph: output {out.name!r} is never computed")

    # -- lookup ----------------------------------------------------------------------
    def node(self, value: str) -> onnx.NodeProto | None:
        """The node producing ``value`` (None for graph inputs and initializers)."""
        idx = self.producer.get(value)
        return None if idx is None or value in self.tensors else self.nodes[idx]

    def strip(self, value: str) -> str:
        """Follow ``value`` back through Identity / Cast nodes."""
        while (n := self.node(value)) is not None and n.op_type in _PASS:
            value = n.input[0]
        return value

    def const(self, value: str) -> np.ndarray | None:
        """The value of a constant (through Identity/Cast), else None."""
        value = self.strip(value)
        return np.asarray(self.tensors.get(value)) if value in self.tensors else None

    def scalar(self, value: str) -> float | None:
        c = self.const(value)
        return float(c.reshape(-1)[0]) if c is not None and c.size == 1 else None

    def weight(self, value: str) -> Weight | None:
        """The constant behind ``value`` through Identity/Cast/2-D Transpose nodes; the
        returned flag says whether the stored tensor is the transpose of ``value``."""
        flips = False
        while value not in self.tensors:
            n = self.node(value)
            if n is None:
                return None
            if n.op_type == "Transpose":
                perm = attr(n, "perm", [1, 0])
                if list(perm) != [1, 0]:
                    return None
                flips = not flips
            elif n.op_type not in _PASS:
                return None
            value = n.input[0]
        return Weight(value, flips)

    def shape(self, w: Weight) -> tuple[int, ...]:
        s = tuple(self.tensors.shape(w.key))
        s = tuple(reversed(s)) if w.transpose else s
        return s if w.rows is None else (w.rows[1] - w.rows[0], *s[1:])

    def rank(self, value: str) -> int | None:
        """The rank of ``value`` from the graph's shape annotations (None if unknown)."""
        if self._ranks is None:
            graph = self.tensors.model.graph
            self._ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
                           (*graph.value_info, *graph.input, *graph.output) if v.type.tensor_type.HasField("shape")}
        return self._ranks.get(value)

    def trace_back(self, value: str, linears: dict[str, Linear]) -> tuple[list[Linear], list[str]]:
        """Walk the data inputs upstream of ``value`` until linears: returns the linears
        reached and the constants met on the way (e.g. RoPE frequencies)."""
        found: dict[str, Linear] = {}
        consts: list[str] = []
        seen, todo = set(), [value]
        while todo:
            v = todo.pop()
            if v in seen or not v:
                continue
            seen.add(v)
            if v in linears:
                found[linears[v].out] = linears[v]
            elif v in self.tensors:
                consts.append(v)
            elif (n := self.node(v)) is not None and n.op_type not in _SHAPE_ONLY:
                if n.op_type in _DATA_FIRST:
                    todo.append(n.input[0])
                elif n.op_type == "Where":
                    todo.extend(n.input[1:])
                else:
                    todo.extend(n.input)
        return sorted(found.values(), key=lambda lin: (lin.node, lin.out)), consts


def attr(node: onnx.NodeProto, name: str, default=None):
    """The Python value of attribute ``name`` of ``node``, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _close(x: float | None, target: float, rel: float = 1e-3) -> bool:
    return x is not None and abs(x - target) <= rel * abs(target)


# -- linears -------------------------------------------------------------------------
def find_linears(g: Graph) -> dict[str, Linear]:
    """Every MatMul / Gemm with a constant 2-D weight, keyed by its output value (both
    the raw product and the output after the bias Add)."""
    out: dict[str, Linear] = {}
    for idx, n in enumerate(g.nodes):
        if n.op_type == "MatMul" and len(n.input) == 2:
            w = g.weight(n.input[1])
            swap = False  # MatMul weights are [in, out]: canonical needs the flip
        elif n.op_type == "Gemm" and attr(n, "transA", 0) == 0 and attr(n, "alpha", 1.0) == 1.0:
            w = g.weight(n.input[1])
            swap = bool(attr(n, "transB", 0))  # transB: stored [out, in] already
        else:
            continue
        if w is None or len(g.tensors.shape(w.key)) != 2:
            continue
        w = Weight(w.key, w.transpose == swap)
        shape = g.shape(w)
        bias, result = None, n.output[0]
        if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2]:
            bias = g.weight(n.input[2])
            if bias is None or attr(n, "beta", 1.0) != 1.0 or g.tensors.shape(bias.key) != (shape[0],):
                continue
        else:
            users = g.consumers.get(result, [])
            add = g.nodes[users[0]] if len(users) == 1 else None
            if add is not None and add.op_type == "Add":
                other = add.input[1] if add.input[0] == result else add.input[0]
                b = g.weight(other)
                if b is not None and g.tensors.shape(b.key) == (shape[0],):
                    bias = Weight(b.key)
                    result = add.output[0]
        lin = Linear(idx, n.input[0], result, w, bias, (shape[0], shape[1]))
        out[n.output[0]] = out[result] = lin
    for lin in {lin.out: lin for lin in out.values()}.values():
        parts = _fused_parts(g, lin)
        if parts:
            for key in (g.nodes[lin.node].output[0], lin.out):
                out.pop(key, None)
            out.update({part.out: part for part in parts})
    return out


def _fused_parts(g: Graph, lin: Linear) -> list[Linear] | None:
    """The parts of a fused projection: when ``lin``'s output only feeds Slice nodes or one
    Split along its last axis that cut it into consecutive pieces covering all its rows
    (Phi-3's q/k/v and gate/up), one linear per piece over those rows of the weight and
    bias; else None."""
    users = [g.nodes[i] for i in g.consumers.get(lin.out, [])]
    rank, rows = g.rank(lin.out), lin.shape[0]
    if not users or any(u.input[0] != lin.out for u in users) or rank is None:
        return None
    pieces: list[tuple[int, str, int, int]] = []  # (node, output, start, stop)
    if len(users) == 1 and users[0].op_type == "Split":
        split = users[0]
        sizes = g.const(split.input[1]) if len(split.input) > 1 and split.input[1] else None
        count = len(split.output)
        if attr(split, "axis", 0) % rank != rank - 1 or (sizes is None and rows % count):
            return None
        sizes = [rows // count] * count if sizes is None else [int(v) for v in sizes.reshape(-1)]
        ends = np.cumsum(sizes).tolist()
        pieces = [(g.producer[o], o, e - n, e) for o, n, e in zip(split.output, sizes, ends)]
    else:
        for u in users:
            if u.op_type != "Slice" or len(u.input) < 4:
                return None
            start, stop, axes = (g.const(v) for v in u.input[1:4])
            step = g.const(u.input[4]) if len(u.input) > 4 and u.input[4] else np.ones(1)
            if any(c is None or c.size != 1 for c in (start, stop, axes, step)) or int(step.item()) != 1 \
                    or int(axes.item()) % rank != rank - 1:
                return None
            pieces.append((g.producer[u.output[0]], u.output[0], int(start.item()), min(int(stop.item()), rows)))
        pieces.sort(key=lambda p: p[2])
    if [p[2] for p in pieces] != [0] + [p[3] for p in pieces[:-1]] or pieces[-1][3] != rows \
            or any(p[3] <= p[2] for p in pieces):
        return None
    return [Linear(node, lin.x, value, replace(lin.weight, rows=(a, b)),
                   None if lin.bias is None else replace(lin.bias, rows=(a, b)), (b - a, lin.shape[1]))
            for node, value, a, b in pieces]


# -- norms ---------------------------------------------------------------------------
def find_norms(g: Graph) -> dict[str, Norm]:
    """LayerNormalization / SimplifiedLayerNormalization / RMSNormalization nodes and the
    decomposed forms (``x * rsqrt(mean(x^2) + eps) * w``; ``(x - mean) / sqrt(var + eps)
    * w + b``), keyed by output value."""
    norms: dict[str, Norm] = {}
    for n in g.nodes:
        if n.op_type in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"):
            if attr(n, "axis", -1) != -1 or len(n.input) < 2 or (w := g.weight(n.input[1])) is None:
                continue
            b = g.weight(n.input[2]) if n.op_type == "LayerNormalization" and len(n.input) > 2 and n.input[2] else None
            kind = "layernorm" if n.op_type == "LayerNormalization" else "rmsnorm"
            eps = _shortest(attr(n, "epsilon", 1e-5), np.float32)
            norms[n.output[0]] = Norm(kind, n.input[0], n.output[0], w, b, eps)
        elif n.op_type == "Mul":
            for gamma, y in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
                w = g.weight(gamma)
                if w is None or len(g.tensors.shape(w.key)) != 1 or (m := _normalized(g, y)) is None:
                    continue
                kind, x, eps = m
                out, bias = n.output[0], None
                users = g.consumers.get(out, [])
                if kind == "layernorm" and len(users) == 1 and g.nodes[users[0]].op_type == "Add":
                    add = g.nodes[users[0]]
                    bias = g.weight(add.input[1] if add.input[0] == out else add.input[0])
                    out = add.output[0] if bias is not None else out
                norms[out] = Norm(kind, x, out, w, bias, eps)
                break
    return norms


def _shortest(x: float, kind: type) -> float:
    """A float stored with ``kind`` precision, as its shortest round-tripping decimal
    (float32 ``1e-12`` reads back as 1e-12, not 9.99999996e-13)."""
    return float(str(kind(x)))


def _normalized(g: Graph, value: str) -> tuple[str, str, float] | None:
    """(kind, input, eps) if ``value`` is ``y / sqrt(mean(y^2) + eps)`` in one of its
    spellings; kind is layernorm when ``y = x - mean(x)``."""
    n = g.node(g.strip(value))
    if n is None:
        return None
    if n.op_type == "Div":
        pairs = [(n.input[0], _rms(g, n.input[1]))]
    elif n.op_type == "Mul":
        pairs = []
        for a, b in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
            inv = g.node(g.strip(b))
            if inv is not None and inv.op_type == "Reciprocal":
                pairs.append((a, _rms(g, inv.input[0])))
            elif inv is not None and inv.op_type == "Div" and _close(g.scalar(inv.input[0]), 1.0, 1e-6):
                pairs.append((a, _rms(g, inv.input[1])))
    else:
        return None
    for y, rms in pairs:
        if rms is None or g.strip(rms[0]) != g.strip(y):
            continue
        sub = g.node(g.strip(y))
        if sub is not None and sub.op_type == "Sub":
            mean = g.node(sub.input[1])
            if mean is not None and mean.op_type == "ReduceMean" and mean.input[0] == sub.input[0]:
                return "layernorm", sub.input[0], rms[1]
        return "rmsnorm", y, rms[1]
    return None


def _rms(g: Graph, value: str) -> tuple[str, float] | None:
    """(y, eps) if ``value`` is ``sqrt(mean(y^2) + eps)``."""
    sqrt = g.node(g.strip(value))
    add = g.node(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
    if add is None or add.op_type != "Add":
        return None
    for m, e in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        eps, mean = g.const(e), g.node(m)
        if eps is None or eps.size != 1 or mean is None or mean.op_type != "ReduceMean":
            continue
        sq = g.node(mean.input[0])
        if sq is not None and ((sq.op_type == "Pow" and _close(g.scalar(sq.input[1]), 2.0, 1e-6))
                               or (sq.op_type == "Mul" and sq.input[0] == sq.input[1])):
            return sq.input[0], _shortest(eps.reshape(-1)[0], eps.dtype.type)
    return None


# -- FFNs ----------------------------------------------------------------------------
def find_ffns(g: Graph, linears: dict[str, Linear]) -> list[FFN]:
    """Every ``linear -> activation [* linear] -> linear`` chain, in graph order."""
    ffns = []
    for down in {lin.out: lin for lin in linears.values()}.values():
        mul = g.node(down.x)
        match = None
        if mul is not None and mul.op_type == "Mul":
            for a, b in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
                act = activation(g, a)
                gate, up = (linears.get(act[1]), linears.get(b)) if act else (None, None)
                if gate and up and gate.out != up.out and g.strip(gate.x) == g.strip(up.x):
                    match = FFN(up, down, gate, act[0])
                    break
        if match is None and (act := activation(g, down.x)) and act[1] in linears:
            match = FFN(linears[act[1]], down, None, act[0])
        if match is not None:
            ffns.append(match)
    return sorted(ffns, key=lambda f: f.down.node)


def activation(g: Graph, value: str) -> tuple[str, str] | None:
    """(kind, input) if ``value`` is ``act(input)``: Gelu / FastGelu ops, Relu,
    ``x * Sigmoid(x)`` (silu), ``0.5 x (1 + erf(x / sqrt 2))`` (gelu) and
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (gelu_tanh)."""
    n = g.node(value)
    if n is None:
        return None
    if n.op_type == "Gelu":
        approx = attr(n, "approximate", b"none")
        return ("gelu_tanh" if approx in (b"tanh", "tanh") else "gelu"), n.input[0]
    if n.op_type == "FastGelu" and len(n.input) == 1:
        return "gelu_tanh", n.input[0]
    if n.op_type == "Relu":
        return "relu", n.input[0]
    if n.op_type != "Mul":
        return None
    for x, s in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
        sig = g.node(s)
        if sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == x:
            return "silu", x
    leaves, scale = _mul_leaves(g, value, depth=3)
    if len(leaves) != 2 or not _close(scale, 0.5):
        return None
    for x, w in ((leaves[0], leaves[1]), (leaves[1], leaves[0])):
        add = g.node(w)
        if add is None or add.op_type != "Add":
            continue
        for e, one in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
            f = g.node(e)
            if f is None or not _close(g.scalar(one), 1.0, 1e-6):
                continue
            if f.op_type == "Erf" and (u := g.node(f.input[0])) is not None and u.input[0] == x and (
                (u.op_type == "Div" and _close(g.scalar(u.input[1]), np.sqrt(2)))
                or (u.op_type == "Mul" and _close(g.scalar(u.input[1]), np.sqrt(0.5)))
            ):
                return "gelu", x
            if f.op_type == "Tanh" and _is_gelu_tanh_arg(g, f.input[0], x):
                return "gelu_tanh", x
    return None


def _mul_leaves(g: Graph, value: str, depth: int) -> tuple[list[str], float]:
    """Non-constant factors of a tree of Mul nodes and the product of its constant ones."""
    c = g.scalar(value)
    if c is not None:
        return [], c
    n = g.node(value)
    if n is None or n.op_type != "Mul" or depth == 0:
        return [value], 1.0
    leaves, scale = [], 1.0
    for v in n.input:
        sub, s = _mul_leaves(g, v, depth - 1)
        leaves += sub
        scale *= s
    return leaves, scale


def _is_gelu_tanh_arg(g: Graph, value: str, x: str) -> bool:
    """Whether ``value`` is an elementwise polynomial of ``x`` with the 0.044715 cubic term."""
    reaches, cubic, todo, seen = False, False, [value], set()
    while todo and len(seen) < 12:
        value = todo.pop()
        n = g.node(value)
        if n is None or n.op_type not in ("Mul", "Add", "Pow", "Div") or value in seen:
            continue
        seen.add(value)
        for v in n.input:
            c = g.scalar(v)
            cubic |= any(_close(c, k) for k in _GELU_CUBIC)
            reaches |= v == x
            if c is None and v != x:
                todo.append(v)
    return reaches and cubic


# -- attention -----------------------------------------------------------------------
def find_attention(g: Graph, linears: dict[str, Linear]) -> list[Attention]:
    """Attention blocks in graph order: ``Softmax(Q K^T ...) @ V`` or an ``Attention`` op."""
    cores: list[tuple[int, str, str, str, str]] = []  # (node, q side, k side, v side, output)
    for idx, n in enumerate(g.nodes):
        if n.op_type == "Attention" and n.domain in ("", "ai.onnx") and len(n.input) >= 3:
            cores.append((idx, n.input[0], n.input[1], n.input[2], n.output[0]))
        elif n.op_type == "Softmax":
            qk, av = _search(g, n.input[0], up=True), _search(g, n.output[0], up=False)
            if qk is not None and av is not None:
                cores.append((g.producer[av.output[0]], qk.input[0], qk.input[1], av.input[1], av.output[0]))
    blocks = []
    for idx, q_side, k_side, v_side, out in cores:
        q, k, v = (_single(g, side, linears, role) for side, role in
                   ((q_side, "query"), (k_side, "key"), (v_side, "value")))
        if len({q.out, k.out, v.out}) < 3:
            raise InputError(g.path, f"attention at node {g.nodes[idx].name or idx}: one projection feeds "
                                     "several of Q, K and V (a fused one not cut by constant Slice nodes or a Split "
                                     "along its last axis, or a shared one): not supported")
        blocks.append(Attention(idx, q, k, v, _output_projection(g, out, linears), q_side))
    return blocks


def _search(g: Graph, value: str, up: bool) -> onnx.NodeProto | None:
    """The nearest MatMul of two non-constant values upstream (``up``) of a Softmax input,
    or downstream of its output taking it as first operand, across elementwise ops."""
    todo, seen = [value], set()
    while todo and len(seen) < 16:
        v = todo.pop(0)
        seen.add(v)
        nodes = [g.node(v)] if up else [g.nodes[i] for i in g.consumers.get(v, [])]
        for n in nodes:
            if n is None:
                continue
            if n.op_type == "MatMul" and g.weight(n.input[1]) is None and (up or n.input[0] == v):
                return n
            if n.op_type in ("Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Dropout", "Tanh"):
                todo += [i for i in n.input if i and g.const(i) is None] if up else list(n.output[:1])
    return None


def _single(g: Graph, side: str, linears: dict[str, Linear], role: str) -> Linear:
    found, _ = g.trace_back(side, linears)
    if len(found) != 1:
        raise InputError(g.path, f"cannot identify the {role} projection of the attention using {side!r} "
                                 f"({len(found)} candidate linear layers)")
    return found[0]


def _output_projection(g: Graph, value: str, linears: dict[str, Linear]) -> Linear:
    todo = [value]
    while todo:
        v = todo.pop()
        for i in g.consumers.get(v, []):
            n = g.nodes[i]
            if n.output[0] in linears and n.input[0] == v:
                return linears[n.output[0]]
            if n.op_type in _LAYOUT and n.input[0] == v:
                todo.append(n.output[0])
    raise InputError(g.path, f"no output projection found after the attention output {value!r}")


# -- graph-level facts ---------------------------------------------------------------
def is_causal(g: Graph) -> bool:
    """Whether attention is causal: a Trilu, an ``Attention(is_causal=1)``, a comparison
    of two position ranges (``j <= i``), or a constant lower-triangular mask."""
    for n in g.nodes:
        if n.op_type == "Trilu" or (n.op_type == "Attention" and attr(n, "is_causal", 0)):
            return True
        if n.op_type in ("Less", "LessOrEqual", "Greater", "GreaterOrEqual") and all(
            g.const(v) is None and _from_range(g, v) for v in n.input
        ):
            return True
    for key in g.tensors.keys():
        s = g.tensors.shape(key)
        if len(s) >= 2 and s[-1] == s[-2] >= 2 and np.prod(s) == s[-1] ** 2 and _lower_triangular(g.tensors.get(key)):
            return True
    return False


def sliding_window(g: Graph) -> int | None:
    """The sliding window ``W`` of causal attention (a query at position ``i`` attends keys
    ``i - W < j <= i``): a comparison of a position range with another shifted by an
    integer constant (``j > i - W``, ``j >= i - (W - 1)``, either way round), or of the
    difference of two with a constant (``i - j < W``). None when the graph has neither."""
    for n in g.nodes:
        if n.op_type not in ("Less", "LessOrEqual", "Greater", "GreaterOrEqual") or len(n.input) != 2:
            continue
        extra = 0 if n.op_type in ("Less", "Greater") else 1
        for x, y in (n.input, n.input[::-1]):
            shift, plain = _shifted_range(g, x), g.const(y) is None and _from_range(g, y)
            if shift and plain:
                return shift + extra
            c, diff = g.const(x), g.node(y)
            if (c is not None and c.size == 1 and c.dtype.kind in "iu" and int(c.reshape(())) > 0 and diff is not None
                    and diff.op_type == "Sub" and all(g.const(v) is None and _from_range(g, v) for v in diff.input)):
                return int(c.reshape(())) + extra
    return None


def _shifted_range(g: Graph, value: str) -> int | None:
    """``|c|`` when ``value`` is a position range plus or minus an integer constant ``c``."""
    n = g.node(value)
    if n is None or n.op_type not in ("Add", "Sub") or len(n.input) != 2:
        return None
    for c, other in (n.input, n.input[::-1]):
        arr = g.const(c)
        if (arr is not None and arr.size == 1 and arr.dtype.kind in "iu" and int(arr.reshape(())) != 0
                and g.const(other) is None and _from_range(g, other)):
            return abs(int(arr.reshape(())))
    return None


def _from_range(g: Graph, value: str, limit: int = 12) -> bool:
    todo, seen = [value], 0
    while todo and seen < limit:
        n = g.node(todo.pop())
        seen += 1
        if n is not None:
            if n.op_type == "Range":
                return True
            todo += [i for i in n.input if i]
    return False


def _lower_triangular(mask: np.ndarray) -> bool:
    """Whether a square ``[.., s, s]`` constant is a boolean (keep) or additive (0 / very
    negative) causal mask; a float matrix is read only if its top-right entry is masked."""
    m = mask.reshape(mask.shape[-2:])
    lower = np.tril(np.ones(m.shape, dtype=bool))
    if m.dtype == bool:
        return bool(np.array_equal(m, lower))
    return m.dtype.kind == "f" and m[0, -1] <= -1e4 and bool(np.all(m[lower] == 0) and np.all(m[~lower] <= -1e4))


def rope_frequencies(g: Graph, consts: list[str]) -> np.ndarray | None:
    """RoPE inverse frequencies (``[head_dim / 2]``, float64) from constants met on the
    query path: an ``inv_freq`` vector (positive, decreasing from at most 1; scaled RoPE
    may lower the first), or cos/sin caches ``[.., P, D]`` (row 0 all ones / zeros) read at
    position 1 as ``atan2(sin, cos)``."""
    cos = sin = None
    for key in consts:
        c = g.const(key)
        if c is None or c.dtype.kind != "f" or c.size < 2:
            continue
        c = c.astype(np.float64)
        flat = c.reshape(-1)
        if c.squeeze().ndim == 1 and flat[0] <= 1.0 and np.all(np.diff(flat) < 0) and flat[-1] > 0:
            return flat
        if c.ndim >= 2 and c.size // c.shape[-1] >= 2:
            rows = c.reshape(-1, c.shape[-1])
            if np.allclose(rows[0], 1.0):
                cos = rows
            elif np.allclose(rows[0], 0.0) and not np.allclose(rows[1], 0.0):
                sin = rows
    if cos is None or sin is None or cos.shape != sin.shape:
        return None
    width = cos.shape[1]
    half = width // 2 if width % 2 == 0 and np.allclose(cos[1, : width // 2], cos[1, width // 2:]) else width
    return np.arctan2(sin[1, :half], cos[1, :half])


def reshape_heads(g: Graph, lin: Linear) -> tuple[int | None, int | None]:
    """(heads, head_dim) from the constant entries of the ``[b, s, heads, head_dim]``
    Reshape right after a projection; None where the shape is computed or -1/0."""
    for i in g.consumers.get(lin.out, []):
        n = g.nodes[i]
        if n.op_type != "Reshape":
            continue
        dims = _shape_entries(g, n.input[1])
        if dims is not None and len(dims) == 4:
            h, hd = (d if d is not None and d > 0 else None for d in dims[2:])
            return h, hd
    return None, None


def _shape_entries(g: Graph, value: str) -> list[int | None] | None:
    c = g.const(value)
    if c is not None:
        return [int(x) for x in c.reshape(-1)]
    n = g.node(value)
    if n is None or n.op_type != "Concat":
        return None
    dims: list[int | None] = []
    for piece in n.input:
        p = g.const(piece)
        if p is None and (u := g.node(piece)) is not None and u.op_type == "Unsqueeze":
            p = g.const(u.input[0])
        dims += [int(x) for x in p.reshape(-1)] if p is not None else [None]
    return dims
