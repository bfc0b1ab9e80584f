"""Token sets on the torch backend's device, by the selection contract of sts_edge.mask (whose numpy
`reference_sets` the tests compare with).

sts: the top-B of every draft layer and unit in one torch.topk over the draft's running score
buffer, merged with sink and window and sorted; each target layer takes its mapped draft layer's
sets (views, so a CUDA graph can capture the whole selection); with two-stage selection
(`candidates` > 1) those are the nominated sets, and each layer keeps the budget's best of them by
its block's own attention (refine_sets, fixed shapes too). torch.topk stays because a
sorting-free threshold selection was not faster at long contexts (benchmarks/README.md).
oracle and quest score the block's own queries and keys here; streaming is recency.
"""

from __future__ import annotations

import numpy as np
import torch

from sts_edge.cpu_kernels.extension import candidate_mass_kernel
from sts_edge.mask import LayerHeadMap, VerificationPlan

try:  # the GPU's second stage of two-stage selection (Triton); the torch ops below are its reference
    from sts_edge.triton_kernels.two_stage import MAX_NOMINATED, refine_sets_kernel
except ImportError:
    refine_sets_kernel, MAX_NOMINATED = None, 0


def select_sets(scores: torch.Tensor, context: int, budget: int, sink: int, window: int) -> torch.Tensor | None:
    """Sorted int32 sets [..., keep] from scores [..., units, >= context], or None when dense.

    keep = min(budget + sink + window, context). Each set holds positions 0..sink-1, the last
    `window` positions before `context`, and the `budget` best-scoring positions between them.
    """
    _check(scores, context, "the context", budget, sink, window)
    if budget + sink + window >= context:
        return None
    top = scores[..., sink : context - window].topk(budget, dim=-1, sorted=False).indices
    window_rows = torch.arange(context - window, context, dtype=torch.int32, device=scores.device)
    return _merge(top.to(torch.int32) + sink, sink, window_rows)


def select_sets_at(scores: torch.Tensor, context: torch.Tensor, bound: int, budget: int, sink: int,
                   window: int) -> torch.Tensor:
    """select_sets with `context` a one-element int32 device tensor, the form a CUDA graph replays
    at every position up to `bound`: scores [..., units, >= bound].

    The candidates are columns sink..bound with those from context - window on masked out, so no
    shape depends on the context. The caller keeps budget + sink + window < context <= bound (the
    layer runs dense otherwise); within that, the sets equal select_sets' (ties aside).
    """
    _check(scores, bound, "the bound", budget, sink, window)
    columns = torch.arange(sink, bound, dtype=torch.int32, device=scores.device)
    candidates = scores[..., sink:bound].masked_fill(columns >= context - window, float("-inf"))
    top = candidates.topk(budget, dim=-1, sorted=False).indices
    window_rows = context - window + torch.arange(window, dtype=torch.int32, device=scores.device)
    return _merge(top.to(torch.int32) + sink, sink, window_rows)


def _check(scores: torch.Tensor, columns: int, name: str, budget: int, sink: int, window: int) -> None:
    if budget < 1 or sink < 0 or window < 0:
        raise ValueError(f"budget must be >= 1 and sink, window >= 0, got {budget}, {sink}, {window}")
    if scores.shape[-1] < columns:
        raise ValueError(f"scores cover {scores.shape[-1]} positions, fewer than {name} ({columns})")


def _merge(chosen: torch.Tensor, sink: int, window_rows: torch.Tensor) -> torch.Tensor:
    """Sorted int32 sets [..., sink + window + budget]: the chosen positions, the sink and the window."""
    forced = torch.cat((torch.arange(sink, dtype=torch.int32, device=chosen.device), window_rows.to(torch.int32)))
    return torch.cat((forced.expand(*chosen.shape[:-1], forced.numel()), chosen), dim=-1).sort(dim=-1).values


