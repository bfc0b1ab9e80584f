"""CUDA graphs for decode-sized forwards, so that small-batch decoding is not launch-bound.

An eager forward of an 8B model issues thousands of kernel launches, and at batch size one the
CPU cannot issue them as fast as the GPU runs them. Here each decode-sized forward (a draft step,
with or without STS scores; a target verification block, dense or with STS sets) is captured once
per shape and replayed:

  * the position is a one-element device tensor that the kernels read (model.py's device-start
    path), so one graph serves every position up to its `bound`;
  * bounds are buckets (powers of two from 1024, capped by the cache) because the kernels' launch
    shape (splits, logits width) follows the longest context they must cover;
  * STS sets are selected inside the verification graph, from the draft's running score buffer
    at the device-side position (selection.select_sets_at), so selection replays with the
    verification it feeds and costs no eager launches: one graph per gamma and budget.

What does not fit (prefill, the draft's two-token catch-up, oracle/quest/streaming masks, sets per
query head) runs eagerly. All graphs of a model share one memory pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sts_edge.backends.cuda.attention import use_kernels
from sts_edge.mask import LayerHeadMap, VerificationMask
from sts_edge.triton_kernels.selection import select_sets_at

SMALLEST_BUCKET = 1024


class CapturedSets:
    """Stands in for a VerificationMask inside a graph: the first layer that asks selects the sets
    of every draft layer from the score buffer at the device-side position; the other layers
    take views of them. Python runs this only while capturing (and in the warm-up before it)."""

    needs_queries = False

    def __init__(self, scores: torch.Tensor, start: torch.Tensor, bound: int, mask: VerificationMask):
        self.scores = scores  # the draft's running buffer [draft_layers, kv_heads, >= bound]
        self.start = start  # [1] int32: the context the sets index into
        self.bound = bound
        policy = mask.policy
        self.budget, self.sink, self.window = policy.budget_tokens(mask.context), policy.sink, policy.window
        self.mapping = LayerHeadMap(mask.mapping.layer_map.copy(), mask.mapping.head_map.copy())
        self.dense_layers = tuple(policy.dense_layers)
        self.sets: torch.Tensor | None = None  # [draft_layers, kv_heads, keep] int32, once selected

    def sets_for(self, layer: int, *unused) -> torch.Tensor | None:
        if layer in self.dense_layers:
            return None
        if self.sets is None:
            self.sets = select_sets_at(self.scores, self.start, self.bound, self.budget, self.sink, self.window)
        return self.mapping.layer_sets(self.sets, layer)


@dataclass
class CapturedForward:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [n] int64, copied in before each replay
    start: torch.Tensor  # [1] int32
    logits: torch.Tensor  # the graph's output


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
                and not policy.is_dense_at(mask.context) and isinstance(mask.draft_scores, torch.Tensor)
                and mask.draft_scores.shape[-1] >= self.bound(start, n))

    def run(self, tokens: torch.Tensor, start: int, all_logits: bool, mask: VerificationMask | None, scores) -> torch.Tensor:
        """Replay (capturing first if new) the forward of `tokens` at `start`; returns its logits."""
        n = tokens.shape[0]
        bound = self.bound(start, n)
        if mask is not None:
            for layer in range(self.model.config.num_hidden_layers):  # the mask's sparsity accounting
                mask.count(layer)
        policy = None if mask is None else mask.policy
        key = (n, all_logits, bound,
               None if scores is None else (scores.aggregation, scores.granularity, scores.buffer.data_ptr()),
               None if mask is None else (mask.draft_scores.data_ptr(), tuple(mask.draft_scores.shape), id(mask.mapping),
                                          policy.budget, policy.sink, policy.window, policy.dense_layers))
        entry = self.captured.get(key)
        if entry is None:
            entry = self._capture(key, tokens, start, all_logits, bound, mask, scores)
        else:
            entry.tokens.copy_(tokens)
            entry.start.fill_(start)
        entry.graph.replay()
        return entry.logits

    def _capture(self, key, tokens, start, all_logits, bound, mask, scores) -> CapturedForward:
        device = tokens.device
        static_tokens = tokens.clone()
        static_start = torch.tensor([start], dtype=torch.int32, device=device)
        static_mask = None if mask is None else CapturedSets(mask.draft_scores, static_start, bound, mask)
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
        if static_mask is not None:
            static_mask.sets = None  # select again while capturing, so the graph holds the selection
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model(static_tokens, static_start, all_logits, mask=static_mask, scores=scores, bound=bound)
        self.pool = graph.pool()
        entry = CapturedForward(graph, static_tokens, static_start, logits)
        self.captured[key] = entry
        return entry
