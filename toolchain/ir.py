"""The model IR every pass reads and returns.

``ModelIR`` = an :class:`ArchSpec` (what the network is), a lazy :class:`TensorStore`
(its weights, canonical Hugging Face names and layouts), one :class:`FFNBlock` per
transformer layer (which tensors form the FFN; passes annotate it), and provenance
(source, tokenizer, ONNX graph, pass log, attached files).

Canonical layouts: FFN ``gate``/``up`` weights are ``[n_ff, d_model]`` (rows are
neurons), ``down`` is ``[d_model, n_ff]`` (columns are neurons), as in ``nn.Linear``.

On disk an IR is a directory: ``manifest.json`` (everything but tensor bytes),
``tensors.safetensors`` (tensors passes created and held in memory; unchanged tensors stay
references to the source files), ``tensor-files/`` (files of tensors passes wrote
themselves, layer by layer: hard links), ``tokenizer.json`` when the model has one, and
``files/`` for attachments (reports, sample shards). The manifest records the sha256 of
every file the IR reads (its own and those it references outside the directory: the
source checkpoint, the ONNX graph), and loading checks them, so a flipped byte or a
source model changed since is an error rather than a silently different model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_dir
from .errors import InputError, describe
from .fingerprint import file_digest
from .safetensors_io import write_safetensors
from .tensors import TensorRef, TensorStore, open_tensor_file

IR_FORMAT_VERSION = 1
#: prefix of tensors passes add (statistics, thresholds, predictors); the rest are weights
ANNOTATION_PREFIX = "sparseforge."
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
TENSOR_FILES = "tensor-files"


@dataclass
class ArchSpec:
    """Architecture of a transformer; dims are element counts.

    ``activation`` is the FFN activation (``gelu``, ``gelu_tanh``, ``silu``, ``relu``);
    ``gated`` FFNs compute ``act(x Wg^T) * (x Wu^T)``; ``norm`` is ``layernorm`` or
    ``rmsnorm``. Decoder-only fields (rope) are None for encoders. ``rope_scaling`` is
    None (unscaled RoPE) or ``{"type": "linear" | "llama3" | "longrope" | "yarn", ...}``
    with the values of :data:`~.reference.rope.ROPE_SCALING_KEYS`. ``qk_norm``: each
    head's query and key are RMS-normalised (weights ``self_attn.q_norm`` / ``k_norm``,
    ``[head_dim]``) before RoPE (Qwen3). ``sliding_window``: None (every earlier position)
    or ``W``: a query at position ``i`` attends the keys at positions ``i - W < j <= i``
    (Mistral v0.1).
    ``rotary_dim``: None (RoPE over the whole head) or the even number of leading
    dimensions of each head RoPE rotates, the rest passing unchanged (Phi-4-mini).
    Granite's scalars: the token embeddings are multiplied by ``embedding_multiplier``,
    each attention and FFN output by ``residual_multiplier`` before its residual add, the
    attention scores by ``attention_multiplier`` (None: ``head_dim ** -0.5``), and the
    logits divided by ``logits_scaling``. Gemma 3's: every RMSNorm multiplies by
    ``norm_offset + weight``; ``sandwich_norms``: the attention and FFN outputs are
    RMS-normalised (``post_attention_layernorm``, ``post_feedforward_layernorm``) before
    their residual adds, and the FFN's input norm is ``pre_feedforward_layernorm``;
    ``layer_types`` (None: every layer alike) names each layer ``sliding_attention`` (its
    attention within ``sliding_window``: :meth:`window`) or ``full_attention``;
    ``local_rope_theta``: the sliding layers' unscaled RoPE base (None: the model's RoPE).
    Gemma 2's soft-capping: the scaled attention scores become ``c tanh(s / c)`` with ``c
    = attn_logit_softcapping``, the logits likewise with ``final_logit_softcapping`` (None:
    not capped).
    These fields from ``rope_scaling`` on are left out of :meth:`to_dict` at their defaults
    (:data:`LATER_FIELDS`), so other models keep the manifests and artifacts they had
    before these fields existed.
    """

    family: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    activation: str
    gated: bool
    norm: str
    norm_eps: float
    causal: bool
    rope_theta: float | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    type_vocab_size: int = 0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    rope_scaling: dict[str, Any] | None = None
    qk_norm: bool = False
    sliding_window: int | None = None
    rotary_dim: int | None = None
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    layer_types: list[str] | None = None
    local_rope_theta: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer``'s attention (None: every earlier position)."""
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def attention_scale(self) -> float:
        """The factor of the attention scores ``q . k``."""
        return self.attention_multiplier if self.attention_multiplier is not None else self.head_dim ** -0.5

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name, default in LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchSpec":
        """The spec of a manifest's or an artifact's ``d``; a ValueError names a field whose
        value is not of its type (a ``"big"`` hidden size would fail far from here) or what is
        wrong with ``rope_scaling`` or ``sliding_window``."""
        kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
        fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for k, v in d.items():
            kind = fields.get(k, "").removesuffix(" | None")
            if v is None and fields.get(k, "").endswith("| None"):
                continue
            if kind in kinds and (not isinstance(v, kinds[kind]) or (kind != "bool" and isinstance(v, bool))):
                raise ValueError(f"spec field {k!r} = {json.dumps(v)} is not of type {kind}")
        if d.get("rope_scaling") is not None:
            from .reference.rope import check_rope_scaling

            check_rope_scaling(d["rope_scaling"], d.get("rotary_dim") or d.get("head_dim"))
        if d.get("sliding_window") is not None and d["sliding_window"] < 1:
            raise ValueError(f"sliding_window {d['sliding_window']} is not a positive number of positions")
        for k in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
                  "attn_logit_softcapping", "final_logit_softcapping"):
            if d.get(k) is not None and not (math.isfinite(d[k]) and d[k] > 0):
                raise ValueError(f"{k} {d[k]} is not a positive number")
        types = d.get("layer_types")
        if types is not None and (not isinstance(types, list) or len(types) != d.get("num_layers")
                                  or not set(types) <= {"sliding_attention", "full_attention"}
                                  or d.get("sliding_window") is None):
            raise ValueError(f"layer_types {json.dumps(types)} is not one 'sliding_attention' or 'full_attention' per "
                             "layer with a sliding_window")
        rot = d.get("rotary_dim")
        if rot is not None and not (rot % 2 == 0 and 2 <= rot < d.get("head_dim", 0)):
            raise ValueError(f"rotary_dim {rot} is not an even number of dimensions below head_dim "
                             f"{d.get('head_dim')}")
        return cls(**{k: v for k, v in d.items() if k in fields})


