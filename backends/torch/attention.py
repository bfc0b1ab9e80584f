"""Attention over the live part of the KV cache: one entry, `attend`, for every forward.

A forward reads the cache in one of three ways: dense (causal over rows 0..start+n), dense while
folding its probabilities into the draft's running scores, or over index sets (verification
with a sparse policy). Decode-sized blocks go to kernels: the Triton ones on a GPU
(triton_kernels/), the C++ one on the CPU (cpu_kernels/decode_attention.cpp). Prefill, and a CPU
where the kernel cannot be built, take the plain PyTorch paths below, which are also the
kernels' references.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sts_edge.backend import ScoreSpec
from sts_edge.backends.torch.selection import csr_offsets
from sts_edge.cpu_kernels.extension import attention_kernel as cpu_attention_kernel

try:  # Triton ships for Linux and Windows; elsewhere only the plain paths exist.
    from sts_edge.triton_kernels.draft_attention import draft_attention_with_scores
    from sts_edge.triton_kernels.verify_attention import HEAD_DIMS, MAX_QUERIES, IndexLists, split_attention
except ImportError:
    split_attention = draft_attention_with_scores = IndexLists = None
    HEAD_DIMS, MAX_QUERIES = (), 0


@dataclass
class ScoreBuffer:
    """The draft's running attention scores for one round: [layers, units, capacity] float32 on the
    device (the DraftScores of the backend protocol)."""

    buffer: torch.Tensor
    spec: ScoreSpec

    def numpy(self, context: int):
        return self.buffer[:, :, :context].cpu().numpy()


def use_kernels(device: torch.device, dtype: torch.dtype, n: int, head_dim: int) -> bool:
    """Whether a forward of n tokens goes to the Triton kernels: a decode-sized block on a GPU,
    in a dtype and head size they are built for."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and head_dim in HEAD_DIMS and n <= MAX_QUERIES


def attend(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int | torch.Tensor, *,
           sets: torch.Tensor | None = None, scores: tuple[torch.Tensor, ScoreSpec] | None = None,
           bound: int | None = None, kernels: bool = False) -> torch.Tensor:
    """Attention of q [heads, n, head_dim] at positions start..start+n; returns [heads, n, head_dim].

    cache_k/cache_v: the whole cache [kv_heads, capacity, head_dim], the block already written.
    `sets` [units, kept] (int, sorted, < start): each unit reads those rows plus the block, causally.
    `scores` (this layer's score row [units, capacity], what to collect): fold this call's attention
    probabilities into it. `kernels`: the Triton paths, where `start` may be a device tensor with
    `bound` >= start (the form a CUDA graph captures).
    """
    kv_heads = cache_k.shape[0]
    if kernels and (sets is None or sets.shape[0] == kv_heads):  # the kernels take one list per KV head
        if sets is not None:
            lists = IndexLists(sets.to(torch.int32).flatten(), csr_offsets(kv_heads, sets.shape[1], q.device), sets.shape[1])
            return split_attention(q, cache_k, cache_v, start, lists, bound=bound, check=False)
        if scores is not None:
            row, spec = scores
            return draft_attention_with_scores(q, cache_k, cache_v, start, row, spec.aggregation, spec.granularity,
                                               bound=bound, check=False)
        if isinstance(start, torch.Tensor) or start > 0:
            return split_attention(q, cache_k, cache_v, start, bound=bound, check=False)
    if isinstance(start, torch.Tensor):
        raise ValueError("a device-side start needs the kernel path (per-KV-head sets, a GPU)")
    if q.device.type == "cpu" and q.shape[1] <= GROUPED_ROWS and cpu_kernel_reads(q, cache_k):
        # cpu_kernels/decode_attention.cpp: each KV head's rows read once for the whole block, and
        # every row's bits the single step's.
        kernel = cpu_attention_kernel()
        if sets is not None:
            return kernel(q.contiguous(), cache_k, cache_v, start, sets.long().contiguous())
        if scores is not None:
            row, spec = scores
            return kernel(q.contiguous(), cache_k, cache_v, start, None, row, spec.aggregation == "max",
                          spec.granularity != "kv")
        return kernel(q.contiguous(), cache_k, cache_v, start)
    keys, values = cache_k[:, : start + q.shape[1]], cache_v[:, : start + q.shape[1]]
    if sets is not None:
        return sparse_attend(q, cache_k, cache_v, start, sets.long())
    if scores is not None:
        row, spec = scores
        return attend_and_score(q, keys, values, start, row, spec.aggregation, spec.granularity)
    return dense_attend(q, keys, values, start)


