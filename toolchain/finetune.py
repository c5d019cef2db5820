"""Recovery fine-tuning by distillation: train a student IR (e.g. ReLU-ified) to match
its teacher (the original model), optionally with a progressive L1 penalty on the FFN
activations that pushes them to exact zeros (ProSparse-style).

Loss per step, on a batch of calibration sequences (real tokens only):

* decoders: ``KL(teacher || student)`` of the next-token distributions at every real
  position, plus ``lm_weight`` x the next-token cross-entropy of the student;
* encoders: mean ``1 - cos`` between the student's and teacher's pooled sentence
  embeddings, plus ``hidden_weight`` x the MSE between their last hidden states;
* plus ``l1(step)`` x mean ``|h|`` over every FFN activation, where ``l1(step)`` rises
  linearly from 0 to ``l1`` over the first ``l1_warmup`` fraction of the steps.

AdamW, linear warmup then cosine decay of the learning rate, gradient clipping at 1.0.
Batches are a seeded permutation of the training sequences per epoch, so a run is a
pure function of (student, teacher, data, options, seed): rerunning it gives identical
weights, and a run resumed from its checkpoint (``state_dir/finetune.pt``, written
atomically every ``checkpoint_every`` steps and at the end) ends where an uninterrupted
one would. A checkpoint of a different run (any input differs) is ignored and replaced.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_path
from .calibration import Sequences
from .ir import ModelIR
from .progress import progress as _progress
from .torch_model import TorchModel, build_torch_model, pool, to_ir

CHECKPOINT = "finetune.pt"
_CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class FinetuneOptions:
    """Hyper-parameters of :func:`distill` (see the module docstring for the loss)."""

    steps: int = 300
    lr: float = 2e-4
    batch_size: int = 16
    warmup_steps: int = 20
    weight_decay: float = 0.0
    l1: float = 0.0
    l1_warmup: float = 0.5
    lm_weight: float = 0.0
    hidden_weight: float = 1.0
    checkpoint_every: int = 50
    threads: int = 0
    train_ffn_only: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("finetune needs steps >= 1 and batch_size >= 1")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.threads < 0:
            raise ValueError("finetune needs lr > 0, warmup_steps >= 0, weight_decay >= 0 and threads >= 0")
        if self.l1 < 0 or not 0.0 <= self.l1_warmup <= 1.0 or self.lm_weight < 0 or self.hidden_weight < 0:
            raise ValueError("finetune needs l1, lm_weight, hidden_weight >= 0 and 0 <= l1_warmup <= 1")


def lr_at(opts: FinetuneOptions, step: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warmup, then cosine decay towards 0."""
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    span = max(1, opts.steps - opts.warmup_steps)
    return opts.lr * 0.5 * (1.0 + math.cos(math.pi * (step - opts.warmup_steps) / span))


def l1_at(opts: FinetuneOptions, step: int) -> float:
    """L1 weight of step ``step`` (0-based): rises linearly to ``l1`` over ``l1_warmup`` of the run."""
    ramp = opts.l1_warmup * opts.steps
    return opts.l1 if ramp <= 0 else opts.l1 * min(1.0, (step + 1) / ramp)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of step ``step``: consecutive slices of a per-epoch seeded permutation (the
    last partial batch of an epoch is dropped; fewer rows than a batch -> all rows)."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return np.sort(perm[k * batch_size:(k + 1) * batch_size])


