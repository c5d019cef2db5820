"""Activation predictors: which FFN neurons of a layer will fire for a token, before
computing them (Deja Vu, PowerInfer).

A predictor is a low-rank MLP from the FFN input to one logit per neuron::

    logits = relu(x W1^T + b1) W2^T + b2        W1 [r, d], W2 [n, r] (biases optional)

and a neuron is predicted active when its logit is ``>= threshold`` (one threshold per
layer). It is trained in torch (class-weighted BCE, AdamW, minibatches, early stopping
on the held-out loss) on the (FFN input, activation mask) samples the profile pass
wrote; then the threshold is calibrated on the held-out split for a target recall.

Inference (:func:`predictor_logits`, :func:`predict_mask`) is numpy (no torch) and
computes what the runtime's kernels compute: in Q8_0 (weights and inputs quantized)
when ``d`` is a multiple of 32, so the threshold is calibrated for the arithmetic that
deploys. :func:`search_rank` (one layer: try ranks in ascending order, keep the
smallest that meets the recall target at a bounded predicted density) is the unit of
work the ``predictors`` pass hands to an executor (``toolchain.executors``); it takes
and returns plain picklable values.

Recall, precision and densities are over all (token, neuron) pairs of a split:
``recall = TP / (TP + FN)``, ``precision = TP / (TP + FP)``, ``density`` = fraction of
pairs predicted active, ``true_density`` = fraction truly active (see
:func:`mask_metrics`).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sparseforge.kernels.runtime import predictor_logits_numpy

#: threshold of a layer with no active neuron on the held-out split: predicts nothing
NEVER = float(np.finfo(np.float32).max)


# -- arithmetic ----------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskMetrics:
    """Confusion counts of a predicted mask against the true one, over (token, neuron)
    pairs, and the figures derived from them. Recall (precision) is 1.0 when there is
    nothing to find (nothing predicted)."""

    tp: int
    fp: int
    fn: int
    total: int

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def density(self) -> float:
        """Fraction of pairs predicted active."""
        return (self.tp + self.fp) / self.total if self.total else 0.0

    @property
    def true_density(self) -> float:
        """Fraction of pairs truly active."""
        return (self.tp + self.fn) / self.total if self.total else 0.0

    def __add__(self, other: "MaskMetrics") -> "MaskMetrics":
        return MaskMetrics(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.total + other.total)

    def to_dict(self) -> dict[str, float]:
        return {"recall": self.recall, "precision": self.precision, "density": self.density,
                "true_density": self.true_density}


def mask_metrics(predicted: np.ndarray, active: np.ndarray) -> MaskMetrics:
    """Compare ``predicted`` with ``active`` (bool arrays of the same shape)."""
    predicted = np.asarray(predicted, dtype=bool)
    active = np.asarray(active, dtype=bool)
    if predicted.shape != active.shape:
        raise ValueError(f"predicted mask {predicted.shape} and true mask {active.shape} differ in shape")
    tp = int(np.count_nonzero(predicted & active))
    fp = int(np.count_nonzero(predicted)) - tp
    fn = int(np.count_nonzero(active)) - tp
    return MaskMetrics(tp=tp, fp=fp, fn=fn, total=int(active.size))


def calibrate_threshold(logits: np.ndarray, active: np.ndarray, recall: float) -> float:
    """The largest threshold ``t`` such that predicting ``logits >= t`` finds at least a
    ``recall`` fraction of the truly active pairs (``NEVER`` when none is active)."""
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall target must be in (0, 1], got {recall}")
    pos = np.asarray(logits, dtype=np.float32)[np.asarray(active, dtype=bool)]
    p = pos.size
    if p == 0:
        return NEVER
    # k = the fewest positives to keep so that k / p >= recall (in float division, as
    # MaskMetrics.recall computes it)
    k = min(max(math.ceil(recall * p), 1), p)
    while k > 1 and (k - 1) / p >= recall:
        k -= 1
    while k < p and k / p < recall:
        k += 1
    return float(np.partition(pos, p - k)[p - k])  # the k-th largest positive logit


# -- the model ------------------------------------------------------------------------------
@dataclass
class PredictorWeights:
    """Numpy weights of one predictor: ``w1`` [r, d], ``w2`` [n, r] float32, optional
    biases ``b1`` [r], ``b2`` [n]."""

    w1: np.ndarray
    w2: np.ndarray
    b1: np.ndarray | None = None
    b2: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.w1.shape[0])

    @property
    def params(self) -> int:
        return predictor_params(self.w1.shape[1], self.rank, self.w2.shape[0], self.b1 is not None)

    def tensors(self) -> dict[str, np.ndarray]:
        """``{"w1": .., "w2": .., "b1": .., "b2": ..}`` (biases only when present)."""
        out = {"w1": self.w1, "w2": self.w2}
        if self.b1 is not None and self.b2 is not None:
            out.update(b1=self.b1, b2=self.b2)
        return out


def predictor_params(d: int, rank: int, n: int, bias: bool) -> int:
    """Parameters of a ``d -> rank -> n`` predictor."""
    return d * rank + rank * n + ((rank + n) if bias else 0)


def predictor_flops(d: int, rank: int, n: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one token through a ``d -> rank -> n`` predictor."""
    return 2 * (d * rank + rank * n)


