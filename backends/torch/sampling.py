"""Next-token distributions on the torch backend's device (the Distributions of the backend protocol).

The transform from logits is sts_edge.sampling.probabilities (the numpy reference, which the tests
compare with) in float32 on the device: temperature, then top-k, then top-p. Greedy distributions
are one-hot at the argmax and are never materialised.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from sts_edge.sampling import SamplingParams


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, vocab] float32 sampling distributions of logits [n, vocab] at temperature > 0."""
    scaled = logits.float() / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = scaled.topk(params.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    if params.top_p < 1.0:
        # Keep the smallest prefix (by probability) whose mass reaches top_p, the crossing token included.
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before >= params.top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


class TorchDistributions:
    def __init__(self, logits: torch.Tensor, params: SamplingParams, vocab: int | None = None):
        self._logits = logits if vocab is None else logits[:, :vocab]
        self._params = params
        self._probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self._logits.shape[0]

    @torch.inference_mode()
    def argmax(self) -> list[int]:
        return self._logits.argmax(dim=-1).tolist()

    @torch.inference_mode()
    def probs_of(self, tokens: Sequence[int]) -> np.ndarray:
        if self._params.greedy:
            return (np.array(self.argmax()[: len(tokens)]) == np.array(tokens)).astype(np.float64)
        rows = torch.arange(len(tokens), device=self._logits.device)
        picked = self._probabilities()[rows, torch.tensor(list(tokens), device=self._logits.device)]
        return picked.double().cpu().numpy()

    @torch.inference_mode()
    def row(self, index: int) -> np.ndarray:
        if self._params.greedy:
            one_hot = np.zeros(self._logits.shape[-1])
            one_hot[self.argmax()[index]] = 1.0
            return one_hot
        return self._probabilities()[index].double().cpu().numpy()

    @torch.inference_mode()
    def logits(self) -> np.ndarray:
        return self._logits.float().cpu().numpy()

    def _probabilities(self) -> torch.Tensor:
        if self._probs is None:
            self._probs = probabilities(self._logits, self._params)
        return self._probs


def choose(logits: torch.Tensor, params: SamplingParams, uniform: float | None) -> torch.Tensor:
    """The next token [1] after logits [1, vocab], left on the device: the argmax when greedy, else
    sts_edge.sampling.sample's draw for `uniform` (the same cumulative sum and search, in float64)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    cdf = probabilities(logits, params)[0].double().cumsum(dim=-1)
    # The count of cdf entries at or below the point is searchsorted(side="right"); the uniform stays
    # a kernel argument, so nothing is copied to the device.
    return (cdf <= uniform * cdf[-1]).sum(dim=-1, keepdim=True).clamp_(max=cdf.shape[-1] - 1)
