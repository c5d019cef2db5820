"""On-disk shards of (FFN input, activation mask) pairs for predictor training.

One safetensors file per layer and shard, ``layer{L:03d}-{k:04d}.safetensors``, with
``x`` [s, d] float32 (the FFN input of the sampled token), ``mask`` [s, ceil(n_ff/8)]
uint8 (``np.packbits(|a| > eps, axis=1, bitorder="little")``) and ``token`` [s] int64
(the token's index among the calibration split's real tokens, row-major).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .safetensors_io import SafetensorsFile, write_safetensors


class SampleShardWriter:
    """Buffers samples per layer and writes a shard every ``shard_size`` rows."""

    def __init__(self, directory: Path, shard_size: int) -> None:
        self.directory = directory
        self.shard_size = shard_size
        self._buf: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self._rows: dict[int, int] = {}
        self.files: dict[int, list[Path]] = {}

    def add(self, layer: int, x: np.ndarray, active: np.ndarray, token: np.ndarray) -> None:
        """Add rows: ``x`` [s, d], ``active`` [s, n_ff] bool, ``token`` [s]."""
        if len(token) == 0:
            return
        packed = np.packbits(active, axis=1, bitorder="little")
        self._buf.setdefault(layer, []).append((x.astype(np.float32), packed, token.astype(np.int64)))
        self._rows[layer] = self._rows.get(layer, 0) + len(token)
        while self._rows[layer] >= self.shard_size:
            self._flush(layer, self.shard_size)

    def close(self) -> dict[int, list[Path]]:
        """Write what is left; returns the shard files per layer."""
        for layer in sorted(self._buf):
            if self._rows.get(layer, 0):
                self._flush(layer, self._rows[layer])
        return self.files

    def _flush(self, layer: int, rows: int) -> None:
        parts = self._buf[layer]
        x = np.concatenate([p[0] for p in parts])
        m = np.concatenate([p[1] for p in parts])
        t = np.concatenate([p[2] for p in parts])
        files = self.files.setdefault(layer, [])
        path = self.directory / f"layer{layer:03d}-{len(files):04d}.safetensors"
        self.directory.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, {"x": x[:rows], "mask": m[:rows], "token": t[:rows]})
        files.append(path)
        rest = len(t) - rows
        self._buf[layer] = [(x[rows:], m[rows:], t[rows:])] if rest else []
        self._rows[layer] = rest


def read_shards(paths: list[str | Path], n_ff: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate shards: (x [S, d] float32, active [S, n_ff] bool, token [S] int64)."""
    xs, ms, ts = [], [], []
    for p in paths:
        f = SafetensorsFile(p)
        xs.append(np.asarray(f.get("x")))
        ms.append(np.unpackbits(np.asarray(f.get("mask")), axis=1, bitorder="little", count=n_ff).astype(bool))
        ts.append(np.asarray(f.get("token")))
    return np.concatenate(xs), np.concatenate(ms), np.concatenate(ts)
