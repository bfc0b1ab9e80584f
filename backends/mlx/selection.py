"""Token sets on the MLX backend, by the selection contract of sts_edge.mask (whose numpy
`reference_sets` the tests compare with).

sts: the top-B of every draft layer and unit in one argpartition over the draft's running score
buffer, merged with sink and window and sorted; each target layer takes its mapped draft layer's
sets; with two-stage selection (`candidates` > 1) those are the nominated sets, of which each layer
keeps the budget's best by its block's own attention (refine_sets). oracle and quest score the
block's own queries and keys; streaming is recency.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from sts_edge.mask import LayerHeadMap, VerificationPlan


def select_sets(scores: mx.array, context: int, budget: int, sink: int, window: int) -> mx.array | None:
    """Sorted int32 sets [..., keep] from scores [..., units, >= context], or None when dense."""
    if budget + sink + window >= context:
        return None
    middle = scores[..., sink : context - window].astype(mx.float32)
    top = mx.argpartition(-middle, kth=budget - 1, axis=-1)[..., :budget].astype(mx.int32) + sink
    return _merge(top, context, sink, window)


def _merge(chosen: mx.array, context: int, sink: int, window: int) -> mx.array:
    """Sorted int32 sets [..., sink + window + budget]: the chosen positions, the sink and the window."""
    forced = mx.concatenate([mx.arange(sink, dtype=mx.int32), mx.arange(context - window, context, dtype=mx.int32)])
    forced = mx.broadcast_to(forced, (*chosen.shape[:-1], forced.size))
    return mx.sort(mx.concatenate([forced, chosen], axis=-1), axis=-1)


def mapped_sets(draft_sets: mx.array, mapping: LayerHeadMap, layer: int) -> mx.array:
    """Target `layer`'s sets from the sets of every draft layer [draft_layers, draft_units, keep]."""
    sets = draft_sets[int(mapping.layer_map[layer])]
    heads = mapping.head_map[layer]
    if np.array_equal(heads, np.arange(sets.shape[0])):
        return sets
    return sets[mx.array(heads)]