LATER_FIELDS = {"rope_scaling": None, "qk_norm": False, "sliding_window": None, "rotary_dim": None,
                "embedding_multiplier": 1.0, "residual_multiplier": 1.0, "attention_multiplier": None,
                "logits_scaling": 1.0, "norm_offset": 0.0, "sandwich_norms": False, "layer_types": None,
                "local_rope_theta": None, "attn_logit_softcapping": None, "final_logit_softcapping": None}
"""``ArchSpec`` fields added after artifacts existed, with the defaults at which
:meth:`ArchSpec.to_dict` leaves them out."""


@dataclass
class FFNBlock:
    """One feed-forward block: ``down(h)`` with ``h = act(gate(x)) * up_act(up(x))`` when
    gated, else ``h = act(up(x))``; then ``h`` is zeroed where ``|h| <= output_threshold``.

    ``activation``: ``gelu``, ``gelu_tanh``, ``silu``, ``relu`` or ``fatrelu``
    (``z if z > activation_threshold else 0``). ``up_activation``: None (identity) or
    ``relu`` (dReLU: ReLU on both gate and up). ``output_threshold`` > 0 keeps only
    activations of larger magnitude (training-free threshold sparsity); 0 keeps all.

    Tensor fields hold names in the IR's tensor store (None when absent).
    ``input_value`` / ``activation_value`` name the ONNX graph values of the FFN input
    (hidden state after the norm, ``[batch, seq, d_model]``) and of the activation
    feeding the down projection (``[batch, seq, n_ff]``) when the IR has a graph.
    ``annotations`` is where passes record what they learn (JSON-serialisable; arrays
    go in the tensor store under ``sparseforge.*`` names and are referenced here).
    """

    layer: int
    up: str
    down: str
    gate: str | None = None
    up_bias: str | None = None
    down_bias: str | None = None
    gate_bias: str | None = None
    activation: str = "gelu"
    activation_threshold: float = 0.0
    up_activation: str | None = None
    output_threshold: float = 0.0
    input_value: str | None = None
    activation_value: str | None = None
    annotations: dict[str, Any] = field(default_factory=dict)

    def weight_names(self) -> list[str]:
        names = [self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias]
        return [n for n in names if n]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FFNBlock":
        return cls(**d)


