"""The :class:`ModelFamily` contract and the registry that maps HF names to families."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from ..errors import InputError
from ..ir import ArchSpec, FFNBlock

_BY_ARCH: dict[str, type["ModelFamily"]] = {}
_BY_NAME: dict[str, type["ModelFamily"]] = {}


class ModelFamily:
    """What sparseforge knows about one family of transformers.

    Subclasses set ``name`` and ``architectures`` and implement the four methods; all
    tensor names they return are canonical Hugging Face names without a model prefix.
    """

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    #: prefixes some checkpoints put before canonical names (``bert.`` in BertFor*).
    strip_prefixes: ClassVar[tuple[str, ...]] = ()
    #: checkpoint tensors that are not weights and are dropped on import.
    ignored_tensors: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def spec_from_config(cls, config: dict[str, Any], path: Path) -> ArchSpec:
        """Build the spec from a ``config.json`` dict; unsupported features raise InputError."""
        raise NotImplementedError

    @classmethod
    def blocks(cls, spec: ArchSpec) -> list[FFNBlock]:
        """One FFN block per layer with canonical tensor names."""
        raise NotImplementedError

    @classmethod
    def expected_shapes(cls, spec: ArchSpec) -> dict[str, tuple[int, ...]]:
        """Every weight the family needs, with its canonical shape."""
        raise NotImplementedError

    @classmethod
    def optional_shapes(cls, spec: ArchSpec) -> dict[str, tuple[int, ...]]:
        """Weights that may be absent (e.g. a pooler)."""
        return {}

    @classmethod
    def fused_tensors(cls, spec: ArchSpec) -> dict[str, list[tuple[str, int, int]]]:
        """Checkpoint tensors that hold several canonical ones stacked along their rows
        (Phi-3's ``qkv_proj``): ``{name: [(canonical name, first row, end row), ...]}``,
        the parts in order and covering every row."""
        return {}

    @classmethod
    def post_ffn_norm(cls, layer: int) -> str | None:
        """Post-norm blocks (BERT): the prefix of the LayerNorm (``<prefix>.weight`` /
        ``.bias``) that normalises ``FFN input + FFN output`` of ``layer`` into the block's
        output. None for pre-norm blocks (Llama), whose FFN output joins the
        un-normalised residual stream."""
        return None

    @classmethod
    def canonical_name(cls, name: str) -> str | None:
        """Map a checkpoint tensor name to its canonical name (None: drop it)."""
        for prefix in cls.strip_prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        return None if name in cls.ignored_tensors else name


def register(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make a family findable by its name and HF architectures."""
    _BY_NAME[cls.name] = cls
    for arch in cls.architectures:
        _BY_ARCH[arch] = cls
    return cls


def family_for_architecture(arch: str, path: Path | None = None) -> type[ModelFamily]:
    try:
        return _BY_ARCH[arch]
    except KeyError:
        raise InputError(
            path, f"unknown architecture {arch!r}; supported: {', '.join(registered_architectures())}"
        ) from None


def family_named(name: str) -> type[ModelFamily]:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise InputError(None, f"unknown model family {name!r}; known: {', '.join(sorted(_BY_NAME))}") from None


def registered_architectures() -> list[str]:
    return sorted(_BY_ARCH)


def config_value(config: dict[str, Any], key: str, path: Path, kind: type = int, default: Any = ...) -> Any:
    """``config[key]`` converted to ``kind``; a missing or malformed value is an InputError."""
    if key not in config or config[key] is None:
        if default is ...:
            raise InputError(path, f"config.json has no {key!r}")
        return default
    raw = config[key]
    # JSON true/false and 384.5 are not counts: int() and float() would take them (as 1, 0, 384)
    exact = not isinstance(raw, bool) and (kind is not int or not isinstance(raw, float) or raw.is_integer())
    try:
        value = kind(raw) if exact else None
    except (TypeError, ValueError):
        value = None
    if value is None:
        raise InputError(path, f"config.json: {key!r} = {json.dumps(raw)} is not a valid {kind.__name__}")
    if kind is int and value <= 0 and key not in {"pad_token_id", "bos_token_id", "eos_token_id"}:
        raise InputError(path, f"config.json: {key!r} must be positive, got {value}")
    return value
