"""Progress bars: tqdm on a terminal, silent otherwise (CI logs stay clean)."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, enabled: bool | None = None,
             unit: str = "it") -> "tqdm[T]":
    """Wrap ``iterable`` in a progress bar; ``enabled=None`` means "only on a terminal".
    The bar is iterable and has ``set_postfix`` (a no-op when disabled)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, unit=unit, leave=False)
