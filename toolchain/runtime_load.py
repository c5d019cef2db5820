"""The runtime's view of an artifact: weights, FFN kernels, predictors, tokenizer.

``LoadedModel.open(path)`` memory-maps and validates the GGUF artifact
(:class:`~.artifact_reader.Artifact`) and prepares what the executors
(:mod:`.runtime_encoder`, :mod:`.runtime_decoder`) compute with:

* every non-FFN weight as a :class:`Linear`. F32 tensors stay zero-copy views into the
  map (one token: the Numba row kernel, several: BLAS); F16 are widened once. Q8_0/Q4_0
  matrices are either dequantized once at load (``linear="dequantize"``) or kept as their
  ggml bytes and multiplied by the Numba int8-dot row kernel (``linear="quantized"``:
  ``kernels.ffn.matvec_*``, the input quantized to Q8_0 as ggml does). On the x86 vector
  paths a quantized matrix is re-laid once, on first use, in 8-row tiles
  (``kernels.row_tiles``), and the decode step reads that copy; a decoder's prompt
  multiplies the tiles, or the rows, several tokens at a time (:meth:`Linear.matmul`).
  The mapped bytes of a matrix the runtime holds a copy of, tiles or decoded, are
  released from the resident set (:meth:`~.artifact_reader.Artifact.release`). A
  :class:`LinearGroup` multiplies several matrices of one input in one call. ``auto``
  keeps decoders quantized (decode steps are bound by the bytes read) and dequantizes
  encoders (batched); ``dequantize`` also has each quantized FFN keep its parts in
  float32 once its first dense prefill has decoded them (``LayerKernels(keep_float32=True)``:
  all-MiniLM-L6-v2 Q8_0, 8 x 16 tokens 18.1 -> 15.0 ms a batch, the FFNs 28 MB of float32);
* each FFN layer as :class:`~sparseforge.kernels.runtime.LayerKernels` over its
  bundles (a view into the map) with the block's activation fields and biases, and a
  gate-apart layer's gate matrix (a view too), whose pass over every neuron is a
  :class:`Linear`'s matvec (11008 x 4096, weights cold: 0.80 of the bandwidth probe
  against the row kernel's 0.72 in Q8_0, 0.89 against 0.86 in f32; Q4_0 and Q8_0
  through the 8-row tiles on the x86 vector paths);
* each ``predictor`` layer's :class:`~sparseforge.kernels.runtime.Predictor` (in Q8_0,
  when d is a multiple of 32, it keeps only the rows it quantized at load from the map's
  F32 tensors, whose pages are then released; a float32 one keeps the views).

:class:`FFNRunner` runs a layer's FFN in one of the modes: ``dense`` (no neuron
selection; the kernels still skip the down column of an exactly-zero activation),
``predictor`` (the layer's predictor selects the neurons, then ``forward(x, idx)``),
``gate-first`` (dReLU/ReLU-gated layers: ``gate_first(x)``, exact; a prompt's tokens
go through ``prefill`` on ``gate_masks(X)``) and ``sparse``
(each layer as the ``predictors`` pass decided: predictor, gate-first or dense).
A layer the requested mode does not apply to runs dense.

Threads: OpenBLAS's and Numba's OpenMP workers both spin after a parallel call, and two
spinning pools on the same cores slowed decoding 2-5x at two threads, so one pool owns
the cores while an executor runs. A decoder holds BLAS to one thread
(:func:`blas_one_thread`) for every call, its prompt included: BLAS workers left spinning
by a prompt slowed the decode steps after it by a quarter; a long prompt is split into
row ranges run in threads of their own instead (:func:`in_threads`: each with both pools
on one thread; :mod:`.runtime_decoder`). An encoder call of more than
:data:`~Linear.MATVEC_MAX` tokens (a batch: the linears are sgemm) holds the Numba
kernels to one thread instead (:func:`encoder_thread_owner`), or, with enough tokens, is
split into groups of sequences run in threads of their own, each with both pools on one
thread (:mod:`.runtime_encoder`). Each FFN of a call of
several tokens picks the sparse prefill kernel or dense tiles for its mask density, token
count and the two pools' thread counts (``LayerKernels.dense_density``).
"""
from __future__ import annotations

