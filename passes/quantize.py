"""``quantize``: choose a ggml format per weight and round the weights to it.

Formats: ``f32``, ``f16``, ``q8_0``, ``q4_0`` (``sparseforge.kernels.quant``, byte-exact
with ggml). Defaults: FFN matrices ``q4_0``, attention and embeddings (and other
matrices: pooler, LM head) ``q8_0``, vectors (norms, biases) ``f32``. FFN matrices are
quantized as the artifact stores them, in neuron bundles: gate/up rows and down
*columns*, each a run of ``d_model`` values (``kernels.bundle``); one format per FFN
layer (``ffn``, per layer ``ffn_layers = {"3" = "q8_0"}``). Other matrices are
quantized along their rows; ``overrides`` maps ``fnmatch`` patterns of tensor names to
formats. A matrix whose rows are not a multiple of 32 values falls back to
``fallback`` (reported).

The IR after the pass reads every weight as float32 *dequantized* values, exactly what
the artifact will decode to, so the reference executors and every later pass compute
with the quantized model; but it does not hold them: Q8_0/Q4_0 weights are stored
encoded (``uint8`` rows; FFN down matrices as rows of their transpose, the bundle
orientation) in files the pass writes, one per task, and the tensor store decodes them
on each read (``TensorRef.encoding``); f16 weights are stored as f16. Each block's
``annotations["quant"]`` records its FFN format and ``quantize/quantize.json``
(attached) every tensor's format. The ``pack`` pass encodes the weights again and checks
that they decode to the IR's values bit for bit. Works one tensor at a time, a chunk of
rows at a time; one task per FFN layer (and per other tensor) goes to an executor
(``toolchain.executors``: ``executor``, ``workers``; the result does not depend on them;
tasks write their file themselves, so a Ray cluster needs the work directory on a
shared filesystem, as it needs the model's files). Statistics: per tensor format, encoded bytes and SQNR (dB; None when exact),
and per-format totals. The ONNX graph is cleared (weights changed).
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparseforge.kernels import quant
from sparseforge.toolchain.errors import PassError
from sparseforge.toolchain.executors import executor_names, make_executor, map_in_order, result_options
from sparseforge.toolchain.ir import ANNOTATION_PREFIX, ModelIR
from sparseforge.toolchain.pass_base import Pass, PassContext, PassResult, register_pass
from sparseforge.toolchain.progress import progress

REPORT = "quantize/quantize.json"


@dataclass(frozen=True)
class QuantizeOptions:
    """Formats (``f32``, ``f16``, ``q8_0``, ``q4_0``) by tensor kind: ``ffn`` (per layer
    ``ffn_layers``), ``attention``, ``embeddings``, ``other`` matrices, ``vectors``
    (1-D: norms, biases); ``overrides`` {fnmatch pattern: format} for non-FFN tensors;
    ``fallback`` for matrices whose rows are not a multiple of 32 values; ``executor`` and
    ``workers`` (0: one per core; 1: in this process) run the per-layer tasks."""

    ffn: str = "q4_0"
    ffn_layers: dict[str, str] = field(default_factory=dict)
    attention: str = "q8_0"
    embeddings: str = "q8_0"
    other: str = "q8_0"
    vectors: str = "f32"
    overrides: dict[str, str] = field(default_factory=dict)
    fallback: str = "f16"
    executor: str = "local"
    workers: int = 1


def sqnr_db(x: np.ndarray, y: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio of ``y`` against ``x`` in dB (None: exact)."""
    x64 = np.asarray(x, dtype=np.float64)
    noise = float(np.square(x64 - np.asarray(y, dtype=np.float64)).sum())
    signal = float(np.square(x64).sum())
    if noise == 0.0:
        return None
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def tensor_kind(name: str, ndim: int) -> str:
    """``vectors``, ``embeddings``, ``attention`` or ``other`` for a non-FFN weight."""
    lower = name.lower()
    if ndim == 1:
        return "vectors"
    if "embed" in lower:
        return "embeddings"
    if "attn" in lower or "attention" in lower:
        return "attention"
    return "other"


