"""Next-token distributions on the MLX backend (the Distributions of the backend protocol).

The transform from logits is sts_edge.sampling.probabilities (the numpy reference, which the tests
compare with) in float32: temperature, then top-k, then top-p. Greedy distributions are one-hot at
the argmax and are never materialised.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from sts_edge.sampling import SamplingParams


def probabilities(logits: mx.array, params: SamplingParams) -> mx.array:
    """[n, vocab] float32 sampling distributions of logits [n, vocab] at temperature > 0."""
    scaled = logits.astype(mx.float32) / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = mx.sort(scaled, axis=-1)[:, -params.top_k][:, None]
        scaled = mx.where(scaled < kth, -mx.inf, scaled)
    probs = mx.softmax(scaled, axis=-1)
    if params.top_p < 1.0:
        # Keep the smallest prefix (by probability) whose mass reaches top_p, the crossing token included.
        order = mx.argsort(-probs, axis=-1)
        sorted_probs = mx.take_along_axis(probs, order, axis=-1)
        mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = mass_before < params.top_p
        keep = mx.take_along_axis(keep_sorted, mx.argsort(order, axis=-1), axis=-1)
        probs = mx.where(keep, probs, 0.0)
        probs = probs / probs.sum(axis=-1, keepdims=True)
    return probs


class MLXDistributions:
    def __init__(self, logits: mx.array, params: SamplingParams, vocab: int | None = None):
        self._logits = logits if vocab is None else logits[:, :vocab]
        self._params = params
        self._probs: mx.array | None = None

    def __len__(self) -> int:
        return self._logits.shape[0]

    def argmax(self) -> list[int]:
        return mx.argmax(self._logits, axis=-1).tolist()

    def probs_of(self, tokens: Sequence[int]) -> np.ndarray:
        if self._params.greedy:
            return (np.array(self.argmax()[: len(tokens)]) == np.array(tokens)).astype(np.float64)
        picked = self._probabilities()[mx.arange(len(tokens)), mx.array(list(tokens))]
        return np.array(picked).astype(np.float64)

    def row(self, index: int) -> np.ndarray:
        if self._params.greedy:
            one_hot = np.zeros(self._logits.shape[-1])
            one_hot[self.argmax()[index]] = 1.0
            return one_hot
        return np.array(self._probabilities()[index]).astype(np.float64)

    def logits(self) -> np.ndarray:
        return np.array(self._logits.astype(mx.float32))

    def _probabilities(self) -> mx.array:
        if self._probs is None:
            self._probs = probabilities(self._logits, self._params)
        return self._probs


def choose(logits: mx.array, params: SamplingParams, uniform: float | None) -> mx.array:
    """The next token [1] after logits [1, vocab], left lazy: the argmax when greedy, else
    sts_edge.sampling.sample's draw for `uniform` (the same cumulative sum and search; float32, as
    MLX's GPU has no float64)."""
    if params.greedy:
        return mx.argmax(logits, axis=-1)
    cdf = mx.cumsum(probabilities(logits, params)[0], axis=-1)
    # The count of cdf entries at or below the point is searchsorted(side="right").
    return mx.minimum((cdf <= uniform * cdf[-1]).sum(axis=-1, keepdims=True), cdf.shape[-1] - 1)
