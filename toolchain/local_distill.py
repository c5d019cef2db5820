"""Layer-local recovery: fit each ReLU-ified FFN to the original FFN's outputs.

For a layer, the original block's outputs ``y = FFN_old(x)`` on FFN inputs ``x`` [S, d]
are the targets; the new block (same weights, new activation) is trained with AdamW to
minimise ``MSE(post(FFN_new(x)), y) / mean(y^2) + l1 * mean|h|``, where ``post`` is the
identity, or for post-norm families (BERT) the block's output LayerNorm applied to
``x + FFN(x)``, so the fit is measured on what the next layer (or the pooled embedding)
sees. Each layer is a small regression problem (no attention, no other layers), so this
is cheap next to end-to-end distillation and repairs most of what the activation swap
broke; end-to-end distillation can polish the rest.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .calibration import Sequences
from .ir import FFNBlock, ModelIR
from .progress import progress as progress_iter
from .reference.ffn import ffn_forward
from .torch_model import FFN, build_torch_model


Post = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fit_ffn(teacher: ModelIR, student: ModelIR, layer: int, x: np.ndarray, *, steps: int, lr: float,
            batch_size: int, l1: float, seed: int, target_sparsity: float | None = None,
            targets: np.ndarray | None = None, post: Post | None = None) -> dict[str, Any]:
    """Train ``student``'s FFN ``layer`` towards ``teacher``'s on inputs ``x`` [S, d]
    (float32; the targets are ``teacher``'s FFN outputs on ``x`` unless ``targets``
    [S, d] are given); writes the trained tensors into ``student.store``; returns statistics
    (relative error and sparsity of ``h`` on ``x`` before and after). ``post(x, y)``
    maps a batch of inputs and FFN outputs to what is compared with ``targets`` (default:
    the FFN output itself).

    With ``target_sparsity`` the block is trained with its output threshold in the loop
    (FATReLU): every ``RECALIBRATE_EVERY`` steps the threshold is reset so that
    ``target_sparsity`` of the pre-threshold activations on ``x`` fall at or below it, and
    the final threshold is stored in ``student.blocks[layer].output_threshold``."""
    old, new = teacher.blocks[layer], student.blocks[layer]
    y = torch.from_numpy(np.ascontiguousarray(_ffn_outputs(teacher, old, x) if targets is None else targets,
                                              dtype=np.float32))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    module = _module(student, new)
    post = post or (lambda _x, out: out)
    scale = float((y ** 2).mean()) or 1.0
    before = _measure(module, xt, y, scale, post)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        if target_sparsity is not None and step % RECALIBRATE_EVERY == 0:
            _recalibrate(module, xt, target_sparsity)
        idx = torch.randint(0, len(xt), (min(batch_size, len(xt)),), generator=gen)
        out, h = module(xt[idx])
        loss = ((post(xt[idx], out) - y[idx]) ** 2).mean() / scale + l1 * h.abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if target_sparsity is not None:
        _recalibrate(module, xt, target_sparsity)
        new.output_threshold = module.block.output_threshold
    after = _measure(module, xt, y, scale, post)
    for local, ir_name in module.ir_names().items():
        student.store.set(ir_name, module.get_parameter(local).detach().numpy().astype(np.float32))
    return {"layer": layer, "steps": steps, "rel_error_before": before[0], "rel_error_after": after[0],
            "sparsity_before": before[1], "sparsity_after": after[1], "threshold": new.output_threshold}


#: steps between threshold recalibrations when training with the threshold in the loop
RECALIBRATE_EVERY = 25


@torch.no_grad()
def _recalibrate(module: FFN, x: torch.Tensor, target: float, rows: int = 2048) -> None:
    """Set ``module``'s output threshold to the ``target`` quantile of |h| before
    thresholding, measured on (up to) ``rows`` evenly spaced rows of ``x``."""
    module.block.output_threshold = 0.0
    _, h = module(x[:: max(1, len(x) // rows)])
    flat = h.abs().flatten()
    k = min(len(flat), max(1, int(round(target * len(flat)))))
    module.block.output_threshold = float(flat.kthvalue(k).values)


def _module(ir: ModelIR, block: FFNBlock) -> FFN:
    d, n = ir.spec.hidden_size, ir.spec.intermediate_size
    module = FFN(block, d, n)
    with torch.no_grad():
        for local, ir_name in module.ir_names().items():
            module.get_parameter(local).copy_(torch.from_numpy(np.array(ir.store.get_f32(ir_name))))
    return module


#: rows per chunk when a whole input set goes through an FFN (bounds the [rows, n_ff] activations)
CHUNK = 16384


def _ffn_outputs(ir: ModelIR, block: FFNBlock, x: np.ndarray) -> np.ndarray:
    """``block``'s output [S, d] on ``x`` [S, d] (numpy reference), in chunks of rows."""
    return np.concatenate([ffn_forward(ir.store, block, x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)]) \
        if len(x) else np.zeros_like(x)