import contextlib
import functools
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

from sparseforge.kernels import ffn as K
from sparseforge.kernels import quant, row_tiles
from sparseforge.kernels.runtime import LayerKernels, Predictor, Scratch

from . import artifact_format as F
from .artifact_reader import Artifact
from .errors import InputError
from .ir import ArchSpec

MODES = ("dense", "sparse", "predictor", "gate-first")
LINEAR_MODES = ("auto", "dequantize", "quantized")
_DUMMY_F = np.zeros((1, 1), np.float32)
_DUMMY_Q = np.zeros((1, 1), np.int8)
_THREADPOOLS: ThreadpoolController | None = None


def _threadpools() -> ThreadpoolController:
    global _THREADPOOLS
    if _THREADPOOLS is None:
        _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS


@contextlib.contextmanager
def blas_one_thread() -> Iterator[None]:
    """Context: BLAS libraries on one thread (restored afterwards; nesting is fine)."""
    with _threadpools().limit(limits=1, user_api="blas"):
        yield


def blas_threads() -> int:
    """The BLAS libraries' thread count now (the largest, if several are loaded)."""
    return max((lib.num_threads for lib in _threadpools().select(user_api="blas").lib_controllers), default=1)


@contextlib.contextmanager
def numba_one_thread() -> Iterator[None]:
    """Context: the Numba kernels on one thread, BLAS as it was (restored afterwards)."""
    prev = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(prev)