@dataclass
class ModelIR:
    """A model between passes. Copy with :meth:`evolve` rather than mutating a shared one.

    ``graph`` is an ONNX file that computes exactly this IR (the ONNX source, or None);
    a pass that changes what the model computes must rewrite or clear it.
    ``files`` maps attachment keys (``profile/profile.json``) to file paths.
    """

    spec: ArchSpec
    store: TensorStore
    blocks: list[FFNBlock]
    source: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    graph: str | None = None
    pass_log: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def drop_outputs(self, *, tensors: str, files: str, annotation: str) -> None:
        """Remove what a pass attached: tensors ``sparseforge.<tensors>.*``, files under
        ``<files>/`` and every block's ``annotations[annotation]``."""
        for name in [n for n in self.store.names() if n.startswith(f"{ANNOTATION_PREFIX}{tensors}.")]:
            self.store.delete(name)
        for key in [k for k in self.files if k.startswith(f"{files}/")]:
            del self.files[key]
        for b in self.blocks:
            b.annotations.pop(annotation, None)

    def evolve(self) -> "ModelIR":
        """A copy a pass may change freely (tensor bytes are shared, not copied)."""
        return ModelIR(
            spec=ArchSpec.from_dict(self.spec.to_dict()),
            store=self.store.copy(),
            blocks=[FFNBlock.from_dict(json.loads(json.dumps(b.to_dict()))) for b in self.blocks],
            source=json.loads(json.dumps(self.source)),
            tokenizer=self.tokenizer,
            graph=self.graph,
            pass_log=json.loads(json.dumps(self.pass_log)),
            files=dict(self.files),
        )

    @property
    def family(self) -> str:
        return self.spec.family

    # -- identity --------------------------------------------------------------------
    def content_hash(self) -> str:
        """sha256 over everything that defines this IR: spec, blocks, provenance and
        tensor contents (files by content digest, overlays by their bytes)."""
        tensors: dict[str, Any] = {}
        for name in self.store.names():
            ref = self.store.ref(name)
            if ref is None:
                tensors[name] = self.store.overlay_digest(name)
            else:
                tensors[name] = self.store.ref_digest(name)
        doc = {
            "spec": self.spec.to_dict(),
            "blocks": [b.to_dict() for b in self.blocks],
            "tensors": tensors,
            "tokenizer": file_digest(self.tokenizer) if self.tokenizer else None,
            "graph": file_digest(self.graph) if self.graph else None,
            "files": {k: file_digest(v) for k, v in sorted(self.files.items())},
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    # -- persistence -----------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write the IR to ``directory`` atomically; overlays move to ``tensors.safetensors``
        and this IR then references them there (freeing the memory)."""
        directory = Path(directory).resolve()
        with atomic_dir(directory) as tmp:
            overlay = {name: self.store.get(name) for name in self.store.overlay_names()}
            if overlay:
                write_safetensors(tmp / TENSORS, overlay)
            owned: dict[str, str] = {}  # owned tensor file -> its path relative to the directory
            for i, src in enumerate(self.store.owned_files()):
                rel = f"{TENSOR_FILES}/{i:05d}-{Path(src).name}"
                (tmp / TENSOR_FILES).mkdir(exist_ok=True)
                _link_or_copy(Path(src), tmp / rel)
                owned[src] = rel
            refs: dict[str, Any] = {}
            for name in self.store.names():
                ref = self.store.ref(name)
                if ref is None:
                    refs[name] = {"file": TENSORS, "key": name, "format": "safetensors"}
                elif ref.file in owned:
                    refs[name] = {**ref.to_dict(), "file": owned[ref.file]}
                else:
                    refs[name] = ref.to_dict()
            tokenizer = None
            if self.tokenizer:
                shutil.copyfile(self.tokenizer, tmp / "tokenizer.json")
                tokenizer = "tokenizer.json"
            files = {}
            if self.files:
                (tmp / "files").mkdir()
                for key, src in sorted(self.files.items()):
                    dst = tmp / "files" / key
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(Path(src), dst)
                    files[key] = f"files/{key}"
            manifest = {
                "format": "sparseforge-ir",
                "version": IR_FORMAT_VERSION,
                "spec": self.spec.to_dict(),
                "blocks": [b.to_dict() for b in self.blocks],
                "source": self.source,
                "tokenizer": tokenizer,
                "graph": self.graph,
                "pass_log": self.pass_log,
                "files": files,
                "tensors": refs,
                "checksums": _checksums(tmp, refs, tokenizer, files, self.graph),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        for name in list(overlay):
            self.store.set_ref(name, TensorRef(str(directory / TENSORS), name))
        self.store.relocate({src: str(directory / rel) for src, rel in owned.items()})
        if tokenizer:
            self.tokenizer = str(directory / tokenizer)
        self.files = {k: str(directory / v) for k, v in files.items()}

    @classmethod
    def load(cls, directory: str | Path, verify: bool = True) -> "ModelIR":
        """Read an IR directory written by :meth:`save`; checks that referenced files exist
        and, with ``verify``, that their sha256 digests match the manifest's (files are
        hashed once per process and version: :func:`~.fingerprint.file_digest`)."""
        directory = Path(directory).resolve()
        path = directory / MANIFEST
        if not path.is_file():
            raise InputError(directory, f"not a sparseforge IR directory (no {MANIFEST})")
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(m, dict) or m.get("format") != "sparseforge-ir":
                raise InputError(path, "not a sparseforge IR manifest")
            if m.get("version") != IR_FORMAT_VERSION:
                raise InputError(path, f"IR format version {m.get('version')} is not supported "
                                 f"(this sparseforge reads version {IR_FORMAT_VERSION})")
            refs = {}
            for name, d in m["tensors"].items():
                f = Path(d["file"])
                ref = TensorRef.from_dict({**d, "file": str(f if f.is_absolute() else directory / f)})
                refs[name] = ref
            ir = cls(
                spec=ArchSpec.from_dict(m["spec"]),
                store=TensorStore(refs),
                blocks=[FFNBlock.from_dict(b) for b in m["blocks"]],
                source=m.get("source", {}),
                tokenizer=str(directory / m["tokenizer"]) if m.get("tokenizer") else None,
                graph=m.get("graph"),
                pass_log=m.get("pass_log", []),
                files={k: str(directory / v) for k, v in m.get("files", {}).items()},
            )
        except InputError:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(path, f"corrupt IR manifest: {describe(exc)}") from None
        for b in ir.blocks:
            unknown = [n for n in b.weight_names() if n not in refs]
            if unknown:
                raise InputError(path, f"the FFN block of layer {b.layer} names the tensor {unknown[0]!r}, which "
                                       "the manifest does not list")
        for ref in {r.file for r in refs.values()}:
            if not Path(ref).is_file():
                raise InputError(path, f"the IR references {ref}, which does not exist")
        if verify:
            checksums = m.get("checksums")
            unlisted = [p for p in _read_paths(directory, m["tensors"], m.get("tokenizer"), m.get("files") or {},
                                               m.get("graph"))
                        if p not in (checksums if isinstance(checksums, dict) else {})]
            if unlisted:
                raise InputError(path, f"the manifest has no checksum for {unlisted[0]}, which the IR reads "
                                       "(an edited manifest?)")
            _verify_checksums(directory, checksums)
        return ir


def _checksums(directory: Path, refs: dict[str, dict], tokenizer: str | None, files: dict[str, str],
               graph: str | None) -> dict[str, str]:
    """sha256 of every file an IR saved in ``directory`` reads, keyed by its path as the
    manifest writes it (relative inside the directory, absolute outside)."""
    return {p: file_digest(directory / p) for p in _read_paths(directory, refs, tokenizer, files, graph)}


def _read_paths(directory: Path, refs: dict[str, dict], tokenizer: str | None, files: dict[str, str],
                graph: str | None) -> list[str]:
    """The paths, as the manifest writes them, of the files an IR in ``directory`` reads."""
    paths: set[str] = set(files.values())
    if tokenizer:
        paths.add(tokenizer)
    if graph:
        paths.add(graph)
    for file, fmt in sorted({(d["file"], d["format"]) for d in refs.values()}):
        for f in open_tensor_file(directory / file, fmt).data_files():  # an absolute file stays as it is
            f = Path(f)
            paths.add(f.relative_to(directory).as_posix() if f.is_relative_to(directory) else str(f))
    return sorted(paths)


def _verify_checksums(directory: Path, checksums: dict[str, str]) -> None:
    """InputError naming the first file whose digest differs from the manifest's."""
    for rel, digest in sorted(checksums.items()):
        f = directory / rel
        if not f.is_file():
            raise InputError(f, f"missing: the IR in {directory} reads it")
        if file_digest(f) != digest:
            raise InputError(f, f"changed since the IR in {directory} was written (sha256 differs from "
                                f"the manifest's): a corrupt or replaced file")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (attached files can be large), copying across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