@torch.no_grad()
def _measure(module: FFN, x: torch.Tensor, y: torch.Tensor, scale: float, post: Post) -> tuple[float, float]:
    """Relative squared error of ``post(x, FFN(x))`` against ``y`` and the fraction of zero activations."""
    err, zeros = 0.0, 0
    for i in range(0, len(x), CHUNK):
        out, h = module(x[i:i + CHUNK])
        err += float(((post(x[i:i + CHUNK], out) - y[i:i + CHUNK]) ** 2).sum())
        zeros += int((h == 0).sum())
    return err / (y.numel() or 1) / scale, zeros / max(1, len(x) * module.up.out_features)


def _post_norm(ir: ModelIR, prefix: str) -> tuple[Post, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """``LayerNorm(x + y)`` with ``ir``'s ``prefix`` weights, for torch batches and numpy arrays."""
    w = torch.from_numpy(np.array(ir.store.get_f32(prefix + ".weight")))
    b = torch.from_numpy(np.array(ir.store.get_f32(prefix + ".bias")))
    eps = ir.spec.norm_eps

    def post(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x + y, (x.shape[-1],), w, b, eps)

    def post_np(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return post(torch.from_numpy(np.ascontiguousarray(x, np.float32)),
                        torch.from_numpy(np.ascontiguousarray(y, np.float32))).numpy()

    return post, post_np


def fit_sequential(teacher: ModelIR, student: ModelIR, layers: list[int], seqs: Sequences, *, steps: int,
                   lr: float, batch_size: int, l1: float, seed: int,
                   target_sparsity: dict[int, float | None], show_progress: bool | None = None) -> list[dict[str, Any]]:
    """Fit ``layers`` in order, each on the inputs the *student* produces with the layers
    before it already fitted, so every layer also repairs the error that reaches it.

    Targets: the teacher's FFN output on the teacher's input ``y_t = FFN_t(x_t)``; for
    post-norm families the teacher's block output ``LN(x_t + y_t)``, compared with the
    student's ``LN(x_s + FFN_s(x_s))``, so each layer matches what the next layer sees.
    Inputs are the real tokens of ``seqs`` (numpy reference executor).
    """
    from .families import family_named

    family = family_named(teacher.spec.family)
    x_teacher = ffn_inputs(teacher, seqs)
    stats = []
    for layer in progress_iter(layers, desc="local fit", enabled=show_progress, unit="layer"):
        x_t = x_teacher[layer]
        x_s = ffn_inputs(student, seqs, only=layer)[layer]
        y = _ffn_outputs(teacher, teacher.blocks[layer], x_t)
        post = None
        norm = family.post_ffn_norm(layer)
        if norm is not None:
            post, post_np = _post_norm(teacher, norm)
            y = post_np(x_t, y)
        stats.append(fit_ffn(teacher, student, layer, x_s, steps=steps, lr=lr, batch_size=batch_size, l1=l1,
                             seed=seed, target_sparsity=target_sparsity.get(layer), targets=y, post=post))
    return stats


def ffn_inputs(ir: ModelIR, seqs: Sequences, *, only: int | None = None,
               batch_size: int = 8) -> dict[int, np.ndarray]:
    """FFN inputs ``[tokens, d]`` float32 per layer (or only layer ``only``) over the real
    tokens of ``seqs`` (batch-major order), from the model's torch twin (no gradients;
    layers after ``only`` are not run)."""
    model = build_torch_model(ir).eval()
    seen: dict[int, list[np.ndarray]] = {}
    real = torch.zeros(0, dtype=torch.bool)  # the current batch's real tokens [B, T]

    class _Captured(Exception):
        """Layer ``only`` is captured: the layers after it need not run."""

    def hook(layer: int) -> Callable[[torch.nn.Module, tuple], None]:
        def capture(_module: torch.nn.Module, args: tuple) -> None:
            seen.setdefault(layer, []).append(args[0][real].numpy().astype(np.float32, copy=True))
            if layer == only:
                raise _Captured
        return capture

    handles = [block.ffn.register_forward_pre_hook(hook(i)) for i, block in enumerate(model.layers)
               if only is None or i == only]
    try:
        with torch.no_grad():
            for ids, mask in seqs.batches(batch_size):
                mask_t = torch.from_numpy(np.ascontiguousarray(mask))
                real = mask_t != 0
                try:
                    model(torch.from_numpy(np.array(ids, dtype=np.int64)), mask_t)
                except _Captured:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {layer: np.concatenate(parts) for layer, parts in seen.items()}
