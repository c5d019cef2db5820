"""Reference FFN block and activation functions (numpy, float32 in / float32 out).

One FFN block on ``x [tokens, d_model]``::

    gated:      h = act(x Wg^T + bg) * (x Wu^T + bu)        h: [tokens, n_ff]
    not gated:  h = act(x Wu^T + bu)
                y = h Wd^T + bd                              y: [tokens, d_model]

Weights are in the canonical layouts (``gate``/``up`` ``[n_ff, d_model]``, ``down``
``[d_model, n_ff]``) and are read from the tensor store on every call (memory maps; no
copy of the model is held). Matmuls run in float32 (BLAS sgemm, float32 accumulation, as
torch does on CPU); activations are evaluated in float64 and rounded to float32, so they
are within one float32 ulp of the exact function.

Activation kinds live in :data:`ACTIVATIONS`, a dict ``name -> fn(z, block)``; a pass
that introduces a new kind (e.g. a thresholded ReLU whose per-layer threshold it stores
in ``block.annotations``) adds one entry with :func:`register_activation`.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol

import numpy as np

from ..ir import FFNBlock
from ..tensors import TensorStore

ActivationFn = Callable[[np.ndarray, FFNBlock], np.ndarray]
"""``fn(z, block) -> act(z)``: ``z`` float32 pre-activation ``[tokens, n_ff]``; returns
float32 of the same shape. ``block`` gives access to per-layer parameters (annotations)."""


class Capture(Protocol):
    """``capture(layer, ffn_input [tokens, d_model], activation [tokens, n_ff])``; both float32.

    The arrays are the executor's own buffers: copy them if you keep them."""

    def __call__(self, layer: int, ffn_input: np.ndarray, activation: np.ndarray) -> None: ...


# -- erf -----------------------------------------------------------------------------------
# Vectorised port of fdlibm's s_erf.c (double precision, error < 1 ulp of float64):
#   Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
#   Developed at SunPro, a Sun Microsystems, Inc. business.
#   Permission to use, copy, modify, and distribute this software is freely granted,
#   provided that this notice is preserved.
_ERX = 8.45062911510467529297e-01
_EFX = 1.28379167095512586316e-01
_PP = (1.28379167095512558561e-01, -3.25042107247001499370e-01, -2.84817495755985104766e-02,
       -5.77027029648944159157e-03, -2.37630166566501626084e-05)
_QQ = (1.0, 3.97917223959155352819e-01, 6.50222499887672944485e-02, 5.08130628187576562776e-03,
       1.32494738004321644526e-04, -3.96022827877536812320e-06)
_PA = (-2.36211856075265944077e-03, 4.14856118683748331666e-01, -3.72207876035701323847e-01,
       3.18346619901161753674e-01, -1.10894694282396677476e-01, 3.54783043256182359371e-02,
       -2.16637559486879084300e-03)
_QA = (1.0, 1.06420880400844228286e-01, 5.40397917702171048937e-01, 7.18286544141962662868e-02,
       1.26171219808761642112e-01, 1.36370839120290507362e-02, 1.19844998467991074170e-02)
_RA = (-9.86494403484714822705e-03, -6.93858572707181764372e-01, -1.05586262253232909814e+01,
       -6.23753324503260060396e+01, -1.62396669462573470355e+02, -1.84605092906711035994e+02,
       -8.12874355063065934246e+01, -9.81432934416914548592e+00)
_SA = (1.0, 1.96512716674392571292e+01, 1.37657754143519042600e+02, 4.34565877475229228821e+02,
       6.45387271733267880336e+02, 4.29008140027567833386e+02, 1.08635005541779435134e+02,
       6.57024977031928170135e+00, -6.04244152148580987438e-02)
_RB = (-9.86494292470009928597e-03, -7.99283237680523006574e-01, -1.77579549177547519889e+01,
       -1.60636384855821916062e+02, -6.37566443368389627722e+02, -1.02509513161107724954e+03,
       -4.83519191608651397019e+02)
_SB = (1.0, 3.03380607434824582924e+01, 3.25792512996573918826e+02, 1.53672958608443695994e+03,
       3.19985821950859553908e+03, 2.55305040643316442583e+03, 4.74528541206955367215e+02,
       -2.24409524465858183362e+01)