def _sequences_digest(seqs: Sequences) -> str:
    h = hashlib.sha256()
    for a in (np.asarray(seqs.ids, np.int64), np.asarray(seqs.lengths, np.int64)):
        h.update(f"{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def run_key(student: ModelIR, teacher: ModelIR, train: Sequences, opts: FinetuneOptions, seed: int) -> str:
    """Identity of a fine-tuning run: a checkpoint is resumed only by the same run."""
    doc = {"format": _CHECKPOINT_FORMAT, "options": dataclasses.asdict(opts), "seed": seed,
           "student": student.content_hash(), "teacher": teacher.content_hash(), "train": _sequences_digest(train),
           "torch": torch.__version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _torch_settings(threads: int) -> Iterator[None]:
    """Deterministic kernels and a fixed thread count for the run; restored afterwards."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if threads == 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left alone
            yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _l1_and_sparsity(hs: list[torch.Tensor], real: torch.Tensor, need_l1: bool) -> tuple[torch.Tensor, list[float]]:
    """Mean ``|h|`` over every activation of the real tokens, and per layer the fraction of zeros."""
    m = real.to(hs[0].dtype)[..., None]
    total = sum(h.shape[-1] for h in hs) * real.sum()
    l1 = sum((h.abs() * m).sum() for h in hs) / total if need_l1 else torch.zeros(())
    with torch.no_grad():
        sparsity = [float(((h == 0) & real[..., None]).sum() / (real.sum() * h.shape[-1])) for h in hs]
    return l1, sparsity


def distill_loss(student: TorchModel, target: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 opts: FinetuneOptions, l1_weight: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loss of one batch given the teacher's output ``target`` on it, the loss's parts
    (floats) and the per-layer FFN sparsity."""
    real = mask != 0
    out, hs = student(ids, mask, return_ffn=True)
    info: dict[str, Any] = {}
    if student.spec.family == "bert":
        cos = 1.0 - (pool(out, mask) * pool(target, mask)).sum(-1)
        loss = cos.mean()
        info["cosine"] = float(1.0 - loss.detach())
        if opts.hidden_weight > 0:
            mse = (out - target)[real].square().mean()
            loss = loss + opts.hidden_weight * mse
            info["mse"] = float(mse.detach())
    else:
        logp_s = F.log_softmax(out[real], dim=-1)
        logp_t = F.log_softmax(target[real], dim=-1)
        loss = F.kl_div(logp_s, logp_t, log_target=True, reduction="batchmean")
        info["kl"] = float(loss.detach())
        nxt = real[:, 1:] & real[:, :-1]
        if opts.lm_weight > 0 and bool(nxt.any()):
            ce = F.cross_entropy(out[:, :-1][nxt], ids[:, 1:][nxt])
            loss = loss + opts.lm_weight * ce
            info["ce"] = float(ce.detach())
    info["distill"] = float(loss.detach())
    l1, sparsity = _l1_and_sparsity(hs, real, l1_weight > 0)
    if l1_weight > 0:
        loss = loss + l1_weight * l1
        info["l1"] = float(l1.detach())
    info["loss"] = float(loss.detach())
    info["sparsity_per_layer"] = sparsity
    info["sparsity"] = float(np.mean(sparsity))
    return loss, info


class TeacherOutputs:
    """The teacher's output for rows of ``train``. Encoder outputs (last hidden states)
    are computed once, in fixed chunks, when every sequence is seen at least twice and
    they take at most ``max_bytes``; otherwise (and for decoders' logits) per batch."""

    def __init__(self, teacher: TorchModel, train: Sequences, opts: FinetuneOptions,
                 max_bytes: int = 1 << 30) -> None:
        self.teacher, self.train, self.cache = teacher, train, None
        n, width = train.ids.shape
        size = n * width * teacher.spec.hidden_size * 4
        if teacher.spec.family == "bert" and opts.steps * opts.batch_size >= 2 * n and size <= max_bytes:
            self.cache = torch.zeros(n, width, teacher.spec.hidden_size)  # padding stays 0
            for i in range(0, n, opts.batch_size):
                w = int(train.lengths[i:i + opts.batch_size].max())
                self.cache[i:i + opts.batch_size, :w] = self._run(np.arange(i, min(n, i + opts.batch_size)), w)

    def _run(self, rows: np.ndarray, width: int) -> torch.Tensor:
        ids = torch.from_numpy(np.ascontiguousarray(self.train.ids[rows, :width], dtype=np.int64))
        mask = (torch.arange(width)[None, :] < torch.from_numpy(self.train.lengths[rows])[:, None]).long()
        with torch.no_grad():
            return self.teacher(ids, mask)

    def __call__(self, rows: np.ndarray, width: int) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[torch.from_numpy(rows), :width]
        return self._run(rows, width)


def _load_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to run ``key`` (unreadable ones are ignored)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a truncated or foreign file is just not resumable
        return None
    if not isinstance(state, dict) or state.get("key") != key or state.get("format") != _CHECKPOINT_FORMAT:
        return None
    return state


def _subsample(history: list[dict[str, Any]], n: int = 50) -> list[dict[str, Any]]:
    if len(history) <= n:
        return list(history)
    idx = np.unique(np.linspace(0, len(history) - 1, n).round().astype(int))
    return [history[i] for i in idx]


def distill(student: ModelIR, teacher: ModelIR, train: Sequences, opts: FinetuneOptions, *, seed: int,
            state_dir: Path | None, progress: bool | None, on_step: Callable[[int, dict], None] | None = None,
            ) -> tuple[ModelIR, dict[str, Any]]:
    """Fine-tune ``student`` to match ``teacher`` on ``train``; returns the student with the
    trained weights (float32 overlays for the tensors that changed; no ONNX graph) and
    statistics. ``on_step(step, info)`` is called after each step (1-based count of
    completed steps; ``info`` holds loss, its parts, lr, l1 weight and FFN sparsity)."""
    if student.spec.family != teacher.spec.family or student.spec.vocab_size != teacher.spec.vocab_size:
        raise ValueError("student and teacher must be the same kind of model (family and vocabulary)")
    if len(train) < 1:
        raise ValueError("distill needs at least one training sequence")
    started = time.perf_counter()
    key = run_key(student, teacher, train, opts, seed)
    ckpt_path = Path(state_dir) / CHECKPOINT if state_dir is not None else None
    with _torch_settings(opts.threads):
        torch.manual_seed(seed)
        model = build_torch_model(student).train()
        ffn = set(map(id, model.ffn_parameters()))
        for p in model.parameters():
            p.requires_grad_(not opts.train_ffn_only or id(p) in ffn)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n and not n.startswith(("word", "position", "token_type"))]
        no_decay = [p for n, p in named if not any(p is q for q in decay)]
        optim = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr)

        start, history, info = 0, [], {}
        state = _load_checkpoint(ckpt_path, key) if ckpt_path is not None else None
        if state is not None:
            with torch.no_grad():
                params = dict(model.named_parameters())
                for n, t in state["model"].items():
                    params[n].copy_(t)
            optim.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            start, history, info = int(state["step"]), list(state["history"]), dict(state["info"])

        def save(step: int) -> None:
            if ckpt_path is None:
                return
            doc = {"format": _CHECKPOINT_FORMAT, "key": key, "step": step,
                   "model": {n: p.detach().clone() for n, p in named}, "optimizer": optim.state_dict(),
                   "rng": torch.get_rng_state(), "history": history, "info": info}
            with atomic_path(ckpt_path) as tmp:
                torch.save(doc, tmp)

        if start < opts.steps:
            targets = TeacherOutputs(build_torch_model(teacher).eval().requires_grad_(False), train, opts)
        bar = _progress(range(start, opts.steps), desc="finetune", total=opts.steps - start, enabled=progress, unit="step")
        all_mask = train.mask
        loop_started = time.perf_counter()
        try:
            for step in bar:
                rows = batch_indices(len(train), opts.batch_size, seed, step)
                width = int(train.lengths[rows].max())
                ids = torch.from_numpy(np.ascontiguousarray(train.ids[rows, :width], dtype=np.int64))
                mask = torch.from_numpy(np.ascontiguousarray(all_mask[rows, :width]))
                lr, l1w = lr_at(opts, step), l1_at(opts, step)
                for group in optim.param_groups:
                    group["lr"] = lr
                loss, info = distill_loss(model, targets(rows, width), ids, mask, opts, l1w)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
                optim.step()
                info.update(lr=lr, l1_weight=l1w)
                history.append({"step": step + 1, "loss": info["loss"], "distill": info["distill"],
                                "sparsity": info["sparsity"]})
                bar.set_postfix(loss=f"{info['loss']:.4g}", sparsity=f"{info['sparsity']:.1%}")
                done = step + 1
                if done == opts.steps or (opts.checkpoint_every > 0 and done % opts.checkpoint_every == 0):
                    save(done)
                if on_step is not None:
                    on_step(done, info)
        finally:
            bar.close()
        loop_seconds = time.perf_counter() - loop_started
        result = to_ir(model, student, changed_only=True)
    seconds = time.perf_counter() - started
    ran = opts.steps - start
    stats = {
        "steps": opts.steps,
        "resumed_from": start,
        "seconds": round(seconds, 3),
        "seconds_per_step": round(loop_seconds / ran, 4) if ran else None,  # incl. on_step and checkpoints
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "first_distill": history[0]["distill"] if history else None,
        "last_distill": history[-1]["distill"] if history else None,
        "loss_curve": _subsample(history),
        "sparsity_per_layer": info.get("sparsity_per_layer"),
        "sparsity": info.get("sparsity"),
    }
    return result, stats


__all__ = ["CHECKPOINT", "FinetuneOptions", "TeacherOutputs", "batch_indices", "distill", "distill_loss", "l1_at", "lr_at", "run_key"]
