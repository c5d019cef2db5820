"""Frontends turn a model on disk into a :class:`~sparseforge.toolchain.ir.ModelIR`.

``load_model`` picks one by what the path is: an IR directory (``manifest.json``), a
Hugging Face checkpoint directory (``config.json``), or an ``.onnx`` file.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..ir import MANIFEST, ModelIR


def load_model(path: str | Path) -> ModelIR:
    """Import whatever model ``path`` holds."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file or directory")
    if p.is_dir() and (p / MANIFEST).is_file():
        return ModelIR.load(p)
    if p.is_dir() and not (p / "config.json").is_file():
        raise InputError(p, f"not a model directory: neither a Hugging Face checkpoint (config.json) nor a "
                            f"sparseforge IR directory ({MANIFEST})")
    if p.is_dir():
        from .hf import load_hf_checkpoint

        return load_hf_checkpoint(p)
    if p.suffix.lower() == ".onnx":
        from .onnx import load_onnx

        return load_onnx(p)
    raise InputError(p, "not a model: expected a Hugging Face checkpoint directory, an .onnx file or an IR directory")