def roundtrip_rows(x: np.ndarray, fmt: str) -> np.ndarray:
    """``x`` as ``fmt`` stores it (rows along the last axis), float32."""
    x = np.asarray(x, dtype=np.float32)
    return np.array(x) if fmt == "f32" else quant.roundtrip(x, fmt)


@register_pass
class Quantize(Pass):
    name = "quantize"
    summary = "ggml quantization (f32/f16/Q8_0/Q4_0) per tensor; IR keeps dequantized weights"
    Options = QuantizeOptions

    def check_options(self) -> None:
        o = self.options
        fmts = [o.ffn, o.attention, o.embeddings, o.other, o.vectors, o.fallback,
                *o.ffn_layers.values(), *o.overrides.values()]
        for fmt in fmts:
            try:
                quant.normalize_format(fmt)
            except ValueError as exc:
                raise PassError(f"quantize: {exc}") from None
        if quant.normalize_format(o.fallback) in quant.QUANTIZED:
            raise PassError(f"quantize: fallback must be f32 or f16, got {o.fallback!r}")
        for key in o.ffn_layers:
            if not str(key).isdigit():
                raise PassError(f"quantize: ffn_layers keys are layer numbers, got {key!r}")
        if o.workers < 0:
            raise PassError(f"quantize: workers must be >= 0 (0: one per core), got {o.workers}")
        if o.executor not in executor_names():
            raise PassError(f"quantize: unknown executor {o.executor!r} (known: {', '.join(executor_names())})")

    def check_model(self, ir: ModelIR) -> None:
        bad = [k for k in self.options.ffn_layers if int(k) >= len(ir.blocks)]
        if bad:
            raise PassError(f"quantize: ffn_layers names layer {bad[0]}, the model has {len(ir.blocks)}")

    # -- choices ---------------------------------------------------------------------
    def ffn_format(self, layer: int, d_model: int) -> tuple[str, bool]:
        o = self.options
        fmt = quant.normalize_format(o.ffn_layers.get(str(layer), o.ffn))
        if fmt in quant.QUANTIZED and d_model % quant.BLOCK:
            return quant.normalize_format(o.fallback), True
        return fmt, False

    def tensor_format(self, name: str, shape: tuple[int, ...]) -> tuple[str, bool]:
        o = self.options
        fmt = next((f for pat, f in o.overrides.items() if fnmatch.fnmatchcase(name, pat)), None)
        fmt = quant.normalize_format(fmt or getattr(o, tensor_kind(name, len(shape))))
        if fmt in quant.QUANTIZED and (len(shape) != 2 or shape[-1] % quant.BLOCK):
            return quant.normalize_format(o.fallback), True
        return fmt, False

    # -- run -------------------------------------------------------------------------
    def run(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        out = ir.evolve()
        fallbacks: list[str] = []
        ffn_names = set()
        tasks = []
        for b in out.blocks:
            fmt, fell_back = self.ffn_format(b.layer, ir.spec.hidden_size)
            items = []
            for name, transpose in ((b.gate, False), (b.up, False), (b.down, True)):
                if name:
                    items.append(_item(out, name, fmt, transpose))
                    ffn_names.add(name)
                    if fell_back:
                        fallbacks.append(name)
            tasks.append(tuple(items))
            b.annotations["quant"] = {"format": fmt, "fallback": fell_back,
                                      "tensors": {p: n for p, n in (("gate", b.gate), ("up", b.up), ("down", b.down))
                                                  if n}}
        for name in out.store.names():
            if name in ffn_names or name.startswith(ANNOTATION_PREFIX):
                continue
            fmt, fell_back = self.tensor_format(name, out.store.shape(name))
            tasks.append((_item(out, name, fmt, False),))
            if fell_back:
                fallbacks.append(name)
        rows: dict[str, dict[str, Any]] = {}
        executor = make_executor(self.options.executor, self.options.workers)
        folder = (ctx.work_dir / "quantize-tensors").resolve()
        jobs = [(items, str(folder / f"task-{i:05d}.safetensors")) for i, items in enumerate(tasks)]
        results = map_in_order(executor, quantize_tensors, jobs)
        for (items, path), done in progress(zip(jobs, results), desc="quantize", enabled=ctx.progress,
                                            total=len(jobs), unit="task"):
            written = {}
            for (name, *_), (stored, row) in zip(items, done):
                if stored is not None:
                    written[name] = stored
                rows[name] = row
            if written:
                out.store.register_file(path, written)
        stats = _summary(rows, fallbacks)
        self._attach(out, rows, ctx.work_dir)
        out.graph = None
        return PassResult(out, stats, modified=True)

    def _attach(self, out: ModelIR, rows: dict[str, dict[str, Any]], work: Path) -> None:
        path = work / "quantize.json"
        doc = {"options": result_options(self.options_dict()), "tensors": rows}
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        out.files[REPORT] = str(path)


QuantItem = tuple  # (name, TensorRef or array, format, transpose)


def _item(ir: ModelIR, name: str, fmt: str, transpose: bool) -> QuantItem:
    """One tensor to quantize: a file reference (a worker reads it, memory-mapped) or,
    for a tensor only in memory, the array itself."""
    ref = ir.store.ref(name)
    return (name, ref if ref is not None else ir.store.get(name), fmt, transpose)


def quantize_tensors(job: tuple[tuple[QuantItem, ...], str]) -> list[tuple[tuple[str | None, bool] | None,
                                                                        dict[str, Any]]]:
    """An executor task: quantize ``items`` and write what changed to the safetensors file
    ``path``; per item how it is stored there (``(encoding, transpose)``; None: unchanged,
    an f32 tensor kept as it is) and its row of ``quantize.json``."""
    from sparseforge.toolchain.safetensors_io import write_safetensors
    from sparseforge.toolchain.tensors import TensorRef, TensorStore, decode_rows

    items, path = job
    out, arrays = [], {}
    for name, source, fmt, transpose in items:
        store = TensorStore({name: source}) if isinstance(source, TensorRef) else None
        x = store.get(name) if store is not None else np.asarray(source)
        rows = x.T if transpose else x
        k = rows.shape[-1]
        n_rows = int(np.prod(rows.shape[:-1])) if rows.ndim > 1 else 1
        row = {"format": fmt, "bytes": n_rows * quant.row_bytes(fmt, k), "f32_bytes": 4 * int(x.size),
               "orientation": "columns" if transpose else "rows"}
        if fmt == "f32" and x.dtype == np.float32:
            out.append((None, {**row, "sqnr_db": None}))  # unchanged: keep the reference, no copy
            continue
        if fmt in quant.QUANTIZED:
            enc = _encode_rows(rows, fmt)
            arrays[name], stored = enc, (fmt, transpose)
            y = (lambda lo, hi, enc=enc: _decoded_rows(enc, fmt, lo, hi)) if not transpose else None
            full = None if y is not None else decode_rows(enc, fmt, True)
        else:
            arrays[name] = _convert(x, np.float16 if fmt == "f16" else np.float32)
            stored, y, full = (None, False), None, arrays[name]
        out.append((stored, {**row, "sqnr_db": _sqnr(x, y, full)}))
    if arrays:
        write_safetensors(path, arrays)
    return out


ROWS_BYTES = 32 * 1024 * 1024  # float32 bytes of the row chunks quantize works on


def _step(n_cols: int) -> int:
    return max(1, ROWS_BYTES // max(1, 4 * n_cols))


def _encode_rows(rows: np.ndarray, fmt: str) -> np.ndarray:
    """``quant.encode(rows, fmt)`` a chunk of rows at a time (the same bytes: rows are
    encoded independently)."""
    if rows.ndim != 2:
        return quant.encode(np.asarray(rows, dtype=np.float32), fmt)
    step = _step(rows.shape[1])
    out = np.empty((rows.shape[0], quant.row_bytes(fmt, rows.shape[1])), np.uint8)
    for lo in range(0, rows.shape[0], step):
        out[lo: lo + step] = quant.encode(np.asarray(rows[lo: lo + step], dtype=np.float32), fmt)
    return out


def _decoded_rows(enc: np.ndarray, fmt: str, lo: int, hi: int) -> np.ndarray:
    """Flat float32 values ``lo:hi`` of the decoded rows of ``enc``."""
    width = enc.shape[-1] // quant.BLOCK_BYTES[fmt] * quant.BLOCK
    r0, r1 = lo // width, -(-hi // width)
    y = quant.decode(enc[r0:r1], fmt).reshape(-1)
    return y[lo - r0 * width: hi - r0 * width]


def _convert(x: np.ndarray, dtype: type) -> np.ndarray:
    """``x`` as a C-contiguous array of ``dtype``, converted a chunk of rows at a time."""
    if x.ndim < 2:
        return np.ascontiguousarray(x, dtype=dtype)
    out = np.empty(x.shape, dtype)
    step = _step(int(np.prod(x.shape[1:])))
    for lo in range(0, x.shape[0], step):
        out[lo: lo + step] = x[lo: lo + step]
    return out


LEAF = 1 << 20  # values per float64 chunk of the SQNR sums


def _pairwise(values, lo: int, hi: int) -> float:
    """``np.sum`` of the float64 values ``lo:hi`` (``values(lo, hi)``), split where numpy's
    pairwise summation splits, so the result is bit-identical to summing the whole
    C-contiguous array at once while only a chunk is in memory."""
    n = hi - lo
    if n <= LEAF:
        return np.sum(values(lo, hi))
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise(values, lo, lo + n2) + _pairwise(values, lo + n2, hi)


def _sqnr(x: np.ndarray, y, full: np.ndarray | None) -> float | None:
    """:func:`sqnr_db` of ``x`` and its stored values (``y(lo, hi)``: flat float32 values,
    or the whole array ``full``), in float64 chunks when ``x`` is C-contiguous (the same
    result), else at once."""
    if not x.flags.c_contiguous or x.size <= LEAF:
        return sqnr_db(np.asarray(x, dtype=np.float32), full if full is not None else y(0, x.size).reshape(x.shape))
    xf = x.reshape(-1)
    yf = full.reshape(-1) if full is not None else None

    def x64(lo: int, hi: int) -> np.ndarray:
        return xf[lo:hi].astype(np.float32).astype(np.float64)

    def y64(lo: int, hi: int) -> np.ndarray:
        return (yf[lo:hi] if yf is not None else y(lo, hi)).astype(np.float64)

    noise = float(_pairwise(lambda lo, hi: np.square(x64(lo, hi) - y64(lo, hi)), 0, xf.size))
    signal = float(_pairwise(lambda lo, hi: np.square(x64(lo, hi)), 0, xf.size))
    if noise == 0.0:
        return None
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _summary(rows: dict[str, dict[str, Any]], fallbacks: list[str]) -> dict[str, Any]:
    by_format: dict[str, dict[str, Any]] = {}
    for row in rows.values():
        f = by_format.setdefault(row["format"], {"tensors": 0, "bytes": 0, "f32_bytes": 0, "sqnr": []})
        f["tensors"] += 1
        f["bytes"] += row["bytes"]
        f["f32_bytes"] += row["f32_bytes"]
        if row["sqnr_db"] is not None:
            f["sqnr"].append(row["sqnr_db"])
    for f in by_format.values():
        s = f.pop("sqnr")
        f["min_sqnr_db"] = min(s) if s else None
        f["mean_sqnr_db"] = float(np.mean(s)) if s else None
    total = sum(r["bytes"] for r in rows.values())
    f32 = sum(r["f32_bytes"] for r in rows.values())
    return {"tensors": len(rows), "bytes": total, "f32_bytes": f32, "compression": f32 / max(total, 1),
            "formats": dict(sorted(by_format.items())), "fallbacks": fallbacks,
            "per_tensor": {n: {k: r[k] for k in ("format", "bytes", "sqnr_db")} for n, r in sorted(rows.items())}}


def formats_of(ir: ModelIR) -> dict[str, str]:
    """The format the quantize pass chose for each weight (empty when it has not run)."""
    path = ir.files.get(REPORT)
    if path is None:
        return {}
    return {name: row["format"] for name, row in json.loads(Path(path).read_text())["tensors"].items()}
