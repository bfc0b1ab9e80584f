"""CUDA graphs for decode-sized forwards, so that small-batch decoding is not launch-bound.

An eager forward of an 8B model issues thousands of kernel launches, and at batch size one the
CPU cannot issue them as fast as the GPU runs them. Here each decode-sized forward (a draft step,
with or without STS scores; a target verification block, dense or with STS sets) is captured once
per shape and replayed:

  * the position is a one-element device tensor that the kernels read (model.py's device-start
    path), so one graph serves every position up to its `bound`;
  * bounds are buckets (powers of two from 1024, capped by the cache) because the kernels' launch
    shape (splits, logits width) follows the longest context they must cover;
  * STS sets are selected eagerly, in one batched call, then copied into a static
    [draft_layers, kv_heads, keep] buffer that the graph reads: one graph per gamma and budget.

What does not fit (prefill, the draft's two-token catch-up, oracle/quest/streaming masks, sets per
query head) runs eagerly. All graphs of a model share one memory pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sts_edge.backends.cuda.attention import use_kernels
from sts_edge.mask import VerificationMask

SMALLEST_BUCKET = 1024


class StaticSets:
    """Stands in for a VerificationMask inside a graph: each layer's view of a static set buffer."""

    needs_queries = False

    def __init__(self, sets: torch.Tensor, mask: VerificationMask):
        self.sets = sets  # [draft_layers, kv_heads, keep] int32
        self.layer_map = mask.mapping.layer_map.copy()
        self.head_map = mask.mapping.head_map.copy()
        self.dense_layers = tuple(mask.policy.dense_layers)

    def sets_for(self, layer: int, *unused) -> torch.Tensor | None:
        if layer in self.dense_layers:
            return None
        sets = self.sets[int(self.layer_map[layer])]
        heads = self.head_map[layer]
        if np.array_equal(heads, np.arange(sets.shape[0])):
            return sets
        return torch.stack([sets[int(h)] for h in heads])


@dataclass
class CapturedForward:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [n] int64, copied in before each replay
    start: torch.Tensor  # [1] int32
    logits: torch.Tensor  # the graph's output
    sets: torch.Tensor | None  # [draft_layers, kv_heads, keep] int32 for STS verification


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, capacity: int):
        self.model = model
        self.capacity = capacity
        self.captured: dict[tuple, CapturedForward] = {}
        self.pool = None

    def bound(self, start: int, n: int) -> int:
        """The bucket for a block at `start`: the smallest power of two > start, from 1024 on."""
        bucket = max(SMALLEST_BUCKET, 1 << start.bit_length())
        return min(bucket, self.capacity - n)

    def accepts(self, start: int, n: int, mask: VerificationMask | None) -> bool:
        weight = self.model.embed_tokens.weight  # a graph replays the kernel path: only where it runs
        if not (use_kernels(weight.device, weight.dtype, n, self.model.config.head_dim) and 0 < start
                and start <= self.bound(start, n)):
            return False
        if mask is None:
            return True
        policy = mask.policy
        # A fractional budget changes the set size with every position: no fixed shape to capture.
        return (policy.name == "sts" and policy.granularity == "kv" and policy.budget >= 1
                and not policy.is_dense_at(mask.context) and not isinstance(mask.draft_scores, np.ndarray))

    def run(self, tokens: torch.Tensor, start: int, all_logits: bool, mask: VerificationMask | None, scores) -> torch.Tensor:
        """Replay (capturing first if new) the forward of `tokens` at `start`; returns its logits."""
        n = tokens.shape[0]
        bound = self.bound(start, n)
        sets = None
        if mask is not None:
            sets = mask.device_sets()
            for layer in range(self.model.config.num_hidden_layers):  # the mask's sparsity accounting
                mask.sets_for(layer)
        key = (n, all_logits, bound,
               None if scores is None else (scores.aggregation, scores.granularity, scores.buffer.data_ptr()),
               None if sets is None else (tuple(sets.shape), id(mask.mapping), mask.policy.dense_layers))
        entry = self.captured.get(key)
        if entry is None:
            entry = self._capture(key, tokens, start, all_logits, bound, mask, sets, scores)
        else:
            entry.tokens.copy_(tokens)
            entry.start.fill_(start)
            if sets is not None:
                entry.sets.copy_(sets)
        entry.graph.replay()
        return entry.logits

    def _capture(self, key, tokens, start, all_logits, bound, mask, sets, scores) -> CapturedForward:
        device = tokens.device
        static_tokens = tokens.clone()
        static_start = torch.tensor([start], dtype=torch.int32, device=device)
        static_sets = None if sets is None else sets.clone()
        static_mask = None if sets is None else StaticSets(static_sets, mask)
        # Warm-up run (compiles the kernels) on a side stream, as capture requires. It writes the
        # block's K/V rows, which the replay below rewrites identically; with a scratch score
        # buffer, so a "sum" aggregation is not folded twice.
        scratch = None if scores is None else type(scores)(torch.zeros_like(scores.buffer), scores.aggregation,
                                                           scores.granularity)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.model(static_tokens, static_start, all_logits, mask=static_mask, scores=scratch, bound=bound)
        torch.cuda.current_stream(device).wait_stream(side)
        del scratch
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model(static_tokens, static_start, all_logits, mask=static_mask, scores=scores, bound=bound)
        self.pool = graph.pool()
        entry = CapturedForward(graph, static_tokens, static_start, logits, static_sets)
        self.captured[key] = entry
        return entry
