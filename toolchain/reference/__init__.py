"""Reference (numpy) forward passes, the ground truth every other executor is checked against."""
from __future__ import annotations

from typing import Union

from ..ir import ModelIR
from .bert import BertEncoder
from .ffn import ACTIVATIONS, apply_activation, ffn_forward, register_activation
from .llama import KVCache, LlamaDecoder

Executor = Union[BertEncoder, LlamaDecoder]

EXECUTORS = {"bert": BertEncoder, "llama": LlamaDecoder}
"""Reference executor class by ``ArchSpec.family``."""


def executor_for(ir: ModelIR, **kwargs) -> Executor:
    """The reference executor of ``ir``'s family (``kwargs`` go to its constructor, e.g. ``ffn=``)."""
    try:
        cls = EXECUTORS[ir.spec.family]
    except KeyError:
        raise ValueError(f"no reference executor for model family {ir.spec.family!r} "
                         f"(known: {', '.join(sorted(EXECUTORS))})") from None
    return cls(ir, **kwargs)


__all__ = ["ACTIVATIONS", "BertEncoder", "EXECUTORS", "Executor", "KVCache", "LlamaDecoder",
           "apply_activation", "executor_for", "ffn_forward", "register_activation"]
