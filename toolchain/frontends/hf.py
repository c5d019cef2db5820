"""Hugging Face checkpoint directories: ``config.json`` + safetensors shard(s) [+ ``tokenizer.json``].

Tensors are not read: each becomes a reference into its memory-mapped shard under its
canonical name. Sharded checkpoints are found through ``model.safetensors.index.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError, describe
from ..families import family_for_architecture
from ..fingerprint import file_digest
from ..ir import ModelIR
from ..safetensors_io import SafetensorsFile
from ..tensors import TensorRef, TensorStore
from .common import check_weights, tokenizer_file

INDEX = "model.safetensors.index.json"


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise InputError(directory, "not a Hugging Face checkpoint: config.json not found")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"corrupt config.json: {exc}") from None
    if not isinstance(config, dict):
        raise InputError(path, "corrupt config.json: not a JSON object")
    archs = config.get("architectures")
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise InputError(path, "config.json has no 'architectures' list naming the model class")
    return config


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when there is one."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(index, f"corrupt safetensors index: {describe(exc)}") from None
        shards = [directory / n for n in names]
        for s in shards:
            if not s.is_file():
                raise InputError(s, f"shard listed in {INDEX} not found")
        return shards
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        bins = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" ({bins[0]} found: convert it to safetensors first)" if bins else ""
        raise InputError(directory, f"no *.safetensors weights{hint}")
    return shards


def load_hf_checkpoint(directory: str | Path) -> ModelIR:
    """Import a HF checkpoint directory without reading any tensor data."""
    directory = Path(directory).resolve()
    config = read_config(directory)
    family = family_for_architecture(config["architectures"][0], directory / "config.json")
    spec = family.spec_from_config(config, directory / "config.json")
    fused = family.fused_tensors(spec)
    refs: dict[str, TensorRef] = {}
    for shard in shard_files(directory):
        st = SafetensorsFile(shard)
        for key in st.keys():
            name = family.canonical_name(key)
            if name is None:
                continue
            parts = fused.get(name)
            if parts and tuple(st.shape(key))[:1] != (parts[-1][2],):
                raise InputError(shard, f"tensor {key!r} has shape {list(st.shape(key))}; its {len(parts)} parts "
                                        f"({', '.join(p[0].split('.')[-2] for p in parts)}) need {parts[-1][2]} rows")
            pieces = [(part, (start, stop)) for part, start, stop in parts] if parts else [(name, None)]
            for part, rows in pieces:
                if part in refs:
                    raise InputError(shard, f"tensor {part!r} appears in more than one shard")
                refs[part] = TensorRef(str(shard), key, rows=rows)
    wanted = set(family.expected_shapes(spec)) | set(family.optional_shapes(spec))
    store = TensorStore({k: v for k, v in refs.items() if k in wanted})
    check_weights(family, spec, store, directory)
    return ModelIR(
        spec=spec,
        store=store,
        blocks=family.blocks(spec),
        source={
            "format": "hf",
            "path": str(directory),
            "config_sha256": file_digest(directory / "config.json"),
            "ignored_tensors": sorted(set(refs) - wanted),
        },
        tokenizer=tokenizer_file(directory / "tokenizer.json"),
    )
