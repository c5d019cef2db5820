"""Rotary position embeddings (RoPE) of the decoders, in numpy float32 as transformers
computes them: the inverse frequencies of each scaling type (:func:`rope_inv_freq`:
``linear``, Llama 3's ``llama3``, Phi-3's ``longrope``, ``yarn``, ``dynamic`` NTK), the ``cos, sin`` tables
of a forward call (:class:`Rope`, per layer: :meth:`Rope.per_layer`) and their use on the
queries and keys (:func:`apply_rope`, ``rotate_half`` over a head's first ``dim``
dimensions). Shared by the reference decoder, the runtime, the torch twin and the ONNX
builder."""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from ..ir import ArchSpec


ROPE_SCALING_KEYS = {"linear": {"factor": float},
                     "llama3": {"factor": float, "low_freq_factor": float, "high_freq_factor": float,
                                "original_max_position_embeddings": int},
                     "longrope": {"short_factor": list, "long_factor": list, "original_max_position_embeddings": int,
                                  "attention_factor": float},
                     "yarn": {"factor": float, "original_max_position_embeddings": int, "beta_fast": float,
                              "beta_slow": float, "truncate": bool, "attention_factor": float},
                     "dynamic": {"factor": float, "original_max_position_embeddings": int}}
"""RoPE scaling types the decoders compute (``ArchSpec.rope_scaling["type"]``) and the
values each needs (``list``: one positive number per rotary frequency, ``head_dim / 2``).
``dynamic``'s ``original_max_position_embeddings`` is the model's
``max_position_embeddings``, past which transformers rescales the frequencies."""
#: scaling types whose frequencies depend on the last position of the tokens computed together
CALL_DEPENDENT = ("longrope", "dynamic")


def _positive(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0 \
        and (kind is not int or value == int(value))


def check_rope_scaling(scaling: dict[str, Any] | None, head_dim: int | None = None) -> None:
    """A ValueError naming what is wrong with a ``rope_scaling`` dict (None: unscaled);
    with ``head_dim``, also a factor list whose length is not ``head_dim / 2``."""
    if scaling is None:
        return
    if not isinstance(scaling, dict) or scaling.get("type") not in ROPE_SCALING_KEYS:
        raise ValueError(f"RoPE scaling {json.dumps(scaling)} is not one of the supported types "
                         f"({', '.join(ROPE_SCALING_KEYS)})")
    for key, kind in ROPE_SCALING_KEYS[scaling["type"]].items():
        value = scaling.get(key)
        if kind is list:
            if not isinstance(value, list) or not value or not all(_positive(v, float) for v in value):
                raise ValueError(f"RoPE scaling {scaling['type']!r}: {key} is not a list of positive numbers")
            if head_dim is not None and len(value) != head_dim // 2:
                raise ValueError(f"RoPE scaling {scaling['type']!r}: {key} has {len(value)} values, not one per "
                                 f"rotary frequency ({head_dim // 2})")
        elif not _positive(value, kind):
            raise ValueError(f"RoPE scaling {scaling['type']!r}: {key} = {json.dumps(value)} is not "
                             f"{'true or false' if kind is bool else 'a positive integer' if kind is int else 'a positive number'}")
    if scaling["type"] == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"RoPE scaling 'llama3': high_freq_factor {scaling['high_freq_factor']} is not above "
                         f"low_freq_factor {scaling['low_freq_factor']}")


