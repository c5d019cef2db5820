"""Checks shared by the frontends."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..families.base import ModelFamily
from ..ir import ArchSpec
from ..tensors import TensorStore

FLOAT_DTYPES = {np.dtype("float32"), np.dtype("float16"), np.dtype("float64")}


def check_weights(family: type[ModelFamily], spec: ArchSpec, store: TensorStore, path: Path) -> None:
    """Every required weight is present with its canonical shape and a float dtype."""
    optional = family.optional_shapes(spec)
    missing = []
    for name, shape in {**family.expected_shapes(spec), **optional}.items():
        if name not in store:
            if name not in optional:
                missing.append(name)
            continue
        got = store.shape(name)
        if got != shape:
            raise InputError(path, f"tensor {name!r} has shape {list(got)}, expected {list(shape)} from the config")
        dt = store.dtype(name)
        if dt not in FLOAT_DTYPES and dt.name != "bfloat16":
            raise InputError(path, f"tensor {name!r} has dtype {dt.name}; weights must be float")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(path, f"missing weights {', '.join(missing[:3])}{more}")


def tokenizer_file(path: Path) -> str | None:
    """``path`` (a model's ``tokenizer.json``) when it exists and the ``tokenizers``
    library reads it; None when there is none; an :class:`InputError` when it does not
    parse (checked at import, not when a later pass or the runtime first tokenizes)."""
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises a plain Exception
        raise InputError(path, f"not a readable tokenizer.json: {exc}") from None
    return str(path)