def refine_sets(q: mx.array, keys: mx.array, context: int, nominated: mx.array, budget: int, sink: int, window: int,
                scale: float) -> mx.array:
    """Two-stage selection's second stage (mask.candidate_attention is its reference): of the
    nominated sets [units, m] (sorted, sink and window among them), keep sink, window and the
    `budget` positions with the most attention mass of the block's queries, from their causal
    softmax over the nominated rows and the block; sorted int32 [units, budget + sink + window].
    q [1, heads, n, d] at positions context..; keys [1, kv_heads, >= context + n, d]."""
    _, heads, n, head_dim = q.shape
    kv_heads = keys.shape[1]
    count, m = nominated.shape
    queries = q[0].astype(mx.float32)
    if count == kv_heads:
        queries = queries.reshape(kv_heads, -1, head_dim)  # [units, queries, d]
    kv_of_unit = mx.arange(count) * kv_heads // count
    block = context + mx.arange(n)
    rows = mx.concatenate([nominated.astype(mx.int32), mx.broadcast_to(block.astype(mx.int32), (count, n))], axis=1)
    gathered = keys[0][kv_of_unit[:, None], rows].astype(mx.float32)  # [units, m + n, d]
    logits = (queries @ gathered.transpose(0, 2, 1)) * scale
    positions = mx.tile(block, (queries.shape[1] // n,))
    causal = rows[:, None, :] <= positions[None, :, None]
    mass = mx.softmax(mx.where(causal, logits, -mx.inf), axis=-1)[..., :m].sum(axis=1)  # [units, m]
    forced = (nominated < sink) | (nominated >= context - window)
    top = mx.argpartition(-mx.where(forced, -mx.inf, mass), kth=budget - 1, axis=-1)[..., :budget]
    return _merge(mx.take_along_axis(nominated, top, axis=-1).astype(mx.int32), context, sink, window)


def attention_mass(q: mx.array, keys: mx.array, context: int, granularity: str, scale: float) -> mx.array:
    """The oracle's score: the block's dense attention mass on each context position, summed over its
    queries (and a group's query heads at "kv" granularity): [units, context].
    q [1, heads, n, d] at positions context..; keys [1, kv_heads, >= context + n, d]."""
    _, heads, n, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    qg = q[0].astype(mx.float32).reshape(kv_heads, group * n, head_dim)
    logits = (qg @ keys[0, :, : context + n].astype(mx.float32).transpose(0, 2, 1)) * scale
    causal = mx.arange(context + n)[None, :] <= mx.tile(context + mx.arange(n), (group,))[:, None]
    probs = mx.softmax(mx.where(causal, logits, -mx.inf), axis=-1)[..., :context]
    mass = probs.reshape(heads, n, context).sum(axis=1)
    return mass.reshape(kv_heads, group, context).sum(axis=1) if granularity == "kv" else mass


def quest_scores(q: mx.array, keys: mx.array, context: int, granularity: str, page_size: int) -> mx.array:
    """Quest's per-page upper bound of q . k from the page's key minima and maxima (max over the
    block's queries and, at "kv", the group's heads), given to every token of the page: [units, context]."""
    _, heads, n, head_dim = q.shape
    kv_heads = keys.shape[1]
    pages = -(-context // page_size)
    live = keys[0, :, :context].astype(mx.float32)
    pad = pages * page_size - context  # the last page's missing rows repeat its first, not moving min or max
    if pad:
        first_of_last = live[:, (pages - 1) * page_size : (pages - 1) * page_size + 1]
        live = mx.concatenate([live, mx.broadcast_to(first_of_last, (kv_heads, pad, head_dim))], axis=1)
    paged = live.reshape(kv_heads, pages, page_size, head_dim)
    kmin, kmax = paged.min(axis=2), paged.max(axis=2)
    qg = q[0].astype(mx.float32).reshape(kv_heads, heads // kv_heads, n, 1, head_dim)
    bound = mx.maximum(qg * kmin[:, None, None], qg * kmax[:, None, None]).sum(axis=-1).max(axis=2)  # [kv, group, pages]
    per_unit = bound.max(axis=1) if granularity == "kv" else bound.reshape(heads, pages)
    return mx.repeat(per_unit, page_size, axis=-1)[:, :context]


class LayerSets:
    """The index sets each target layer reads in one verification pass, by the plan's policy."""

    def __init__(self, plan: VerificationPlan, context: int, units: int, draft_scores: mx.array | None = None):
        self.plan, self.context, self.units, self.draft_scores = plan, context, units, draft_scores
        self.draft_sets: mx.array | None = None

    def for_layer(self, layer: int, q: mx.array, cache_k: mx.array, scale: float) -> mx.array | None:
        """int32 [units, keep], or None where the layer reads everything."""
        policy, context = self.plan.policy, self.context
        if self.plan.layer_is_dense(layer, context):
            return None
        budget = policy.budget_tokens(context)
        if policy.name == "sts":
            if self.draft_sets is None:
                self.draft_sets = select_sets(self.draft_scores, context, policy.nominations(context) * budget,
                                              policy.sink, policy.window)
            sets = mapped_sets(self.draft_sets, self.plan.mapping, layer)
            if policy.nominations(context) == 1:
                return sets
            return refine_sets(q, cache_k, context, sets, budget, policy.sink, policy.window, scale)
        if policy.name == "streaming":
            scores = mx.broadcast_to(mx.arange(context, dtype=mx.float32), (self.units, context))
        elif policy.name == "oracle":
            scores = attention_mass(q, cache_k, context, policy.granularity, scale)
        else:
            scores = quest_scores(q, cache_k, context, policy.granularity, policy.page_size)
        return select_sets(scores, context, budget, policy.sink, policy.window)
