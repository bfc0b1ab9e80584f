"""Turning logits into tokens: temperature, top-k, top-p, seeded randomness.

The settings, and the numpy reference of the transform from logits to distributions that each
backend implements on its device (tests compare them); `sample` draws from one row on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# Temperatures below this sample greedily: dividing logits by them overflows float32 (5e-324 turns
# every distribution into NaN), and above it the distribution is one-hot at float precision anyway.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 (or anything below GREEDY_BELOW) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


GREEDY = SamplingParams()


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Sampling distributions [n, vocab] (float64) after temperature, top-k and top-p.

    Greedy sampling is the one-hot distribution of the argmax, so the speculative acceptance
    rule reduces to exact match without a special case in the distributions themselves.
    """
    logits = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    if params.greedy:
        probs = np.zeros_like(logits)
        probs[np.arange(len(logits)), logits.argmax(axis=-1)] = 1.0
        return probs
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -params.top_k, axis=-1)[:, -params.top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        drop = np.zeros_like(probs, dtype=bool)
        np.put_along_axis(drop, order, mass_before >= params.top_p, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token from a single distribution row."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(probs) - 1))
