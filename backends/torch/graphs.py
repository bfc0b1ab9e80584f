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

What does not fit (prefill, the draft's two-token catch-up, the oracle, quest and streaming
policies, fractional budgets, sets per query head, observed forwards) runs eagerly, with the
same kernels. All graphs of a model share one memory pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sts_edge.backends.torch.attention import ScoreBuffer, use_kernels
from sts_edge.backends.torch.model import Reads
from sts_edge.backends.torch.selection import LayerSets
from sts_edge.mask import VerificationPlan

SMALLEST_BUCKET = 1024


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

    def accepts(self, start: int, n: int, plan: VerificationPlan | None, draft_scores: ScoreBuffer | None) -> bool:
        """Whether this forward replays a graph: decode-sized on the kernel path, and for a sparse
        plan one whose sets have a fixed shape (sts, integer budget, one set per KV head)."""
        weight = self.model.norm.weight  # a graph replays the kernel path: only where it runs
        if not (use_kernels(weight.device, weight.dtype, n, self.model.config.head_dim) and 0 < start
                and start <= self.bound(start, n)):
            return False
        if plan is None:
            return True
        policy = plan.policy
        # A fractional budget changes the set size with every position: no fixed shape to capture.
        # Two-stage selection's candidates leave some of the context out (VerificationPlan.at), as
        # select_sets_at's shapes need.
        return (policy.name == "sts" and policy.granularity == "kv" and policy.budget >= 1
                and policy.candidates * policy.budget + policy.sink + policy.window < start
                and draft_scores is not None and draft_scores.buffer.shape[-1] >= self.bound(start, n))

    def run(self, tokens: torch.Tensor, start: int, all_logits: bool, plan: VerificationPlan | None,
            draft_scores: ScoreBuffer | None, scores: ScoreBuffer | None) -> torch.Tensor:
        """Replay (capturing first if new) the forward of `tokens` at `start`; returns its logits."""
        n = tokens.shape[0]
        bound = self.bound(start, n)
        key = (n, all_logits, bound,
               None if scores is None else (scores.spec, scores.buffer.data_ptr()),
               None if plan is None else (draft_scores.buffer.data_ptr(), tuple(draft_scores.buffer.shape),
                                          # the map's content, not its identity: each generation builds its plan
                                          plan.mapping.layer_map.tobytes(), plan.mapping.head_map.tobytes(),
                                          plan.policy.budget, plan.policy.sink, plan.policy.window,
                                          plan.policy.dense_layers, plan.policy.candidates))
        entry = self.captured.get(key)
        if entry is None:
            entry = self._capture(key, tokens, start, all_logits, bound, plan, draft_scores, scores)
        else:
            entry.tokens.copy_(tokens)
            entry.start.fill_(start)
        entry.graph.replay()
        return entry.logits

    def _capture(self, key, tokens, start, all_logits, bound, plan, draft_scores, scores) -> CapturedForward:
        device = tokens.device
        static_tokens = tokens.clone()
        static_start = torch.tensor([start], dtype=torch.int32, device=device)
        sets = None if plan is None else LayerSets(plan, static_start, self.model.config.num_key_value_heads,
                                                   draft_scores.buffer, bound)
        # Warm-up run (compiles the kernels) on a side stream, as capture requires. It writes the
        # block's K/V rows, which the replay below rewrites identically; with a scratch score
        # buffer, so a "sum" aggregation is not folded twice.
        scratch = None if scores is None else ScoreBuffer(torch.zeros_like(scores.buffer), scores.spec)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.model(static_tokens, static_start, all_logits, Reads(sets=sets, scores=scratch), bound)
        torch.cuda.current_stream(device).wait_stream(side)
        del scratch
        if sets is not None:
            sets.draft_sets = None  # select again while capturing, so the graph holds the selection
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model(static_tokens, static_start, all_logits, Reads(sets=sets, scores=scores), bound)
        self.pool = graph.pool()
        entry = CapturedForward(graph, static_tokens, static_start, logits)
        self.captured[key] = entry
        return entry
