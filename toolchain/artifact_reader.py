"""The validating reader of sparseforge GGUF artifacts.

``Artifact.open(path)`` memory-maps the file and checks all of it before returning
(``toolchain.artifact_validate``): any corruption, truncation, missing key, wrong
version or inconsistency raises :class:`~sparseforge.toolchain.errors.InputError`.
Tensors are then read-only views into the map (no copy).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparseforge.kernels import quant
from sparseforge.kernels.bundle import BundleLayout

from . import artifact_format as F
from . import artifact_validate as V
from .artifact_gguf import GGUFFile, TensorInfo, open_gguf
from .ir import ArchSpec


@dataclass
class Artifact:
    path: Path
    gguf: GGUFFile
    metadata: dict[str, Any]
    spec: ArchSpec
    layouts: list[BundleLayout]
    table: list[dict[str, Any]]
    data_start: int
    _by_name: dict[str, TensorInfo] = field(init=False, repr=False)  # the tensor table by name

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.gguf.tensors}

    @classmethod
    def open(cls, path: str | Path, *, verify_checksums: bool = True) -> "Artifact":
        g = open_gguf(path)
        V.check_identity(g)
        meta = V.safely(g, V.decode_metadata)
        table = meta[F.K_TENSORS]
        data_start = V.safely(g, V.check_table, table)
        spec, layouts = V.safely(g, V.check_spec, meta)
        if verify_checksums:
            V.check_checksums(g, table, data_start)
        return cls(Path(path), g, meta, spec, layouts, table, data_start)

    # -- tensors -----------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return list(self._by_name)

    def has(self, name: str) -> bool:
        return name in self._by_name

    def info(self, name: str) -> TensorInfo:
        t = self._by_name.get(name)
        if t is None:
            raise KeyError(f"tensor {name!r} is not in {self.path}")
        return t

    def tensor(self, name: str) -> np.ndarray:
        """F32/F16 tensors as typed arrays; Q8_0/Q4_0 as their bytes ``uint8[rows, row
        bytes]``; bundles as ``uint8[n, stride]``."""
        t = self.info(name)
        return V.as_array(self.gguf, self.data_start, name, t.ggml_type, t.shape,
                          F.tensor_nbytes(t.ggml_type, t.shape), t.offset)

    def release(self, name: str) -> None:
        """Let the mapped pages of tensor ``name`` leave the resident set (a caller that
        keeps a copy of its own, e.g. the runtime's 8-row tiles or decoded weights, no
        longer reads them; a later read faults them in again from the page cache)."""
        t = self.info(name)
        self.gguf.release(self.data_start + t.offset, F.tensor_nbytes(t.ggml_type, t.shape))

    def format_of(self, name: str) -> str:
        return F.FORMAT_OF_TYPE.get(self.info(name).ggml_type, "blob")

    def weight(self, name: str) -> np.ndarray:
        """A weight tensor decoded to float32 (what the runtime computes with): an F32
        tensor is the read-only view of the file itself (no copy), others are decoded."""
        fmt = self.format_of(name)
        data = self.tensor(name)
        return data.astype(np.float32, copy=False) if fmt in ("f32", "f16") else quant.decode(data, fmt)

    def bundles(self, layer: int) -> np.ndarray:
        return self.tensor(F.bundle_name(layer))

    def ffn_gate(self, layer: int) -> np.ndarray | None:
        """A ``gate_apart`` layer's gate matrix as :meth:`tensor` gives it (None otherwise)."""
        return self.tensor(F.gate_name(layer)) if self.layouts[layer].gate_apart else None

    def neuron_order(self, layer: int) -> np.ndarray:
        """Original index of each stored neuron (position i holds neuron ``order[i]``)."""
        return np.asarray(self.metadata[F.neuron_order_key(layer)], dtype=np.int64)

    @property
    def tokenizer_json(self) -> str | None:
        return self.metadata.get(F.K_TOKENIZER)

    def close(self) -> None:
        self.gguf.close()
