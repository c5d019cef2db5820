"""The FFN bundle layout of the artifact: one contiguous bundle per neuron.

For an FFN layer with ``d_model`` d and ``n_neurons`` n (rows of gate/up ``[n, d]``,
columns of down ``[d, n]``), neuron ``i``'s bundle is

    [gate row i (gated FFNs only)][up row i][down column i][zero padding]

each part a row of d values encoded in the layer's format (see :mod:`.quant`: ``f32``
d*4 bytes, ``f16`` d*2, ``q8_0`` d/32 blocks of 34 bytes, ``q4_0`` d/32 blocks of 18),
the bundle padded with zeros to a multiple of ``align`` bytes (the target's choice,
default 64: a cache line). A decode step that activates a neuron reads exactly its
bundle, one contiguous run of memory. A layer's bundles form ``uint8[n, stride]``.

A gated layer that runs gate-first (every gate computed, then up and down only where
the gate is positive) reads all of its gate rows each step: ``gate_apart`` layouts keep
the gate out of the bundles, as a matrix of its own (:func:`encode_gate`, ``[n, d]`` in
the layer's format), so the dense gate pass reads one contiguous matrix and the bundles
hold ``[up row i][down column i]``. On a 2-core x86 machine, 11008 x 4096 gates, weights
cold: the gate pass read 0.63 of the bandwidth probe through Q8_0 bundles against 0.72
as a matrix, Q4_0 0.50 against 0.54 (and the runtime's 8-row tiles of a Q4_0 matrix
about 0.73), f32 0.96 either way. Numpy only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import quant

PARTS = ("gate", "up", "down")


@dataclass(frozen=True)
class BundleLayout:
    """Byte layout of one FFN layer's bundles."""

    fmt: str
    d_model: int
    n_neurons: int
    gated: bool
    align: int = 64
    gate_apart: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "fmt", quant.normalize_format(self.fmt))
        if self.d_model <= 0 or self.n_neurons <= 0:
            raise ValueError(f"d_model and n_neurons must be positive; got {self.d_model}, {self.n_neurons}")
        if self.align <= 0 or self.align & (self.align - 1):
            raise ValueError(f"align must be a positive power of two; got {self.align}")
        if self.fmt in quant.QUANTIZED and self.d_model % quant.BLOCK:
            raise ValueError(
                f"{self.fmt} bundles need d_model to be a multiple of {quant.BLOCK}; got {self.d_model}")
        if self.gate_apart and not self.gated:
            raise ValueError("gate_apart needs a gated layout")

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts inside each bundle, in order (the gate only when gated and not apart)."""
        return PARTS if self.gated and not self.gate_apart else PARTS[1:]

    @property
    def part_bytes(self) -> int:
        """Bytes of one encoded part (a row of d_model values)."""
        return quant.row_bytes(self.fmt, self.d_model)

    @property
    def payload_bytes(self) -> int:
        return len(self.parts) * self.part_bytes

    @property
    def stride(self) -> int:
        """Bytes per bundle (payload rounded up to ``align``)."""
        return -(-self.payload_bytes // self.align) * self.align

    @property
    def nbytes(self) -> int:
        return self.stride * self.n_neurons

    @property
    def blocks_per_part(self) -> int:
        return self.d_model // quant.BLOCK if self.fmt in quant.QUANTIZED else 0

    def part_offset(self, part: str) -> int:
        """Byte offset of ``part`` (``gate``, ``up`` or ``down``) inside a bundle."""
        if part not in self.parts:
            kind = "gate-apart" if self.gate_apart else "gated" if self.gated else "non-gated"
            raise ValueError(f"part {part!r} is not in a {kind} bundle (parts: {', '.join(self.parts)})")
        return self.parts.index(part) * self.part_bytes

    def to_dict(self) -> dict[str, Any]:
        """The fields and the stride; ``gate_apart`` only when set (layouts written before
        it existed read the same)."""
        d = asdict(self)
        if not self.gate_apart:
            del d["gate_apart"]
        d["stride"] = self.stride
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BundleLayout":
        layout = cls(fmt=d["fmt"], d_model=int(d["d_model"]), n_neurons=int(d["n_neurons"]),
                     gated=bool(d["gated"]), align=int(d.get("align", 64)),
                     gate_apart=bool(d.get("gate_apart", False)))
        if "stride" in d and int(d["stride"]) != layout.stride:
            raise ValueError(f"bundle layout stride {d['stride']} does not match its fields ({layout.stride})")
        return layout


def pack_bundles(gate: np.ndarray | None, up: np.ndarray, down: np.ndarray, layout: BundleLayout) -> np.ndarray:
    """Encode one layer: ``gate``/``up`` ``[n, d]``, ``down`` ``[d, n]`` -> ``uint8[n, stride]``
    (a ``gate_apart`` layout leaves the gate out: :func:`encode_gate`)."""
    n, d = layout.n_neurons, layout.d_model
    if (gate is None and "gate" in layout.parts) or (gate is not None and not layout.gated):
        raise ValueError("gate must be given exactly when the layout is gated (optional when apart)")
    rows = {"up": np.asarray(up), "down": np.asarray(down).T}
    if gate is not None and not layout.gate_apart:
        rows["gate"] = np.asarray(gate)
    for part, m in rows.items():
        if m.shape != (n, d):
            want = (d, n) if part == "down" else (n, d)
            got = m.shape[::-1] if part == "down" else m.shape
            raise ValueError(f"{part} has shape {tuple(got)}; the layout needs {want}")
    out = np.zeros((n, layout.stride), np.uint8)
    pb = layout.part_bytes
    chunk = max(1, (1 << 24) // max(1, 4 * d))  # bounds temporary memory for large layers
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        for part in layout.parts:
            off = layout.part_offset(part)
            out[lo:hi, off:off + pb] = quant.encode(rows[part][lo:hi], layout.fmt)
    return out


def encode_gate(gate: np.ndarray, layout: BundleLayout) -> np.ndarray:
    """A ``gate_apart`` layer's gate ``[n, d]`` in the layer's format: float32 ``[n, d]``
    for ``f32``, float16 for ``f16``, the encoded rows ``uint8[n, part_bytes]`` otherwise
    (the artifact's ``blk.{L}.ffn_gate``)."""
    if not layout.gate_apart:
        raise ValueError("encode_gate needs a gate_apart layout")
    gate = np.asarray(gate, np.float32)
    if gate.shape != (layout.n_neurons, layout.d_model):
        raise ValueError(f"gate has shape {gate.shape}; the layout needs {(layout.n_neurons, layout.d_model)}")
    if layout.fmt == "f32":
        return np.ascontiguousarray(gate)
    if layout.fmt == "f16":
        return gate.astype(np.float16)
    return quant.encode(gate, layout.fmt)


def unpack_bundles(blob: np.ndarray, layout: BundleLayout) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Decode ``uint8[n, stride]`` (or flat) -> (gate ``[n, d]`` or None (not gated, or
    apart), up ``[n, d]``, down ``[d, n]``), float32."""
    blob = np.asarray(blob)
    if blob.dtype != np.uint8:
        blob = blob.view(np.uint8)
    if blob.size != layout.nbytes:
        raise ValueError(f"bundle data has {blob.size} bytes; the layout needs {layout.nbytes}")
    blob = blob.reshape(layout.n_neurons, layout.stride)
    pb = layout.part_bytes
    parts = {}
    for part in layout.parts:
        off = layout.part_offset(part)
        parts[part] = quant.decode(blob[:, off:off + pb], layout.fmt)
    return parts.get("gate"), parts["up"], np.ascontiguousarray(parts["down"].T)