def refine_sets(q: torch.Tensor, cache_k: torch.Tensor, context: int | torch.Tensor, nominated: torch.Tensor,
                budget: int, sink: int, window: int) -> torch.Tensor:
    """Two-stage selection's second stage (mask.candidate_attention is its reference): of the
    nominated sets [units, m] (sorted, sink and window among them), keep sink, window and the
    `budget` positions with the most attention mass of the block's queries, from their causal
    softmax over the nominated rows and the block; sorted int32 [units, budget + sink + window].
    q [heads, n, head_dim] at positions context..; cache_k [kv_heads, >= context + n, head_dim];
    `context` may be a one-element device tensor (a CUDA graph)."""
    n, head_dim = q.shape[1:]
    m = nominated.shape[1]
    if (refine_sets_kernel is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and cache_k.dtype == q.dtype and head_dim in (64, 128) and m <= MAX_NOMINATED):
        return refine_sets_kernel(q, cache_k, context, nominated, budget, sink, window)
    if (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and cache_k.dtype == q.dtype and head_dim % 8 == 0 and n <= 16 and cache_k.stride(-1) == 1
            and candidate_mass_kernel() is not None):
        # cpu_kernels/decode_attention.cpp: one pass over the nominees' keys, not twenty PyTorch ops
        mass = candidate_mass_kernel()(q.contiguous(), cache_k, int(context), nominated.long().contiguous())
    else:
        mass = candidate_mass(q, cache_k, context, nominated)
    forced = (nominated < sink) | (nominated >= context - window)
    top = mass.masked_fill(forced, float("-inf")).topk(budget, dim=-1, sorted=False).indices
    window_rows = context - window + torch.arange(window, dtype=torch.int32, device=q.device)
    return _merge(nominated.gather(1, top).to(torch.int32), sink, window_rows)


def candidate_mass(q: torch.Tensor, cache_k: torch.Tensor, context: int | torch.Tensor,
                   nominated: torch.Tensor) -> torch.Tensor:
    """float32 [units, m]: the mass the block's queries (a unit's) put on each nominated row, from
    their causal softmax over the nominees and the block, in PyTorch ops."""
    heads, n, head_dim = q.shape
    kv_heads = cache_k.shape[0]
    count, m = nominated.shape
    queries = q.float().reshape(kv_heads, -1, head_dim) if count == kv_heads else q.float()  # [units, queries, d]
    kv_of_unit = torch.arange(count, device=q.device) * kv_heads // count
    block = context + torch.arange(n, device=q.device)
    rows = torch.cat((nominated.long(), block.long().expand(count, n)), dim=1)  # [units, m + n]
    keys = cache_k[kv_of_unit[:, None], rows].float()
    logits = queries @ keys.transpose(1, 2) * head_dim**-0.5  # [units, queries, m + n]
    positions = block.repeat(queries.shape[1] // n)
    causal = rows[:, None, :] <= positions[None, :, None]
    return logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)[..., :m].sum(dim=1)


def csr_offsets(units: int, keep: int, device: torch.device) -> torch.Tensor:
    """Offsets [units + 1] of `units` lists of `keep` rows each, laid end to end."""
    return torch.arange(0, (units + 1) * keep, keep, dtype=torch.int32, device=device)


def mapped_sets(draft_sets: torch.Tensor, mapping: LayerHeadMap, layer: int) -> torch.Tensor:
    """Target `layer`'s sets from the sets of every draft layer [draft_layers, draft_units, keep]:
    its draft layer's, one per target unit by the head map (no host copies)."""
    sets = draft_sets[int(mapping.layer_map[layer])]
    heads = mapping.head_map[layer]
    if np.array_equal(heads, np.arange(sets.shape[0])):
        return sets
    return torch.stack([sets[int(h)] for h in heads])


