"""ggml block formats in numpy: Q8_0 and Q4_0 encoders/decoders, f16/f32 row helpers.

A row of ``k`` values (``k`` a multiple of :data:`BLOCK`) is stored as ``k // 32`` blocks:

* ``q8_0`` (34 bytes): fp16 scale ``d`` then 32 int8 ``q``; value = ``d * q``.
  ``d = max|x| / 127``, ``q = round_half_away(x / d)``.
* ``q4_0`` (18 bytes): fp16 scale ``d`` then 16 bytes of nibbles; byte ``j`` holds element
  ``j`` in its low nibble and element ``j + 16`` in its high nibble; value = ``d * (q - 8)``.
  ``d = m / -8`` where ``m`` is the element of largest magnitude (sign kept), and
  ``q = min(15, trunc(x / d + 8.5))``.
* ``f32`` / ``f16``: little-endian IEEE values, 4 / 2 bytes each.

The arithmetic follows ggml's reference quantizers operation by operation in float32, so
the bytes are identical to ``gguf.quants.quantize`` (tested). Everything works on the last
axis; leading axes are kept. Numpy only: the artifact writer and the kernels share it.
"""
from __future__ import annotations

import numpy as np

BLOCK = 32
#: bytes per block of 32 values
BLOCK_BYTES = {"f32": 4 * BLOCK, "f16": 2 * BLOCK, "q8_0": 2 + BLOCK, "q4_0": 2 + BLOCK // 2}
FORMATS = tuple(BLOCK_BYTES)
QUANTIZED = ("q8_0", "q4_0")
#: ggml type ids (``gguf.GGMLQuantizationType``) of the formats
GGML_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}

#: float32 value of every fp16 bit pattern (ggml's table): kernels decode block scales by lookup
with np.errstate(invalid="ignore"):  # the NaN patterns (some platforms warn on the cast)
    F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def normalize_format(fmt: str) -> str:
    """Canonical name (``f32``, ``f16``, ``q8_0``, ``q4_0``) of a format, any case."""
    name = str(fmt).strip().lower()
    if name not in BLOCK_BYTES:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    return name


def row_bytes(fmt: str, k: int) -> int:
    """Bytes of one encoded row of ``k`` values in ``fmt``."""
    fmt = normalize_format(fmt)
    if fmt in ("f32", "f16"):
        return k * BLOCK_BYTES[fmt] // BLOCK
    check_blocked(fmt, k)
    return k // BLOCK * BLOCK_BYTES[fmt]


def check_blocked(fmt: str, k: int) -> None:
    if k % BLOCK:
        raise ValueError(f"{fmt} rows need a length that is a multiple of {BLOCK}; got {k}")


def _blocks(x: np.ndarray, fmt: str) -> tuple[np.ndarray, tuple[int, ...]]:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("expected an array with at least one axis")
    check_blocked(fmt, x.shape[-1])
    return x.reshape(-1, BLOCK), x.shape[:-1]


def _round_half_away(v: np.ndarray) -> np.ndarray:
    a = np.abs(v)
    fl = np.floor(a)
    return np.sign(v) * (fl + (a - fl >= np.float32(0.5)).astype(np.float32))


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """``x[..., k]`` -> ``uint8[..., k // 32 * 34]``."""
    b, lead = _blocks(x, "q8_0")
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = _round_half_away(b * inv).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return out.reshape(*lead, -1)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """``x[..., k]`` -> ``uint8[..., k // 32 * 18]``."""
    b, lead = _blocks(x, "q4_0")
    idx = np.abs(b).argmax(axis=1)[:, None]
    d = np.take_along_axis(b, idx, axis=1) / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.trunc(b * inv + np.float32(8.5)).astype(np.uint8)
    q = np.minimum(q, np.uint8(15))
    nib = q[:, :16] | (q[:, 16:] << np.uint8(4))
    out = np.concatenate([d.astype(np.float16).view(np.uint8), nib], axis=1)
    return out.reshape(*lead, -1)


def _split(data: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    data = np.asarray(data)
    if data.dtype != np.uint8:
        data = data.view(np.uint8)
    size = BLOCK_BYTES[fmt]
    if data.ndim == 0 or data.shape[-1] % size:
        raise ValueError(f"{fmt} data needs a last axis that is a multiple of {size} bytes; got {data.shape}")
    blocks = np.ascontiguousarray(data).reshape(-1, size)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return d, blocks[:, 2:], data.shape[:-1]


def dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    """``uint8[..., nb * 34]`` -> ``float32[..., nb * 32]``."""
    d, qs, lead = _split(data, "q8_0")
    return (d * qs.view(np.int8).astype(np.float32)).reshape(*lead, -1)


def dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    """``uint8[..., nb * 18]`` -> ``float32[..., nb * 32]``."""
    d, qs, lead = _split(data, "q4_0")
    q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=1).astype(np.int8) - np.int8(8)
    return (d * q.astype(np.float32)).reshape(*lead, -1)


def encode_f32(x: np.ndarray) -> np.ndarray:
    """``x[..., k]`` -> ``uint8[..., 4k]`` (little-endian float32)."""
    x = np.ascontiguousarray(x, dtype="<f4")
    return x.view(np.uint8).reshape(*x.shape[:-1], -1)


def encode_f16(x: np.ndarray) -> np.ndarray:
    """``x[..., k]`` -> ``uint8[..., 2k]`` (little-endian float16, round to nearest even)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).astype("<f2"))
    return x.view(np.uint8).reshape(*x.shape[:-1], -1)


def decode_f32(data: np.ndarray) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.uint8)
    return data.view("<f4").astype(np.float32)


def decode_f16(data: np.ndarray) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.uint8)
    return data.view("<f2").astype(np.float32)


_ENCODERS = {"f32": encode_f32, "f16": encode_f16, "q8_0": quantize_q8_0, "q4_0": quantize_q4_0}
_DECODERS = {"f32": decode_f32, "f16": decode_f16, "q8_0": dequantize_q8_0, "q4_0": dequantize_q4_0}


def encode(x: np.ndarray, fmt: str) -> np.ndarray:
    """Encode rows (last axis) of ``x`` in ``fmt`` -> ``uint8[..., row_bytes(fmt, k)]``."""
    fmt = normalize_format(fmt)
    x = np.asarray(x, dtype=np.float32)
    row_bytes(fmt, x.shape[-1])  # validates the length
    return _ENCODERS[fmt](x)


def decode(data: np.ndarray, fmt: str) -> np.ndarray:
    """Decode rows (last axis) of encoded bytes -> float32."""
    return _DECODERS[normalize_format(fmt)](data)


def roundtrip(x: np.ndarray, fmt: str) -> np.ndarray:
    """``decode(encode(x, fmt), fmt)``: what the kernels see of ``x``."""
    return decode(encode(x, fmt), fmt)


def quantize_activation_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 of an activation vector ``x[..., k]`` as (int8 ``q[..., k]``, float32 block
    scales ``d[..., k // 32]``, the fp16-rounded scale as the kernels use it): the numpy
    emulation of what quantized kernels do to their input once per token."""
    enc = quantize_q8_0(x)
    d, qs, lead = _split(enc, "q8_0")
    return qs.view(np.int8).reshape(*lead, -1), d.reshape(*lead, -1)