def rope_scaling_text(scaling: dict[str, Any]) -> str:
    """``rope_scaling`` in a line of ``inspect``: ``llama3 scaling: factor 8, ...``; a
    factor list as its length and range (``short_factor 48 values 1-1.25``)."""
    def text(value: Any) -> str:
        if isinstance(value, list):
            return f"{len(value)} values {min(value):g}-{max(value):g}"
        return str(value).lower() if isinstance(value, bool) else f"{value:g}"

    keys = ROPE_SCALING_KEYS[scaling["type"]]
    return f"{scaling['type']} scaling: " + ", ".join(f"{k} {text(scaling[k])}" for k in keys)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None,
                  end: int | None = None) -> np.ndarray:
    """Inverse frequencies ``[head_dim / 2]`` float32 (radians per position), as
    transformers computes them in float32: ``theta^(-2i/head_dim)``, then ``scaling``
    (:data:`ROPE_SCALING_KEYS`): ``linear`` divides them all by ``factor``; ``llama3``
    (Llama 3.1-3.3) divides those whose wavelength ``2 pi / f`` exceeds
    ``original_max_position_embeddings / low_freq_factor`` by ``factor``, keeps those
    below ``original_max_position_embeddings / high_freq_factor`` and blends the ones
    between; ``longrope`` (Phi-3 128k, Phi-3.5) divides frequency ``i`` by
    ``long_factor[i]`` when ``end`` (one past the last position of the tokens computed
    together) exceeds ``original_max_position_embeddings``, by ``short_factor[i]``
    otherwise; ``yarn`` blends the frequencies divided by ``factor`` with the unscaled
    ones (:func:`_yarn_inv_freq`); ``dynamic`` (NTK-aware) raises the base to
    ``theta (factor end / L - factor + 1)^(head_dim / (head_dim - 2))`` when ``end``
    exceeds ``L = original_max_position_embeddings`` and is unscaled otherwise. For
    ``longrope`` and ``yarn`` :class:`Rope` also scales the tables by
    ``attention_factor``."""
    check_rope_scaling(scaling, head_dim)
    powers = (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))).astype(
        np.float32)  # theta^(2i/head_dim)
    if scaling is not None and scaling["type"] == "longrope":
        long = end is not None and end > scaling["original_max_position_embeddings"]
        ext = np.asarray(scaling["long_factor" if long else "short_factor"], np.float32)
        return (np.float32(1.0) / (ext * powers)).astype(np.float32)
    inv = (np.float32(1.0) / powers).astype(np.float32)
    if scaling is None:
        return inv
    if scaling["type"] == "dynamic":
        return _dynamic_inv_freq(inv, head_dim, theta, scaling, end)
    if scaling["type"] == "yarn":
        return _yarn_inv_freq(powers, head_dim, theta, scaling)
    factor = np.float32(scaling["factor"])
    if scaling["type"] == "linear":
        return (inv / factor).astype(np.float32)
    old = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    # torch evaluates ``number / tensor`` as ``reciprocal(tensor) * number``; so does this
    wavelen = ((np.float32(1) / inv) * np.float32(2 * math.pi)).astype(np.float32)
    scaled = np.where(wavelen > np.float32(old / low), inv / factor, inv).astype(np.float32)
    smooth = (((np.float32(1) / wavelen) * np.float32(old) - np.float32(low)) / np.float32(high - low)).astype(np.float32)
    blended = ((np.float32(1) - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = (wavelen >= np.float32(old / high)) & (wavelen <= np.float32(old / low))
    return np.where(medium, blended, scaled).astype(np.float32)


def _yarn_inv_freq(powers: np.ndarray, dim: int, theta: float, scaling: dict[str, Any]) -> np.ndarray:
    """YaRN (transformers' ``_compute_yarn_parameters``) from ``powers [dim / 2]`` =
    ``theta^(2i/dim)``: frequency ``i`` is ``1 / (factor powers[i])`` (interpolated) where
    the ramp over ``i`` is 1 and ``1 / powers[i]`` (extrapolated) where it is 0; the ramp
    rises linearly between the dimensions at which the original context holds
    ``beta_fast`` and ``beta_slow`` rotations (rounded outwards when ``truncate``)."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(scaling["original_max_position_embeddings"] / (rotations * 2 * math.pi)) \
            / (2 * math.log(theta))

    low, high = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolated = (np.float32(1) - ramp).astype(np.float32)
    interpolated = (np.float32(1) / (np.float32(scaling["factor"]) * powers)).astype(np.float32)
    return (interpolated * (np.float32(1) - extrapolated) + (np.float32(1) / powers) * extrapolated).astype(np.float32)


def _dynamic_inv_freq(inv: np.ndarray, dim: int, theta: float, scaling: dict[str, Any],
                      end: int | None) -> np.ndarray:
    """Dynamic NTK (transformers' ``_compute_dynamic_ntk_parameters`` as its forward
    calls it, in float32): the unscaled ``inv [dim / 2]`` up to ``L``
    positions, past them the frequencies of the raised base."""
    L = scaling["original_max_position_embeddings"]
    if end is None or end <= L:
        return inv
    f32 = np.float32
    stretch = f32(scaling["factor"]) * f32(end) / f32(L) - f32(scaling["factor"] - 1)
    base = f32(theta) * f32(np.float64(stretch) ** (dim / (dim - 2)))  # as torch's pow by a double: exactly
    exponents = (np.arange(0, dim, 2, dtype=f32) / f32(dim)).astype(np.float64)  # float32 values
    return f32(1.0) / (np.float64(base) ** exponents).astype(f32)  # nearer torch's float32 pow than numpy's


def rope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin`` tables ``[T, head_dim]`` for integer ``positions [T]`` and the model's
    ``inv_freq [head_dim / 2]`` (:func:`rope_inv_freq`).

    As transformers computes them: the angles ``position * inv_freq`` in float32, each
    half of the head repeated (``cat(freqs, freqs)``)."""
    freqs = np.asarray(positions, dtype=np.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


class Rope:
    """A decoder's rotary tables: :meth:`cos_sin` for the positions of the tokens one
    forward call computes, over the ``dim`` leading dimensions of each head RoPE rotates
    (``ArchSpec.rotary_dim``, else ``head_dim``: :meth:`for_spec`). As transformers: with
    ``longrope`` or ``dynamic`` scaling, the frequencies of a call follow its last
    position (:data:`CALL_DEPENDENT`): past ``original_max_position_embeddings`` (the
    ``switch``), LongRoPE's long factors, dynamic NTK's base for that length, for all its
    tokens (keys cached by earlier calls keep the tables they were rotated with); with
    ``longrope`` and ``yarn``, every table is multiplied by ``attention_factor``."""

    def __init__(self, dim: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        self.dim, self.theta, self.scaling = dim, theta, scaling
        self.inv_freq = rope_inv_freq(dim, theta, scaling)  # [dim / 2]; up to the switch
        self.switch = int(scaling["original_max_position_embeddings"]) \
            if scaling is not None and scaling["type"] in CALL_DEPENDENT else None
        self._long = rope_inv_freq(dim, theta, scaling, self.switch + 1) \
            if scaling is not None and scaling["type"] == "longrope" else None  # past the switch: constant
        self.attention_factor = None if scaling is None or "attention_factor" not in scaling else \
            np.float32(scaling["attention_factor"])

    @classmethod
    def for_spec(cls, spec: ArchSpec) -> "Rope":
        return cls(spec.rotary_dim or spec.head_dim, spec.rope_theta, spec.rope_scaling)

    @classmethod
    def per_layer(cls, spec: ArchSpec) -> list["Rope"]:
        """Each layer's tables: the model's, or with ``spec.local_rope_theta`` the unscaled
        local ones in the sliding-window layers (Gemma 3); layers alike share one object."""
        main = cls.for_spec(spec)
        if spec.local_rope_theta is None:
            return [main] * spec.num_layers
        local = cls(spec.rotary_dim or spec.head_dim, spec.local_rope_theta)
        return [local if spec.window(i) is not None else main for i in range(spec.num_layers)]

    def inv_freq_for(self, end: int) -> np.ndarray:
        """The frequencies ``[dim / 2]`` of a call whose last position is ``end - 1``."""
        if self.switch is None or end <= self.switch:
            return self.inv_freq
        if self._long is not None:
            return self._long
        return _dynamic_inv_freq(self.inv_freq, self.dim, self.theta, self.scaling, end)  # checked in __init__

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``cos, sin [T, dim]`` for ``positions [T]`` (integers)."""
        positions = np.asarray(positions)
        cos, sin = rope_cos_sin(positions, self.inv_freq_for(int(positions.max()) + 1 if positions.size else 0))
        if self.attention_factor is None:
            return cos, sin
        return cos * self.attention_factor, sin * self.attention_factor


def layer_tables(ropes: list[Rope], positions: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``cos, sin`` of each layer for ``positions`` (computed once per distinct :class:`Rope`)."""
    tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for rope in ropes:
        if id(rope) not in tables:
            tables[id(rope)] = rope.cos_sin(positions)
    return [tables[id(rope)] for rope in ropes]


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """``x * cos + rotate_half(x) * sin`` for ``x [..., T, head_dim]`` and ``cos, sin
    [T, dim]``, where ``rotate_half([a, b]) = [-b, a]`` splits the first ``dim`` dimensions
    in halves; the dimensions past ``dim`` pass unchanged (partial rotary embeddings)."""
    dim = cos.shape[-1]
    if dim < x.shape[-1]:
        return np.concatenate([apply_rope(x[..., :dim], cos, sin), x[..., dim:]], axis=-1)
    half = dim // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin
