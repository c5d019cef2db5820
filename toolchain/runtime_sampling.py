"""Next-token choice for generation: greedy, or temperature + top-p (nucleus) sampling
with a seeded generator (the same seed gives the same tokens)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sampler:
    """``greedy``: argmax (transformers' ``do_sample=False``). Otherwise sample from
    ``softmax(logits / temperature)`` restricted to the smallest set of most likely
    tokens whose probability reaches ``top_p`` (1.0: the whole vocabulary)."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = 0
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.greedy:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        z = np.asarray(logits, np.float64).reshape(-1)
        if self.greedy:
            return int(np.argmax(z))
        return int(top_p_sample(z, self.temperature, self.top_p, self.rng))


def top_p_probs(logits: np.ndarray, temperature: float = 1.0, top_p: float = 1.0) -> np.ndarray:
    """The nucleus distribution: probabilities outside the top-p set are 0, the rest renormalised."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p >= 1.0:
        return p
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    keep = int(np.searchsorted(cum, top_p) + 1)  # smallest prefix whose mass reaches top_p
    out = np.zeros_like(p)
    sel = order[:keep]
    out[sel] = p[sel] / p[sel].sum()
    return out


def top_p_sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    p = top_p_probs(logits, temperature, top_p)
    return int(rng.choice(p.size, p=p))
