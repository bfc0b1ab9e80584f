"""The draft's decode attention that also produces STS importance scores.

One pass of the split attention kernel (verify_attention.py, dense mode) computes the output and,
on the side, stores each query head's probabilities for every row it reads, in float16 relative to
the running max of their tile (which it stores too): the only time per-head values at full context
reach device memory, at half the bytes of float32 logits. The merge kernel yields each query's
log2-sum-exp, and a light fold kernel rescales them to probabilities,
p = 2^(tile max - lse) * relative p, reduces them over the block's queries (and over a group's query
heads at "kv" granularity) by max or sum, and folds the result into the running score row
[units, capacity] in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sts_edge.triton_kernels.verify_attention import (
    KernelInputError,
    Launch,
    ProbabilityOutputs,
    QuantizedRows,
    dense_tile_rows,
    pdl_available,
    split_attention,
)

AGGREGATIONS = ("max", "sum")
GRANULARITIES = ("kv", "query")


@triton.jit
def _fold_scores_kernel(
    Probs, TileMax, Lse, Scores,
    stride_ph, stride_pn, stride_th, stride_tn, stride_su, Start, block_slot,
    N: tl.constexpr, HEADS_PER_UNIT: tl.constexpr, TILE_ROWS: tl.constexpr, BLOCK_L: tl.constexpr, SUM: tl.constexpr,
    START_IN_MEMORY: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # launched while the merge kernel runs: no memory access before it has ended
        tl.extra.cuda.gdc_wait()
    if START_IN_MEMORY:
        length = tl.load(Start) + N
    else:
        length = Start + N
    unit = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    ok = pos < length
    tile = tl.where(pos < length - N, pos // TILE_ROWS, block_slot)  # the block's rows have their own max
    folded = tl.zeros([BLOCK_L], tl.float32)
    for h in tl.static_range(HEADS_PER_UNIT):
        head = unit * HEADS_PER_UNIT + h
        for i in tl.static_range(N):
            lse = tl.load(Lse + head * N + i)
            top = tl.load(TileMax + head * stride_th + i * stride_tn + tile, mask=ok, other=float("-inf"))
            relative = tl.load(Probs + head * stride_ph + i * stride_pn + pos, mask=ok, other=0.0).to(tl.float32)
            p = tl.math.exp2(top - lse) * relative
            folded = folded + p if SUM else tl.maximum(folded, p)
    current = tl.load(Scores + unit * stride_su + pos, mask=ok, other=0.0)
    tl.store(Scores + unit * stride_su + pos, current + folded if SUM else tl.maximum(current, folded), mask=ok)


def draft_attention_with_scores(
    q: torch.Tensor,
    cache_k: torch.Tensor | QuantizedRows,
    cache_v: torch.Tensor | QuantizedRows,
    start: int | torch.Tensor,
    scores: torch.Tensor,
    aggregation: str = "max",
    granularity: str = "kv",
    *,
    bound: int | None = None,
    num_splits: int | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Dense attention of q [heads, n, head_dim] at positions start..start+n; updates `scores`.
    The caches are in q's dtype or quantized (QuantizedRows: a draft's 8- or 4-bit cache).

    scores: [units, capacity] float32 (units: KV heads, or query heads at "query" granularity),
    rows 0..start+n folded with the max (or sum) of this call's attention probabilities.
    Returns [heads, n, head_dim], as split_attention does. A device-side `start` (for CUDA
    graphs) needs `bound`, as in split_attention.
    """
    heads, n, _ = q.shape
    kv_heads = cache_k.shape[0]
    in_memory = isinstance(start, torch.Tensor)
    if in_memory and bound is None:
        raise KernelInputError("a device-side start needs `bound`, the largest start the launch must cover")
    reach = bound if in_memory else start
    if check and not in_memory:
        if aggregation not in AGGREGATIONS or granularity not in GRANULARITIES:
            raise KernelInputError(
                f"aggregation must be one of {AGGREGATIONS} and granularity one of {GRANULARITIES}, "
                f"got {aggregation!r} and {granularity!r}"
            )
        units = kv_heads if granularity == "kv" else heads
        if scores.dtype != torch.float32 or scores.dim() != 2 or scores.shape[0] != units or scores.shape[1] < start + n:
            raise KernelInputError(f"scores must be float32 [{units}, >= {start + n}], got {scores.dtype} {tuple(scores.shape)}")
        if scores.stride(1) != 1:
            raise KernelInputError("score rows must be contiguous")
    length = reach + n
    tile = dense_tile_rows(cache_k)
    block_slot = triton.cdiv(reach, tile)
    tile_probs = torch.empty(heads, n, length, dtype=torch.float16, device=q.device)
    tile_max = torch.empty(heads, n, block_slot + 1, dtype=torch.float32, device=q.device)
    lse = torch.empty(heads * n, dtype=torch.float32, device=q.device)
    # The fold is launched with programmatic dependent launch, so it is ready to run as the merge ends.
    pdl = pdl_available(q.device)
    out = split_attention(q, cache_k, cache_v, start, probs=ProbabilityOutputs(tile_probs, tile_max, lse), bound=bound,
                          launch=Launch(num_splits=num_splits, block_n=tile, pdl=pdl, early_next=True), check=check)
    heads_per_unit = heads // kv_heads if granularity == "kv" else 1
    block_l = 1024
    _fold_scores_kernel[(heads // heads_per_unit, triton.cdiv(length, block_l))](
        tile_probs, tile_max, lse, scores, *tile_probs.stride()[:2], *tile_max.stride()[:2], scores.stride(0), start,
        block_slot, N=n, HEADS_PER_UNIT=heads_per_unit, TILE_ROWS=tile, BLOCK_L=block_l, SUM=aggregation == "sum", START_IN_MEMORY=in_memory,
        USE_PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    return out
