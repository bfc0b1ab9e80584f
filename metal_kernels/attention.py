"""Launchers of the Metal attention kernels: sparse verification over per-unit index lists, its dense
variant, and the draft's dense attention that also folds its probabilities into the STS scores.

The kernel bodies are the .metal files beside this module (MLX's `mx.fast.metal_kernel` wraps each
in the signature it generates); their contracts are those of backends/mlx/attention.py's plain
path, which the tests compare them with, through the Linux executor in metal_kernels/emulator/.
The sources and kernel objects are built once at import, so a Mac compiles each variant once.

Selection stays with MLX's own `mx.argpartition` and `mx.sort` (backends/mlx/selection.py): one
pass over a [units, context] score row of float32 is a few hundred KB at 32K, which those kernels
read about once; a custom top-k would read the same bytes, and saves nothing worth a kernel.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import mlx.core as mx

HEAD_DIMS = (64, 128)
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
QUERIES_PER_SIMDGROUP = 8  # QMAX in split_attention.metal
MAX_SIMDGROUPS = 16  # per threadgroup: a tile of up to 128 queries reads each K/V row once
ROWS_PER_SPLIT = 256
MAX_SPLITS = 32
PARAMS = 8  # ints in split_attention.metal's params
ENABLED = os.environ.get("STS_EDGE_METAL_KERNELS", "1") != "0"


def _source(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.metal").read_text()


SPLIT_SOURCE, MERGE_SOURCE, FOLD_SOURCE = (_source(name) for name in ("split_attention", "merge_splits", "fold_scores"))


@dataclass(frozen=True)
class Kernels:
    """The three kernels, made by `metal_kernel` (mx.fast.metal_kernel, or the emulator's twin)."""

    split: Callable
    merge: Callable
    fold: Callable

    @classmethod
    def build(cls, metal_kernel: Callable, split: str = SPLIT_SOURCE, merge: str = MERGE_SOURCE,
              fold: str = FOLD_SOURCE) -> "Kernels":
        """The kernels from these sources (the tests plant bugs in copies)."""
        return cls(
            split=metal_kernel(name="sts_split_attention", input_names=["q", "k", "v", "indices", "offsets", "params", "scale"],
                               output_names=["o_part", "lse_part", "logits"], source=split),
            merge=metal_kernel(name="sts_merge_splits", input_names=["o_part", "lse_part", "params"],
                               output_names=["out", "lse"], source=merge),
            fold=metal_kernel(name="sts_fold_scores", input_names=["logits", "lse", "live", "params"],
                              output_names=["scores"], source=fold),
        )


KERNELS = Kernels.build(mx.fast.metal_kernel)  # building does not touch Metal; the first call compiles


def usable(q: mx.array) -> bool:
    """The kernels serve this query (mlx-lm's guard: Metal present and the default device the GPU),
    unless STS_EDGE_METAL_KERNELS=0 forces the plain path."""
    return (ENABLED and mx.metal.is_available() and mx.default_device() == mx.gpu and q.dtype in DTYPES
            and q.shape[-1] in HEAD_DIMS)


def _attention(q: mx.array, cache_k: mx.array, cache_v: mx.array, start: int, scale: float, indices: mx.array | None,
               offsets: mx.array | None, max_rows: int, lists: int, scores: bool, kernels: Kernels | None) -> tuple[mx.array, ...]:
    kernels = kernels or KERNELS  # looked up per call, so tests can swap in the emulator's
    _, heads, n, head_dim = q.shape
    kv_heads, capacity = cache_k.shape[1], cache_k.shape[2]
    if head_dim not in HEAD_DIMS or q.dtype not in DTYPES:
        raise ValueError(f"the Metal kernels take head_dim {HEAD_DIMS} and dtypes {DTYPES}, got {head_dim}, {q.dtype}")
    if start + n > capacity or heads % lists or lists % kv_heads:
        raise ValueError(f"{n} queries at {start} over a cache of {capacity} rows, {lists} lists for {heads} heads")
    dense = indices is None
    if dense:  # unused inputs of the dense variant
        indices = offsets = mx.zeros((1,), dtype=mx.int32)
    splits = max(1, min(MAX_SPLITS, math.ceil(max_rows / ROWS_PER_SPLIT)))
    simdgroups = min(MAX_SIMDGROUPS, math.ceil(heads // lists * n / QUERIES_PER_SIMDGROUP))
    tiles = math.ceil(heads // lists * n / (QUERIES_PER_SIMDGROUP * simdgroups))
    rows, length = heads * n, start + n
    params = mx.array([start, n, heads, kv_heads, lists, splits, tiles, capacity], dtype=mx.int32)
    o_part, lse_part, logits = kernels.split(
        inputs=[q.reshape(rows, head_dim), cache_k.reshape(kv_heads, capacity, head_dim),
                cache_v.reshape(kv_heads, capacity, head_dim), indices, offsets, params, mx.array([scale], dtype=mx.float32)],
        template=[("T", q.dtype), ("D", head_dim), ("BN", simdgroups), ("DENSE", dense), ("SCORES", scores)],
        grid=(32 * simdgroups, splits + 1, lists * tiles), threadgroup=(32 * simdgroups, 1, 1),
        output_shapes=[(splits + 1, rows, head_dim), (splits + 1, rows), (rows, length) if scores else (1,)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    out, lse = kernels.merge(
        inputs=[o_part, lse_part, mx.array([splits + 1, rows], dtype=mx.int32)],
        template=[("T", q.dtype), ("D", head_dim)], grid=(head_dim, rows, 1), threadgroup=(head_dim, 1, 1),
        output_shapes=[(rows, head_dim), (rows,)], output_dtypes=[q.dtype, mx.float32],
    )
    return out.reshape(1, heads, n, head_dim), lse, logits


def sparse_attention(q: mx.array, cache_k: mx.array, cache_v: mx.array, start: int, indices: mx.array,
                     offsets: mx.array, scale: float, *, max_rows: int, kernels: Kernels | None = None) -> mx.array:
    """q [1, heads, n, d] at positions start..start+n over the lists plus the block itself, causally.

    The cache is the whole [1, kv_heads, capacity, d] buffer, the block already written. List l
    (CSR: indices[offsets[l]:offsets[l + 1]], sorted positions < start) serves heads / lists
    consecutive query heads: one list per KV head, or per query head. `max_rows` bounds the
    lists' lengths (it sets the split count).
    """
    return _attention(q, cache_k, cache_v, start, scale, indices.astype(mx.int32), offsets.astype(mx.int32), max_rows,
                      offsets.shape[0] - 1, False, kernels)[0]


def dense_attention(q: mx.array, cache_k: mx.array, cache_v: mx.array, start: int, scale: float, *,
                    kernels: Kernels | None = None) -> mx.array:
    """q [1, heads, n, d] at positions start..start+n over cache rows 0..start+n, causally."""
    return _attention(q, cache_k, cache_v, start, scale, None, None, start, cache_k.shape[1], False, kernels)[0]


def dense_attention_with_scores(q: mx.array, cache_k: mx.array, cache_v: mx.array, start: int, scale: float,
                                live: mx.array, aggregation: str, *, kernels: Kernels | None = None) -> tuple[mx.array, mx.array]:
    """dense_attention, and the score row `live` [units, start + n] (float32; one unit per KV head or
    per query head) with this call's probabilities folded in by `aggregation` ("max" or "sum") over
    the block's queries and a unit's query heads: (out, new score row)."""
    if aggregation not in ("max", "sum"):
        raise ValueError(f"aggregation must be 'max' or 'sum', got {aggregation!r}")
    _, heads, n, _ = q.shape
    units, length = live.shape
    out, lse, logits = _attention(q, cache_k, cache_v, start, scale, None, None, start, cache_k.shape[1], True, kernels)
    (scores,) = (kernels or KERNELS).fold(
        inputs=[logits, lse, live.astype(mx.float32), mx.array([n, heads, units, length], dtype=mx.int32)],
        template=[("MAX", aggregation == "max")], grid=(length, units, 1), threadgroup=(min(256, length), 1, 1),
        output_shapes=[(units, length)], output_dtypes=[mx.float32],
    )
    return out, scores