def predictor_logits(weights: PredictorWeights, x: np.ndarray) -> np.ndarray:
    """Logits ``[tokens, n]`` float32 for FFN inputs ``x [tokens, d]``: the runtime
    predictor's arithmetic (Q8_0 when ``d`` is a multiple of 32), in numpy."""
    return predictor_logits_numpy(weights.w1, weights.w2, weights.b1, weights.b2, x)


def predict_mask(weights: PredictorWeights, x: np.ndarray, threshold: float) -> np.ndarray:
    """Predicted activity ``[tokens, n]`` bool: ``logits >= threshold`` (numpy only)."""
    return predictor_logits(weights, x) >= np.float32(threshold)


def _torch_module(d: int, rank: int, n: int, bias: bool):
    import torch

    class LowRankPredictor(torch.nn.Module):
        """``d -> rank -> n`` MLP with ReLU between (the torch side of :class:`PredictorWeights`)."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(d, rank, bias=bias)
            self.fc2 = torch.nn.Linear(rank, n, bias=bias)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

        def numpy_weights(self) -> PredictorWeights:
            def arr(t):
                return None if t is None else t.detach().cpu().numpy().astype(np.float32, copy=True)

            return PredictorWeights(arr(self.fc1.weight), arr(self.fc2.weight), arr(self.fc1.bias),
                                    arr(self.fc2.bias))

    return LowRankPredictor()


def make_predictor(d: int, rank: int, n: int, bias: bool = False):
    """A freshly initialised torch predictor module (``torch.nn.Module``)."""
    return _torch_module(d, rank, n, bias)


# -- training -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """``recall`` target the threshold is calibrated for; ``heldout_fraction`` of the
    samples (of the sequences, when groups are known) kept for early stopping and
    calibration; AdamW ``lr`` / ``weight_decay``; ``batch_size`` samples per step; at most
    ``max_epochs`` epochs, stopping after ``patience`` epochs without a held-out loss
    improvement (the best epoch's weights are kept); positives weigh ``(1 - p) / p``
    (``p``: the layer's active rate on the training split), clipped to
    ``[1, max_pos_weight]``; ``bias`` adds biases to both layers."""

    recall: float = 0.99
    heldout_fraction: float = 0.2
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 40
    patience: int = 4
    max_pos_weight: float = 20.0
    bias: bool = False


@dataclass
class TrainResult:
    """A trained, calibrated predictor and its held-out figures."""

    weights: PredictorWeights
    threshold: float
    metrics: MaskMetrics
    epochs: int
    best_epoch: int
    heldout_loss: float
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {"rank": self.weights.rank, "threshold": self.threshold, **self.metrics.to_dict(),
                "params": self.weights.params, "epochs": self.epochs, "best_epoch": self.best_epoch,
                "heldout_loss": self.heldout_loss, "seconds": self.seconds}


def sub_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (``SeedSequence``), e.g. (seed, layer, rank)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def split_rows(n_rows: int, heldout_fraction: float, seed: int,
               groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, held-out) row indices, both sorted. With ``groups`` (one id
    per row, e.g. the calibration sequence of each token), whole groups go to one side
    so held-out tokens share no context with training tokens. Both sides are non-empty
    when ``n_rows >= 2``."""
    rng = np.random.default_rng(sub_seed(seed, 0x5EED))
    if groups is not None:
        uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
        if len(uniq) >= 2:
            order = rng.permutation(len(uniq))
            sizes = np.bincount(inverse, minlength=len(uniq))[order]
            want = heldout_fraction * n_rows
            take = int(np.searchsorted(np.cumsum(sizes), want, side="left")) + 1
            take = min(max(take, 1), len(uniq) - 1)
            held_groups = np.zeros(len(uniq), bool)
            held_groups[order[:take]] = True
            held = held_groups[inverse]
            return np.flatnonzero(~held), np.flatnonzero(held)
    k = min(max(int(round(heldout_fraction * n_rows)), 1), max(n_rows - 1, 1))
    perm = rng.permutation(n_rows)
    return np.sort(perm[k:]), np.sort(perm[:k])


class AdamW:
    """AdamW (decoupled weight decay; the algorithm and defaults of ``torch.optim.AdamW``,
    single-tensor form). Written out because constructing any ``torch.optim`` optimizer
    imports ``torch._dynamo``, which costs seconds in every fresh worker process."""

    def __init__(self, params: list[Any], lr: float, weight_decay: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        import torch

        self.params = params
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch

        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                if p.grad is None:
                    continue
                g = p.grad
                p.mul_(1 - self.lr * self.weight_decay)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
                p.addcdiv_(m, denom, value=-self.lr / bc1)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch (and, when threadpoolctl is installed, BLAS) on one thread, so results do not
    depend on the thread count; restored afterwards."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            yield
        else:
            with threadpool_limits(1):
                yield
    finally:
        torch.set_num_threads(prev)


def train_predictor(x: np.ndarray, active: np.ndarray, rank: int, config: TrainConfig, seed: int, *,
                    split: tuple[np.ndarray, np.ndarray] | None = None,
                    groups: np.ndarray | None = None) -> TrainResult:
    """Train and calibrate one layer's predictor of ``rank`` on ``x [S, d]`` float32 and
    ``active [S, n]`` bool. ``split`` = (train rows, held-out rows); by default
    :func:`split_rows` with ``config.heldout_fraction``, ``seed`` and ``groups``.
    Deterministic for a given ``seed`` (single-threaded torch)."""
    import torch

    t0 = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32)
    active = np.asarray(active, dtype=bool)
    if x.ndim != 2 or active.ndim != 2 or len(x) != len(active):
        raise ValueError(f"x {x.shape} and active {active.shape} must be [S, d] and [S, n]")
    if len(x) < 2:
        raise ValueError(f"need at least 2 samples to train a predictor, got {len(x)}")
    d, n = x.shape[1], active.shape[1]
    if not 1 <= rank:
        raise ValueError(f"rank must be >= 1, got {rank}")
    train_rows, held_rows = split if split is not None else split_rows(len(x), config.heldout_fraction, seed, groups)

    with single_threaded():
        torch.manual_seed(sub_seed(seed, rank, 1))
        model = make_predictor(d, rank, n, config.bias)
        gen = torch.Generator().manual_seed(sub_seed(seed, rank, 2))
        xt = torch.from_numpy(x[train_rows])
        at = torch.from_numpy(active[train_rows])
        xh = torch.from_numpy(x[held_rows])
        ah = torch.from_numpy(active[held_rows])
        # one weight for the layer: a per-neuron weight would shift each neuron's logits by
        # its log-weight, and a single threshold then no longer ranks (token, neuron) pairs
        # by their odds of being active, which costs density at a given recall
        rate = float(at.float().mean())
        pos_weight = torch.tensor(min(max((1 - rate) / max(rate, 1e-6), 1.0), config.max_pos_weight))
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        opt = AdamW(list(model.parameters()), lr=config.lr, weight_decay=config.weight_decay)

        def heldout_loss() -> float:
            model.eval()
            total = 0.0
            with torch.no_grad():
                for i in range(0, len(xh), 4096):
                    logits = model(xh[i : i + 4096])
                    total += float(loss_fn(logits, ah[i : i + 4096].float())) * len(logits)
            model.train()
            return total / max(len(xh), 1)

        best = heldout_loss()
        best_state = {k: v.clone() for k, v in model.state_dict().items()}
        best_epoch, bad, epoch = 0, 0, 0
        for epoch in range(1, config.max_epochs + 1):
            perm = torch.randperm(len(xt), generator=gen)
            for i in range(0, len(xt), config.batch_size):
                idx = perm[i : i + config.batch_size]
                loss = loss_fn(model(xt[idx]), at[idx].float())
                opt.zero_grad()
                loss.backward()
                opt.step()
            loss_h = heldout_loss()
            if loss_h < best * (1 - 1e-4):
                best, best_epoch, bad = loss_h, epoch, 0
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= config.patience:
                    break
        model.load_state_dict(best_state)
        weights = model.numpy_weights()
        logits = predictor_logits(weights, x[held_rows])
    threshold = calibrate_threshold(logits, active[held_rows], config.recall)
    metrics = mask_metrics(logits >= np.float32(threshold), active[held_rows])
    return TrainResult(weights, threshold, metrics, epochs=epoch, best_epoch=best_epoch, heldout_loss=best,
                       seconds=time.perf_counter() - t0)


# -- one layer's rank search (the executor's unit of work) ------------------------------------
@dataclass
class LayerTask:
    """Everything :func:`search_rank` needs for one layer (picklable): the sample shard
    files, ranks to try in ascending order, the density bound (``density_factor`` x the
    true held-out density), the training configuration, ``seed`` (training seeds derive
    from (seed, layer, rank); the split from ``seed`` alone, so every layer holds out the
    same tokens) and ``groups`` (per-sample sequence ids, or None)."""

    layer: int
    shards: list[str]
    n_ff: int
    ranks: list[int]
    density_factor: float
    config: TrainConfig
    seed: int
    groups: np.ndarray | None = None


@dataclass
class LayerSearch:
    """Result of :func:`search_rank`: the chosen predictor (None when no rank met the
    target), every attempt's summary, the held-out true density and the seconds spent."""

    layer: int
    chosen: TrainResult | None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    true_density: float = 0.0
    samples: int = 0
    heldout_samples: int = 0
    seconds: float = 0.0


def search_rank(task: LayerTask) -> LayerSearch:
    """Train predictors of ``task.ranks`` in ascending order; keep the first whose held-out
    predicted density is ``<= density_factor x`` the true density at the recall target."""
    from .samples import read_shards

    t0 = time.perf_counter()
    x, active, _ = read_shards([Path(p) for p in task.shards], task.n_ff)
    split = split_rows(len(x), task.config.heldout_fraction, task.seed, task.groups)
    true_density = float(active[split[1]].mean()) if len(split[1]) else 0.0
    out = LayerSearch(task.layer, None, true_density=true_density, samples=len(x), heldout_samples=len(split[1]))
    for rank in sorted(task.ranks):
        result = train_predictor(x, active, rank, task.config, sub_seed(task.seed, task.layer), split=split)
        ok = (result.metrics.recall >= task.config.recall
              and result.metrics.density <= task.density_factor * result.metrics.true_density + 1e-12)
        out.attempts.append({**result.summary(), "meets_target": ok})
        if ok:
            out.chosen = result
            break
    out.seconds = time.perf_counter() - t0
    return out


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)


def as_weights(tensors: dict[str, np.ndarray]) -> PredictorWeights:
    """:class:`PredictorWeights` from ``{"w1", "w2"[, "b1", "b2"]}`` arrays."""
    return PredictorWeights(np.asarray(tensors["w1"], np.float32), np.asarray(tensors["w2"], np.float32),
                            None if tensors.get("b1") is None else np.asarray(tensors["b1"], np.float32),
                            None if tensors.get("b2") is None else np.asarray(tensors["b2"], np.float32))


__all__ = ["AdamW", "LayerSearch", "LayerTask", "MaskMetrics", "NEVER", "PredictorWeights", "TrainConfig", "TrainResult",
           "as_weights", "calibrate_threshold", "make_predictor", "mask_metrics", "predict_mask",
           "predictor_flops", "predictor_logits", "predictor_params", "search_rank", "single_threaded",
           "split_rows", "sub_seed", "train_predictor"]
