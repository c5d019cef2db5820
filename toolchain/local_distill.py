"""Layer-local recovery: fit each ReLU-ified FFN to the original FFN's outputs.

For a layer, the original block's outputs ``y = FFN_old(x)`` on the profile samples' FFN
inputs ``x`` [S, d] are the targets; the new block (same weights, new activation) is
trained with AdamW to minimise ``MSE(FFN_new(x), y) / mean(y^2) + l1 * mean|h|``. Each
layer is a small regression problem (no attention, no other layers), so this is cheap
next to end-to-end distillation and repairs most of what the activation swap broke;
end-to-end distillation can polish the rest.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .ir import FFNBlock, ModelIR
from .reference.ffn import ffn_forward
from .torch_model import FFN


def fit_ffn(teacher: ModelIR, student: ModelIR, layer: int, x: np.ndarray, *, steps: int, lr: float,
            batch_size: int, l1: float, seed: int) -> dict[str, Any]:
    """Train ``student``'s FFN ``layer`` towards ``teacher``'s on inputs ``x`` [S, d]
    (float32); writes the trained tensors into ``student.store``; returns statistics
    (relative error and sparsity of ``h`` on ``x`` before and after)."""
    old, new = teacher.blocks[layer], student.blocks[layer]
    y = torch.from_numpy(ffn_forward(teacher.store, old, x))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    module = _module(student, new)
    scale = float((y ** 2).mean()) or 1.0
    before = _measure(module, xt, y, scale)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        idx = torch.randint(0, len(xt), (min(batch_size, len(xt)),), generator=gen)
        out, h = module(xt[idx])
        loss = ((out - y[idx]) ** 2).mean() / scale + l1 * h.abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = _measure(module, xt, y, scale)
    for local, ir_name in module.ir_names().items():
        student.store.set(ir_name, module.get_parameter(local).detach().numpy().astype(np.float32))
    return {"layer": layer, "steps": steps, "rel_error_before": before[0], "rel_error_after": after[0],
            "sparsity_before": before[1], "sparsity_after": after[1]}


def _module(ir: ModelIR, block: FFNBlock) -> FFN:
    d, n = ir.spec.hidden_size, ir.spec.intermediate_size
    module = FFN(block, d, n)
    with torch.no_grad():
        for local, ir_name in module.ir_names().items():
            module.get_parameter(local).copy_(torch.from_numpy(np.array(ir.store.get_f32(ir_name))))
    return module


@torch.no_grad()
def _measure(module: FFN, x: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[float, float]:
    out, h = module(x)
    return float(((out - y) ** 2).mean()) / scale, float((h == 0).float().mean())