def _poly(coeffs: tuple[float, ...], z: np.ndarray) -> np.ndarray:
    """``c0 + c1 z + c2 z^2 + ...`` by Horner's rule."""
    out = np.full_like(z, coeffs[-1])
    for c in coeffs[-2::-1]:
        out *= z
        out += c
    return out


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, in float64 (accurate to ~1 ulp of float64)."""
    x = np.asarray(x, dtype=np.float64)
    ax = np.abs(x)
    out = np.where(np.isnan(x), x, 1.0)  # erf(|x|) for |x| >= 6 is 1 in float64
    # every branch computes erf(|x|); the sign of x is applied at the end
    m = ax < 0.84375  # erf(x) = x + x R(x^2)
    if m.any():
        v = ax[m]
        z = v * v
        out[m] = v + v * (_poly(_PP, z) / _poly(_QQ, z))
    m = (ax >= 0.84375) & (ax < 1.25)  # erf(|x|) = erx + P(s)/Q(s), s = |x| - 1
    if m.any():
        s = ax[m] - 1.0
        out[m] = _ERX + _poly(_PA, s) / _poly(_QA, s)
    # 1.25 <= |x| < 6: erf(|x|) = 1 - exp(-x^2 - 0.5625 + R(1/x^2)/S(1/x^2)) / |x|
    for m, (rc, sc) in (((ax >= 1.25) & (ax < 1.0 / 0.35), (_RA, _SA)),
                        ((ax >= 1.0 / 0.35) & (ax < 6.0), (_RB, _SB))):
        if m.any():
            v = ax[m]
            s = 1.0 / (v * v)
            # z = v with the low 32 mantissa bits cleared, so -z*z is exact (fdlibm's trick)
            z = (v.view(np.uint64) & np.uint64(0xFFFFFFFF00000000)).view(np.float64)
            r = np.exp(-z * z - 0.5625) * np.exp((z - v) * (z + v) + _poly(rc, s) / _poly(sc, s))
            out[m] = 1.0 - r / v
    return np.copysign(out, x, out=out)


# -- activations -----------------------------------------------------------------------------
_SQRT1_2 = 1.0 / math.sqrt(2.0)
_SQRT_2_PI = math.sqrt(2.0 / math.pi)


def gelu(z: np.ndarray) -> np.ndarray:
    """Exact GELU ``0.5 z (1 + erf(z / sqrt 2))`` (torch ``gelu(approximate='none')``)."""
    z64 = np.asarray(z, dtype=np.float64)
    return (0.5 * z64 * (1.0 + erf(z64 * _SQRT1_2))).astype(np.float32)


def gelu_tanh(z: np.ndarray) -> np.ndarray:
    """Tanh-approximated GELU (torch ``gelu(approximate='tanh')``, HF ``gelu_new``)."""
    z64 = np.asarray(z, dtype=np.float64)
    return (0.5 * z64 * (1.0 + np.tanh(_SQRT_2_PI * (z64 + 0.044715 * z64 ** 3)))).astype(np.float32)


def silu(z: np.ndarray) -> np.ndarray:
    """SiLU / swish ``z * sigmoid(z)`` (overflow-free form)."""
    z64 = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z64))
    sig = np.where(z64 >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return (z64 * sig).astype(np.float32)


def relu(z: np.ndarray) -> np.ndarray:
    """``max(z, 0)``."""
    return np.maximum(np.asarray(z, dtype=np.float32), np.float32(0))


def fatrelu(z: np.ndarray, threshold: float) -> np.ndarray:
    """FATReLU: ``z if z > threshold else 0`` (ReLU for threshold 0)."""
    z = np.asarray(z, dtype=np.float32)
    return np.where(z > np.float32(threshold), z, np.float32(0))


ACTIVATIONS: dict[str, ActivationFn] = {
    "gelu": lambda z, block: gelu(z),
    "gelu_tanh": lambda z, block: gelu_tanh(z),
    "silu": lambda z, block: silu(z),
    "relu": lambda z, block: relu(z),
    "fatrelu": lambda z, block: fatrelu(z, block.activation_threshold),
}
"""Activation kinds by ``FFNBlock.activation`` name: ``fn(z, block) -> act(z)``."""


def register_activation(name: str, fn: ActivationFn) -> None:
    """Add (or replace) the activation kind ``name``."""
    ACTIVATIONS[name] = fn


def apply_activation(block: FFNBlock, z: np.ndarray) -> np.ndarray:
    """``block``'s activation applied to the pre-activation ``z`` (float32, any shape)."""
    try:
        fn = ACTIVATIONS[block.activation]
    except KeyError:
        raise ValueError(f"layer {block.layer}: unknown FFN activation {block.activation!r} "
                         f"(known: {', '.join(sorted(ACTIVATIONS))})") from None
    return fn(z, block)


def apply_up_activation(block: FFNBlock, up: np.ndarray) -> np.ndarray:
    """The up projection's activation: identity, or ReLU for dReLU blocks."""
    if block.up_activation is None:
        return up
    if block.up_activation == "relu":
        return np.maximum(up, np.float32(0))
    raise ValueError(f"layer {block.layer}: unknown up activation {block.up_activation!r} (known: relu)")


# -- the block ---------------------------------------------------------------------------------
def _linear(store: TensorStore, x: np.ndarray, weight: str, bias: str | None) -> np.ndarray:
    """``x W^T + b`` with ``W [out, in]`` from the store; float32."""
    y = x @ store.get_f32(weight).T
    if bias:
        y += store.get_f32(bias)
    return y


def ffn_forward(store: TensorStore, block: FFNBlock, x: np.ndarray, *,
                capture: Capture | None = None) -> np.ndarray:
    """One FFN block: ``x [tokens, d_model]`` float32 -> ``y [tokens, d_model]`` float32.

    ``x`` may also have extra leading dims (``[..., d_model]``); they are flattened into
    tokens for ``capture`` and restored on the output. ``capture(block.layer, x2d, h)``
    is called with the FFN input ``[tokens, d_model]`` and the activation
    ``h [tokens, n_ff]`` that feeds the down projection.
    """
    x = np.asarray(x, dtype=np.float32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    up = _linear(store, x2, block.up, block.up_bias)
    if block.gate:
        h = apply_activation(block, _linear(store, x2, block.gate, block.gate_bias))
        h *= apply_up_activation(block, up)
    else:
        h = apply_activation(block, up)
    if block.output_threshold > 0:
        h[np.abs(h) <= block.output_threshold] = 0.0
    if capture is not None:
        capture(block.layer, x2, h)
    y = _linear(store, h, block.down, block.down_bias)
    return y.reshape(*lead, y.shape[-1])
