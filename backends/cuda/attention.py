"""Attention over the live part of the KV cache.

The plain path is PyTorch's scaled_dot_product_attention. It is also the reference that the
Triton kernels (triton_kernels/) are tested against when they take over the hot paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_block_mask(start: int, n: int, device: torch.device) -> torch.Tensor:
    """[n, start + n] bool: query i (at position start + i) sees keys 0..start + i."""
    keys = torch.arange(start + n, device=device)
    queries = torch.arange(start, start + n, device=device)
    return keys[None, :] <= queries[:, None]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """q [heads, n, head_dim] at positions start.. over keys/values [kv_heads, start + n, head_dim].

    Query heads are grouped over KV heads (GQA) without copying the cache.
    """
    n = q.shape[1]
    mask = None if n == 1 else causal_block_mask(start, n, q.device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[0] != keys.shape[0])