_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool of at least ``workers`` threads (kept for the next call)."""
    global _POOL
    if _POOL is None or _POOL[0] < workers:
        if _POOL is not None:
            _POOL[1].shutdown(wait=False)
        _POOL = (workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sparseforge-part"))
    return _POOL[1]


def in_threads(part: Callable[[int], Any], parts: int) -> list[Any]:
    """``[part(0), ..., part(parts - 1)]`` run at once, ``part(0)`` in the calling thread and
    the others in a pool's, each with BLAS and the Numba kernels on one thread (both
    release the GIL): the cores split between parts, no pool of workers left spinning."""
    def one(k: int) -> Any:
        with numba_one_thread():  # Numba's thread count is per thread
            return part(k)

    with blas_one_thread():
        futures = [_pool(parts - 1).submit(one, k) for k in range(1, parts)]
        try:
            first = one(0)
        finally:
            wait(futures)  # no thread runs on past the BLAS limit
    return [first] + [f.result() for f in futures]


def encoder_thread_owner(tokens: int) -> contextlib.AbstractContextManager:
    """The thread context of an encoder call over ``tokens`` tokens: BLAS owns the cores
    above :data:`Linear.MATVEC_MAX` tokens (sgemm work), the Numba kernels otherwise."""
    return numba_one_thread() if tokens > Linear.MATVEC_MAX else blas_one_thread()


SERIAL_BELOW = 1 << 18
"""Matrices smaller than this many bytes are multiplied in the calling thread (a
fork/join of the thread pool costs more than it saves)."""


class Linear:
    """A weight matrix ``W [rows, cols]`` (``y = x W^T``) from the artifact."""

    MATVEC_MAX = 4
    """Quantized weights times at most this many tokens run the Numba kernels whoever owns
    the cores; more tokens, the matrix dequantized and BLAS sgemm, unless the Numba
    kernels own the cores (:meth:`matmul`)."""
    ROW_KERNEL_MAX = 128
    """Tokens up to which a quantized matrix without tiles runs the multi-token row kernel
    (:func:`~sparseforge.kernels.ffn.matmul_q_par`) when the Numba kernels own the cores
    (a float32 matrix too, when Numba has more threads than BLAS; see
    :data:`F32_EQUAL_THREADS_MAX`):
    2048 x 2048 Q8_0 on 2 threads, 5 / 16 / 64 / 256 tokens 0.58 / 1.3 / 4.7 / 18.6 ms
    against 3.2 / 3.5 / 5.6 / 14 ms dequantizing 512-row tiles for sgemm on one BLAS
    thread."""
    F32_EQUAL_THREADS_MAX = 32
    """Tokens up to which a float32 matrix runs the multi-token row kernel when the Numba
    kernels and BLAS have as many threads (a one-thread run; more Numba threads:
    :data:`ROW_KERNEL_MAX`): 22 matrices of 2048 x 2048 from memory, one thread each, 16
    / 32 / 48 / 64 tokens 49.7 / 81.0 / 112.6 / 124.6 ms against sgemm's 70.8 / 88.1 /
    101.0 / 117.2 ms; on two Numba threads against one BLAS thread, 128 / 256 tokens
    121 / 328 ms against 181 / 304 ms."""
    TILE_ROWS = 512
    """Rows dequantized per sgemm in :meth:`matmul` (a 4 MB float32 tile at 2048 columns:
    the whole matrix is never held in float32)."""

    def __init__(self, data: np.ndarray, fmt: str, shape: tuple[int, ...], dequantize: bool) -> None:
        self.fmt = fmt
        self.shape = tuple(shape)
        self.w: np.ndarray | None = None
        self.q: np.ndarray | None = None
        self.code = K.F32  # the kernels' format code of the stored matrix
        self._alone: LinearGroup | None = None  # this matrix as a group of one (matvec)
        self._tiles: np.ndarray | None = None
        self.release_source: Callable[[], None] | None = None  # called once, after the tiles are packed
        if fmt == "f32":
            self.w = np.ascontiguousarray(data).reshape(shape[0], -1)
        elif fmt == "f16" or dequantize:
            self.w = np.ascontiguousarray(data.astype(np.float32) if fmt == "f16" else quant.decode(data, fmt))
        else:
            self.q = np.ascontiguousarray(data).view(np.int8).reshape(shape[0], -1)
            self.code = K.FORMAT_CODES[fmt]

    @property
    def quantized(self) -> bool:
        return self.q is not None

    @property
    def copied(self) -> bool:
        """Whether the weights are a float32 copy (F16 widened, Q8_0/Q4_0 decoded): the
        given data is not read again."""
        return self.fmt != "f32" and self.w is not None

    @property
    def tiled(self) -> bool:
        """Whether matvecs use the 8-row tiled copy (Q4_0 and Q8_0 on the x86 vector paths)."""
        return self.code in row_tiles.TILE_BLOCK_BYTES and row_tiles.SUPPORTED

    def tiles(self) -> np.ndarray:
        """The 8-row tiled copy of a quantized matrix (:func:`~sparseforge.kernels.row_tiles.pack_x8`),
        made on first use: the decode step reads it instead of the mapped ggml rows, which
        ``release_source`` (when set) then lets go of."""
        if self._tiles is None:
            self._tiles = row_tiles.pack_x8(self.q, self.code)
            if self.release_source is not None:
                self.release_source()
        return self._tiles

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``W x`` for ``x [cols]`` (the Numba dense matvec kernel, on the kernels' threads)."""
        out = np.empty(self.shape[0], np.float32)
        self.matvec_into(x, out)
        return out

    def matvec_into(self, x: np.ndarray, out: np.ndarray) -> None:
        """``out [rows] = W x`` (:meth:`matvec` into a caller's buffer)."""
        if self._alone is None:
            self._alone = LinearGroup([self])
        self._alone.matvec_into(x, out)

    def matmul(self, X: np.ndarray) -> np.ndarray:
        """``X W^T`` for ``X [T, cols]``. When the Numba kernels own the cores (a decoder's
        prompt), float32 weights run the multi-token row kernel
        (:func:`~sparseforge.kernels.ffn.matmul_f32_par`) up to :data:`ROW_KERNEL_MAX`
        tokens, or :data:`F32_EQUAL_THREADS_MAX` when BLAS has as many threads (a
        TinyLlama-shaped f32 prompt of 16 tokens on 2 threads: 291 -> 196 ms, its
        projections 150 -> 54 ms against sgemm on one BLAS thread); quantized weights
        the multi-token row kernel up to :data:`ROW_KERNEL_MAX` tokens
        (:func:`~sparseforge.kernels.ffn.matmul_q_par`), or, when tiled, the 8-row tiles'
        multi-token kernel at any count (a TinyLlama-shaped Q4_0 prompt of 16 / 256
        tokens: 332 -> 165 / 2500 -> 1960 ms against sgemm on one BLAS thread; Q8_0, 16 /
        64 tokens: 106 -> 134 / 120 -> 173 tokens/s against the row kernel).
        Otherwise quantized weights take the row kernel up to :data:`MATVEC_MAX` tokens.
        Beyond: sgemm, on the matrix dequantized ``TILE_ROWS`` rows at a time when
        quantized."""
        nt, bt = numba.get_num_threads(), blas_threads()
        numba_owns = nt >= bt
        if self.w is not None:
            if numba_owns and X.shape[0] <= (self.ROW_KERNEL_MAX if nt > bt else self.F32_EQUAL_THREADS_MAX):
                out = np.empty((X.shape[0], self.shape[0]), np.float32)
                K.matmul_f32_par(np.ascontiguousarray(X, np.float32), self.w, K.default_chunks(), out)
                return out
            return X @ self.w.T
        X = np.ascontiguousarray(X, np.float32)
        out = np.empty((X.shape[0], self.shape[0]), np.float32)
        if self.tiled and numba_owns:
            row_tiles.matmul_x8_par(X, self.tiles(), self.shape[0], self.code, K.default_chunks(), out)
            return out
        if X.shape[0] <= (self.ROW_KERNEL_MAX if numba_owns else self.MATVEC_MAX):
            K.matmul_q_par(X, self.q, self.code, quant.F16_TO_F32, K.default_chunks(), out)
            return out
        rows, cols = self.shape
        buf = np.empty((min(self.TILE_ROWS, rows), cols), np.float32)
        for lo in range(0, rows, self.TILE_ROWS):
            w = buf[:min(rows, lo + self.TILE_ROWS) - lo]
            K.dequantize_rows(_DUMMY_F, self.q, lo, lo + w.shape[0], self.code, cols, 0, quant.F16_TO_F32, w)
            out[:, lo:lo + w.shape[0]] = X @ w.T
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``W[rows]`` as float32 (embedding lookup)."""
        if self.w is not None:
            return np.asarray(self.w[rows], np.float32)
        return quant.decode(self.q[rows].view(np.uint8), self.fmt)

    @property
    def nbytes(self) -> int:
        return int((self.w if self.w is not None else self.q).nbytes)


class LinearGroup:
    """Matrices with one input, multiplied by one vector in one kernel call (a decode
    step's q, k and v projections): ``matvec(x [cols])`` -> ``[W_0 x, W_1 x, ...]``."""

    def __init__(self, linears: list[Linear]) -> None:
        if not self.compatible(linears):
            raise ValueError("a LinearGroup needs matrices of one storage kind and input width")
        n = len(linears)
        serial = sum(lin.nbytes for lin in linears) < SERIAL_BELOW
        self._tiles: tuple[np.ndarray, ...] | None = None
        self._code = linears[0].code
        if linears[0].tiled:
            self._tiles = tuple(lin.tiles() for lin in linears)
            self._tile_rows = np.array([lin.shape[0] for lin in linears], np.int64)
            self._kernel = row_tiles.matvec_x8_ser if serial else row_tiles.matvec_x8_par
        else:
            if linears[0].w is not None:
                self._wfs, self._wqs = tuple(lin.w for lin in linears), (_DUMMY_Q,) * n
            else:
                self._wfs, self._wqs = (_DUMMY_F,) * n, tuple(lin.q for lin in linears)
            self._kernel = K.matvec_ser if serial else K.matvec_par
        ends = np.cumsum([lin.shape[0] for lin in linears]).tolist()
        self._bounds = list(zip([0] + ends[:-1], ends))  # each matrix's rows in the output
        self._rows = ends[-1]

    @staticmethod
    def compatible(linears: list[Linear]) -> bool:
        a = linears[0]
        return all(lin.shape[1] == a.shape[1] and lin.code == a.code and (lin.w is None) == (a.w is None)
                   for lin in linears)

    def matvec_into(self, x: np.ndarray, out: np.ndarray) -> None:
        """``out [sum of rows] = [W_0 x, W_1 x, ...]`` (the Numba dense matvec kernel)."""
        if self._tiles is not None:
            self._kernel(np.ascontiguousarray(x, np.float32), self._tiles, self._tile_rows, self._code, K.default_chunks(),
                         out)
            return
        self._kernel(np.ascontiguousarray(x, np.float32), self._wfs, self._wqs, self._code, quant.F16_TO_F32,
                     K.default_chunks(), out)

    def matvec(self, x: np.ndarray) -> list[np.ndarray]:
        out = np.empty(self._rows, np.float32)
        self.matvec_into(x, out)
        return [out[a:b] for a, b in self._bounds]


def artifact_file(path: str | Path) -> Path:
    """The GGUF artifact ``path`` names: the file itself, or ``model.gguf`` in a ``convert``
    output directory (InputError when there is none)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "artifact not found")
    if path.is_dir():
        if not (path / "model.gguf").is_file():
            raise InputError(path, "a directory without model.gguf (give the artifact file)")
        path = path / "model.gguf"
    return path


@dataclass
class LoadedModel:
    """An opened artifact, ready for the executors."""

    artifact: Artifact
    spec: ArchSpec
    linear_mode: str
    blocks: list[dict[str, Any]]
    kernels: list[LayerKernels]
    predictors: list[Predictor | None]
    predictor_modes: list[str]
    _linears: dict[str, Linear] = field(default_factory=dict)
    _groups: dict[tuple[str, ...], LinearGroup | None] = field(default_factory=dict)
    _vectors: dict[str, np.ndarray] = field(default_factory=dict)
    _tokenizer: Any = None

    @classmethod
    def open(cls, path: str | Path, *, linear: str = "auto", verify_checksums: bool = True,
             nchunks: int | None = None) -> "LoadedModel":
        if linear not in LINEAR_MODES:
            raise InputError(None, f"linear mode {linear!r}: expected one of {', '.join(LINEAR_MODES)}")
        art = Artifact.open(artifact_file(path), verify_checksums=verify_checksums)
        spec = art.spec
        if linear == "auto":
            linear = "quantized" if spec.causal else "dequantize"
        blocks = art.metadata[F.K_BLOCKS]
        modes = list(art.metadata[F.K_PREDICTOR_MODES])
        thresholds = list(art.metadata[F.K_PREDICTOR_THRESHOLDS])
        kernels, predictors = [], []
        for layer, (doc, layout) in enumerate(zip(blocks, art.layouts)):
            bias = {p: (art.weight(doc[f"{p}_bias"]) if doc.get(f"{p}_bias") else None) for p in ("gate", "up", "down")}
            gate = art.ffn_gate(layer)
            kern = LayerKernels(
                art.bundles(layer), layout, activation=doc["activation"], up_activation=doc.get("up_activation"),
                activation_threshold=float(doc.get("activation_threshold") or 0.0),
                output_threshold=float(doc.get("output_threshold") or 0.0), gate_bias=bias["gate"],
                up_bias=bias["up"], down_bias=bias["down"], nchunks=nchunks, gate=gate,
                keep_float32=linear == "dequantize")
            if gate is not None:  # the dense gate pass: a Linear's matvec (f16 gates as the kernels widened them)
                data, fmt = (kern.gf, "f32") if kern.fmt == K.F32 else (gate, layout.fmt)
                kern.gate_matvec = Linear(data, fmt, (layout.n_neurons, layout.d_model), dequantize=False).matvec
            kernels.append(kern)
            if modes[layer] == "predictor":
                w = {k: art.weight(F.predictor_name(layer, k)) for k in ("w1", "w2", "b1", "b2")
                     if art.has(F.predictor_name(layer, k))}
                pred = Predictor(w["w1"], w["w2"], float(thresholds[layer]), w.get("b1"), w.get("b2"))
                if pred.fmt == "q8_0":  # it kept only its Q8_0 rows
                    for k in ("w1", "w2"):
                        art.release(F.predictor_name(layer, k))
                predictors.append(pred)
            else:
                predictors.append(None)
        return cls(art, spec, linear, blocks, kernels, predictors, modes)

    # -- weights ---------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return self.artifact.has(name)

    def linear(self, name: str) -> Linear:
        lin = self._linears.get(name)
        if lin is None:
            info = self.artifact.info(name)
            lin = Linear(self.artifact.tensor(name), self.artifact.format_of(name), info.shape,
                         dequantize=self.linear_mode == "dequantize")
            if lin.copied:  # the mapped bytes are not read again
                self.artifact.release(name)
            else:
                lin.release_source = functools.partial(self.artifact.release, name)
            self._linears[name] = lin
        return lin

    def linear_group(self, names: tuple[str, ...]) -> LinearGroup | None:
        """The :class:`LinearGroup` of the weights ``names`` (None when they cannot share a
        kernel call)."""
        if names not in self._groups:
            linears = [self.linear(n) for n in names]
            self._groups[names] = LinearGroup(linears) if LinearGroup.compatible(linears) else None
        return self._groups[names]

    def vector(self, name: str) -> np.ndarray:
        v = self._vectors.get(name)
        if v is None:
            v = np.ascontiguousarray(self.artifact.weight(name), np.float32)
            self._vectors[name] = v
        return v

    def warm(self) -> None:
        """Load every weight now (dequantizing where the mode says) rather than on first use."""
        for name in self.artifact.tensor_names:
            if name.startswith("blk."):
                continue
            if len(self.artifact.info(name).shape) == 2:
                self.linear(name)
            else:
                self.vector(name)

    # -- tokenizer -------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` carried in the artifact (None when it has none)."""
        if self._tokenizer is None and self.artifact.tokenizer_json:
            from tokenizers import Tokenizer

            try:
                self._tokenizer = Tokenizer.from_str(self.artifact.tokenizer_json)
            except Exception as exc:  # the Rust library raises a plain Exception
                raise InputError(self.artifact.path, f"the tokenizer.json it carries does not parse: {exc}") from None
        return self._tokenizer

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise InputError(self.artifact.path, "the artifact carries no tokenizer.json; pass token ids instead")
        return self.tokenizer

    def close(self) -> None:
        self.artifact.close()


def layer_modes(model: LoadedModel, mode: str) -> list[str]:
    """The mode each layer runs in for the requested ``mode`` (see the module docstring)."""
    if mode not in MODES:
        raise InputError(None, f"mode {mode!r}: expected one of {', '.join(MODES)}")
    out = []
    for kern, pred, chosen in zip(model.kernels, model.predictors, model.predictor_modes):
        can_gate = kern.gated and kern.act in (K.RELU, K.FATRELU)
        if mode == "dense":
            out.append("dense")
        elif mode == "predictor":
            out.append("predictor" if pred is not None else "dense")
        elif mode == "gate-first":
            out.append("gate-first" if can_gate else "dense")
        else:  # sparse: the predictors pass's choice
            if chosen == "predictor" and pred is not None:
                out.append("predictor")
            elif chosen == "gate-first" and can_gate:
                out.append("gate-first")
            else:
                out.append("dense")
    return out


class FFNRunner:
    """Runs the FFN layers of a :class:`LoadedModel` in one mode and counts the neurons
    it computes (``density()``) and the seconds spent in predictors."""

    def __init__(self, model: LoadedModel, mode: str = "sparse") -> None:
        self.model = model
        self.mode = mode
        self.modes = layer_modes(model, mode)
        self.scratch = Scratch()  # the predictors' decoded weights during a prefill
        self._parts: list[FFNRunner] = []  # one per part of a call split across threads
        self.reset_stats()

    def reset_stats(self) -> None:
        n = len(self.modes)
        self.tokens = np.zeros(n, np.int64)
        self.neurons = np.zeros(n, np.int64)
        self.predictor_s = 0.0

    def parts(self, n: int) -> list["FFNRunner"]:
        """``n`` runners of the same model and mode, one per part of a call split across
        threads (:func:`in_threads`), with counters of their own: :meth:`merge_parts`
        adds them to this one's. Kept for the next call."""
        while len(self._parts) < n:
            self._parts.append(FFNRunner(self.model, self.mode))
        return self._parts[:n]

    def merge_parts(self) -> None:
        """Add the part runners' counters to this one's, and zero theirs."""
        for part in self._parts:
            self.tokens += part.tokens
            self.neurons += part.neurons
            self.predictor_s += part.predictor_s
            part.reset_stats()

    def density(self) -> list[float]:
        """Per layer: neurons computed / (tokens x n_ff) since the last reset."""
        n = self.model.spec.intermediate_size
        return [float(c / (t * n)) if t else float("nan") for c, t in zip(self.neurons, self.tokens)]

    def one(self, layer: int, x: np.ndarray) -> np.ndarray:
        """One token ``x [d]`` -> ``y [d]``."""
        kern, mode = self.model.kernels[layer], self.modes[layer]
        self.tokens[layer] += 1
        if mode == "predictor":
            t0 = time.perf_counter()
            idx = self.model.predictors[layer].select(x)
            self.predictor_s += time.perf_counter() - t0
            self.neurons[layer] += idx.size
            return kern.forward(x, idx)
        if mode == "gate-first":
            y, idx = kern.gate_first(x, return_idx=True)
            self.neurons[layer] += idx.size
            return y
        self.neurons[layer] += kern.n
        return kern.forward(x)

    def many(self, layer: int, X: np.ndarray) -> np.ndarray:
        """Tokens ``X [T, d]`` -> ``Y [T, d]`` (``LayerKernels.prefill``; predictor layers
        pass the per-token predicted masks, gate-first layers their gates' positives:
        ``LayerKernels.gate_masks``)."""
        X = np.ascontiguousarray(X, np.float32)
        T = X.shape[0]
        if T == 0:
            return np.zeros_like(X)
        if T == 1:
            return self.one(layer, X[0])[None]
        kern, mode = self.model.kernels[layer], self.modes[layer]
        self.tokens[layer] += T
        if mode == "predictor":
            t0 = time.perf_counter()
            masks = predict_masks(self.model.predictors[layer], X, self.scratch)
            self.predictor_s += time.perf_counter() - t0
            self.neurons[layer] += int(masks.sum())
        elif mode == "gate-first":  # the gates densely, then the sparse kernel (or dense tiles) on their masks
            masks = kern.gate_masks(X)
            self.neurons[layer] += int(masks.sum())
        else:
            masks = None
            self.neurons[layer] += T * kern.n
        return kern.prefill(X, masks, threads=(numba.get_num_threads(), blas_threads()))


def predict_masks(pred: Predictor, X: np.ndarray, scratch: Scratch | None = None) -> np.ndarray:
    """``[T, n]`` bool: the predictor's selection (``logit >= threshold``) for each token
    (``scratch``: :meth:`Predictor.logits_batch`'s buffers)."""
    return pred.logits_batch(X, scratch) >= np.float32(pred.threshold)