def attention_mass(q: torch.Tensor, keys: torch.Tensor, context: int, granularity: str) -> torch.Tensor:
    """The oracle's score: the block's dense attention mass on each context position, summed over its
    queries (and a group's query heads at "kv" granularity): [units, context] float32.
    q [heads, n, head_dim] at positions context..; keys [kv_heads, >= context + n, head_dim]."""
    heads, n, head_dim = q.shape
    kv_heads = keys.shape[0]
    qg = q.float().reshape(kv_heads, heads // kv_heads * n, head_dim)
    logits = qg @ keys[:, : context + n].float().transpose(1, 2) * head_dim**-0.5
    positions = torch.arange(context + n, device=q.device)
    causal = positions[None, :] <= (context + torch.arange(n, device=q.device)).repeat(heads // kv_heads)[:, None]
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)[..., :context]
    mass = probs.reshape(heads, n, context).sum(dim=1)
    return mass.reshape(kv_heads, -1, context).sum(dim=1) if granularity == "kv" else mass


def quest_scores(q: torch.Tensor, keys: torch.Tensor, context: int, granularity: str, page_size: int) -> torch.Tensor:
    """Quest: per page of `page_size` context rows, the upper bound sum_d max(q_d * min_d, q_d * max_d)
    of q . k (max over the block's queries and, at "kv", the group's heads), given to every token of
    the page: [units, context]."""
    heads, n, head_dim = q.shape
    kv_heads = keys.shape[0]
    pages = -(-context // page_size)
    live = keys[:, :context].float()
    pad = pages * page_size - context  # the last page's missing rows repeat its first, not moving min or max
    paged = torch.cat((live, live[:, (pages - 1) * page_size :][:, :1].expand(-1, pad, -1)), dim=1) if pad else live
    paged = paged.reshape(kv_heads, pages, page_size, head_dim)
    kmin, kmax = paged.amin(dim=2), paged.amax(dim=2)  # [kv, pages, d]
    qg = q.float().reshape(kv_heads, heads // kv_heads, n, 1, head_dim)
    bound = torch.maximum(qg * kmin[:, None, None], qg * kmax[:, None, None]).sum(-1).amax(dim=2)  # [kv, group, pages]
    per_unit = bound.amax(dim=1) if granularity == "kv" else bound.reshape(heads, pages)
    return per_unit.repeat_interleave(page_size, dim=-1)[:, :context]


class LayerSets:
    """The index sets each target layer reads in one verification pass, by the plan's policy.

    For sts the top-B of every draft layer is selected on the first request from the draft's score
    buffer [draft_layers, draft_units, >= context]; with `context` a device tensor (a CUDA graph),
    over the columns up to `bound`. oracle and quest score the layer's own queries and keys.
    """

    def __init__(self, plan: VerificationPlan, context: int | torch.Tensor, units: int,
                 draft_scores: torch.Tensor | None = None, bound: int | None = None):
        self.plan, self.context, self.units, self.draft_scores, self.bound = plan, context, units, draft_scores, bound
        self.draft_sets: torch.Tensor | None = None  # [draft_layers, draft_units, keep], once selected

    @property
    def reads_keys(self) -> bool:
        """Whether selection scores the cache's keys (oracle, quest, two-stage sts), not only the draft's
        scores or recency."""
        policy = self.plan.policy
        return policy.name in ("oracle", "quest") or (policy.name == "sts" and policy.candidates > 1)

    def for_layer(self, layer: int, q: torch.Tensor, cache_k: torch.Tensor) -> torch.Tensor | None:
        """int32 [units, keep], or None where the layer reads everything."""
        policy, context = self.plan.policy, self.context
        on_device = isinstance(context, torch.Tensor)
        if layer in policy.dense_layers or (not on_device and policy.is_dense_at(context)):
            return None
        if policy.name == "sts":
            if self.draft_sets is None:
                self.draft_sets = self._select_draft_sets()
            sets = mapped_sets(self.draft_sets, self.plan.mapping, layer)
            if policy.candidates == 1 or (not on_device and policy.nominations(context) == 1):
                return sets  # a graph's plan comes with its nominations settled (VerificationPlan.at)
            budget = policy.budget_tokens(self.bound if on_device else context)
            return refine_sets(q, cache_k, context, sets, budget, policy.sink, policy.window)
        budget = policy.budget_tokens(context)
        if policy.name == "streaming":
            scores = torch.arange(context, dtype=torch.float32, device=q.device).expand(self.units, context)
        elif policy.name == "oracle":
            scores = attention_mass(q, cache_k, context, policy.granularity)
        else:
            scores = quest_scores(q, cache_k, context, policy.granularity, policy.page_size)
        return select_sets(scores, context, budget, policy.sink, policy.window)

    def _select_draft_sets(self) -> torch.Tensor:
        """[draft_layers, draft_units, keep]: the draft's top budget (times `candidates`) with sink and window."""
        policy = self.plan.policy
        if isinstance(self.context, torch.Tensor):
            budget = policy.budget_tokens(self.bound)  # graphs take integer budgets only: the same at any context
            return select_sets_at(self.draft_scores, self.context, self.bound, policy.candidates * budget, policy.sink,
                                  policy.window)
        nominated = policy.nominations(self.context) * policy.budget_tokens(self.context)
        return select_sets(self.draft_scores, self.context, nominated, policy.sink, policy.window)