def cpu_kernel_reads(q: torch.Tensor, cache_k: torch.Tensor) -> bool:
    """Whether cpu_kernels/decode_attention.cpp takes this attention: it was built here, and the
    dtype and head size are ones it reads (float32, bfloat16, float16; head_dim a multiple of 8)."""
    return (q.dtype in (torch.float32, torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0
            and cache_k.stride(-1) == 1 and cpu_attention_kernel() is not None)


def causal_block_mask(start: int, n: int, device: torch.device) -> torch.Tensor:
    """[n, start + n] bool: query i (at position start + i) sees keys 0..start + i."""
    keys = torch.arange(start + n, device=device)
    queries = torch.arange(start, start + n, device=device)
    return keys[None, :] <= queries[:, None]


def dense_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """q [heads, n, head_dim] at positions start.. over keys/values [kv_heads, start + n, head_dim].

    Query heads are grouped over KV heads (GQA) without copying the cache.
    """
    n = q.shape[1]
    if q.device.type == "cpu" and n <= GROUPED_ROWS:
        # (Where our CPU kernel is not built.) Row by row, each with a single step's shapes:
        # PyTorch's CPU kernels (a bfloat16 matmul on AMX, softmax's vector loops) round differently
        # for different lengths, and a verification block's logits must equal the single steps' bit
        # for bit (speculative greedy output is the target's own). Each row reads the keys again.
        return torch.cat([grouped_attend(q[:, i : i + 1], keys[:, : start + i + 1], values[:, : start + i + 1], None)
                          for i in range(n)], dim=1)
    mask = None if n == 1 else causal_block_mask(start, n, q.device)
    grouped = q.shape[0] != keys.shape[0]
    if q.device.type == "cpu":
        # Prefill chunks: with a batch axis PyTorch takes its fused CPU kernel, which groups the
        # query heads over the KV heads in place and never holds a chunk's [heads, n, length]
        # probabilities; without one it takes the reference path, which repeats the keys and values
        # for every query head (benchmarks/README.md, "A CPU with AVX-512 but no AMX").
        return F.scaled_dot_product_attention(q[None], keys[None], values[None],
                                              attn_mask=None if mask is None else mask[None, None], enable_gqa=grouped)[0]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=grouped)


# On the CPU, PyTorch's attention on 3-D tensors with grouped query heads takes its reference
# (math) path, which repeats the keys and values for every query head; decode-sized blocks multiply
# each KV head's rows with all of its query heads' rows at once instead (benchmarks/README.md, "The
# CPU path").
GROUPED_ROWS = 16


def grouped_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [heads, n, head_dim] over keys/values [units, length, head_dim] (each unit serving
    heads / units query heads), `mask` [n, length] what each query row sees: [heads, n, head_dim]."""
    heads, n, head_dim = q.shape
    units, length = keys.shape[0], keys.shape[1]
    group = heads // units
    # Contiguous whatever q's strides: the matmul's kernel, and so its rounding, depends on them.
    rows = q.reshape(units, group * n, head_dim).contiguous()
    logits = per_unit_matmul(rows, keys.transpose(1, 2)).float() * head_dim**-0.5
    if mask is not None:
        logits = logits.masked_fill(~mask.repeat(group, 1), float("-inf"))
    probs = logits.softmax(dim=-1).to(values.dtype)
    return per_unit_matmul(probs, values).reshape(heads, n, head_dim)


def per_unit_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b over a leading axis of KV heads. The cache's live rows are a strided slice of it, which
    PyTorch's CPU bmm copies whole before a bfloat16 or float16 product (not a float32 one): one
    product per KV head reads them in place."""
    if b.dtype == torch.float32:
        return a @ b
    return torch.stack([a[u] @ b[u] for u in range(a.shape[0])])


def attend_and_score(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    scores: torch.Tensor,
    aggregation: str,
    granularity: str,
) -> torch.Tensor:
    """Dense attention that also folds its probabilities into a running score row.

    scores: [units, capacity] float32 for this layer (units: KV heads or query heads), updated in
    place with the max (or sum) over this call's queries, and over each group's query heads at
    "kv" granularity. Only [units, start + n] per-call probabilities exist at any time.
    """
    heads, n, head_dim = q.shape
    kv_heads, length = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    qg = q.reshape(kv_heads, group * n, head_dim)
    logits = (qg.float() @ keys.float().transpose(1, 2)) * head_dim**-0.5  # [kv, group * n, length]
    if n > 1:
        logits = logits.masked_fill(~causal_block_mask(start, n, q.device).repeat(group, 1), float("-inf"))
    probs = logits.softmax(dim=-1)
    out = (probs.to(values.dtype) @ values).reshape(heads, n, head_dim)
    per_unit = probs if granularity == "kv" else probs.reshape(heads, n, length)
    live = scores[:, :length]
    if aggregation == "max":
        torch.maximum(live, per_unit.amax(dim=1), out=live)
    else:
        live += per_unit.sum(dim=1)
    return out


def sparse_attend(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    start: int,
    indices: torch.Tensor,
) -> torch.Tensor:
    """The verification block attends to its index set plus itself (causally), by gather.

    q [heads, n, head_dim] at positions start..start+n; cache_k/cache_v: the whole preallocated
    cache [kv_heads, capacity, head_dim], the block already written; indices [units, kept] sorted
    positions < start, one row per KV head or per query head.
    """
    heads, n, head_dim = q.shape
    kv_heads, capacity = cache_k.shape[0], cache_k.shape[1]
    units, kept = indices.shape
    # Each unit reads from its own KV head: unit u is KV head u, or the KV head of query head u.
    unit_kv = torch.arange(units, device=q.device) // (units // kv_heads)
    block = torch.arange(start, start + n, device=q.device)
    rows = torch.cat((indices, block.expand(units, n)), dim=1) + (unit_kv * capacity)[:, None]
    k = cache_k.reshape(kv_heads * capacity, head_dim)[rows]  # [units, kept + n, head_dim]
    v = cache_v.reshape(kv_heads * capacity, head_dim)[rows]
    mask = torch.ones(n, kept + n, dtype=torch.bool, device=q.device)
    mask[:, kept:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if q.device.type == "cpu" and n <= GROUPED_ROWS:
        return grouped_attend(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=units != heads)
