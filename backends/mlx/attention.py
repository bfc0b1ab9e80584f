"""Attention over the live part of the KV cache in MLX: one entry, `attend`, for every forward.

A forward reads the cache densely, densely while folding its probabilities into the draft's
running scores, or over index sets (verification with a sparse policy). On Metal, our kernels
(metal_kernels/attention.py) take the sparse and the scored forwards; MLX's own
scaled_dot_product_attention keeps the plain dense one. The plain MLX ops below run everywhere
(Metal or CPU) and are what the kernels are tested against. Tensors are [1, heads, tokens, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from sts_edge.backend import ScoreSpec
from sts_edge.metal_kernels import attention as metal


@dataclass
class ScoreBuffer:
    """The draft's running attention scores for one round: [layers, units, capacity] float32 (the
    DraftScores of the backend protocol). MLX arrays are values, so the layers replace `buffer`."""

    buffer: mx.array
    spec: ScoreSpec

    def numpy(self, context: int) -> np.ndarray:
        return np.array(self.buffer[:, :, :context])


def attend(q: mx.array, cache_k: mx.array, cache_v: mx.array, start: int, scale: float, *,
           sets: mx.array | None = None, scores: ScoreBuffer | None = None, layer: int = 0) -> mx.array:
    """Attention of q [1, heads, n, d] at positions start..start+n over the cache [1, kv_heads,
    capacity, d] (the block already written): over `sets` [units, kept] plus the block, or densely,
    folding the probabilities into row `layer` of `scores` when given."""
    n = q.shape[2]
    kernels = metal.usable(q)
    if sets is not None:
        if kernels:
            units, kept = sets.shape
            offsets = mx.arange(0, (units + 1) * kept, kept, dtype=mx.int32)
            return metal.sparse_attention(q, cache_k, cache_v, start, sets.reshape(-1), offsets, scale, max_rows=kept)
        return sparse_attend(q, cache_k, cache_v, start, sets, scale)
    if scores is not None and kernels:
        live = scores.buffer[layer, :, : start + n]
        out, folded = metal.dense_attention_with_scores(q, cache_k, cache_v, start, scale, live, scores.spec.aggregation)
        scores.buffer[layer, :, : start + n] = folded
        return out
    keys, values = cache_k[:, :, : start + n], cache_v[:, :, : start + n]
    if scores is not None:
        return attend_and_score(q, keys, values, start, scale, scores, layer)
    return dense_attend(q, keys, values, start, scale)


def causal_block_mask(start: int, n: int) -> mx.array:
    """[n, start + n] bool: query i (at position start + i) sees keys 0..start + i."""
    return mx.arange(start + n)[None, :] <= mx.arange(start, start + n)[:, None]


def dense_attend(q: mx.array, keys: mx.array, values: mx.array, start: int, scale: float) -> mx.array:
    """q [1, heads, n, d] at positions start.. over keys/values [1, kv_heads, start + n, d] (GQA)."""
    n = q.shape[2]
    mask = None if n == 1 else causal_block_mask(start, n)
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)


def attend_and_score(
    q: mx.array, keys: mx.array, values: mx.array, start: int, scale: float, scores: ScoreBuffer, layer: int
) -> mx.array:
    """Dense attention that also folds its probabilities into row `layer` of the running scores.

    The max (or sum) is over this call's queries, and over each group's query heads at "kv"
    granularity; only [units, start + n] per-call probabilities exist at any time.
    """
    _, heads, n, head_dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    qg = q.reshape(kv_heads, group * n, head_dim).astype(mx.float32)
    logits = (qg @ keys[0].astype(mx.float32).transpose(0, 2, 1)) * scale  # [kv, group * n, length]
    if n > 1:
        visible = mx.tile(causal_block_mask(start, n), (group, 1))
        logits = mx.where(visible, logits, -mx.inf)
    probs = mx.softmax(logits, axis=-1)
    out = (probs.astype(values.dtype) @ values[0]).reshape(1, heads, n, head_dim)
    per_unit = probs if scores.spec.granularity == "kv" else probs.reshape(heads, n, length)
    live = scores.buffer[layer, :, :length]
    if scores.spec.aggregation == "max":
        scores.buffer[layer, :, :length] = mx.maximum(live, per_unit.max(axis=1))
    else:
        scores.buffer[layer, :, :length] = live + per_unit.sum(axis=1)
    return out


def sparse_attend(q: mx.array, cache_k: mx.array, cache_v: mx.array, start: int, indices: mx.array, scale: float) -> mx.array:
    """The verification block attends to its index set plus itself (causally), by gather.

    cache_k/cache_v: the whole preallocated cache [1, kv_heads, capacity, d], the block already
    written; indices [units, kept] sorted positions < start, one row per KV head or query head.
    """
    _, heads, n, head_dim = q.shape
    kv_heads, capacity = cache_k.shape[1], cache_k.shape[2]
    units, kept = indices.shape
    unit_kv = mx.arange(units) // (units // kv_heads)
    block = mx.broadcast_to(mx.arange(start, start + n)[None], (units, n))
    rows = (mx.concatenate([indices, block], axis=1) + (unit_kv * capacity)[:, None]).reshape(-1)
    k = mx.take(cache_k.reshape(kv_heads * capacity, head_dim), rows, axis=0).reshape(1, units, kept + n, head_dim)
    v = mx.take(cache_v.reshape(kv_heads * capacity, head_dim), rows, axis=0).reshape(1, units, kept + n, head_dim)
    visible = mx.concatenate([mx.ones((n, kept), dtype=mx.bool_), mx.tril(mx.ones((n, n), dtype=mx.bool_))], axis=1)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=visible)
