"""The draft's KV cache in 8 or 4 bits: group-wise affine along head_dim, one scale and one bias per
group, value = scale * q + bias (mlx-lm's convention for its quantized KV cache and our weights'),
rows quantized once as they are written.

Only the draft's cache is ever quantized: its attention chooses STS's sets and proposes tokens,
so its precision may change acceptance but never the output; the target's cache stays exact,
since its selected rows are what verification reads. Rolling back stays forgetting a number.
"""

from __future__ import annotations

import torch
from torch import nn

from sts_edge.backend import KV_GROUP_SIZE


def quantize_rows(x: torch.Tensor, bits: int, group_size: int = KV_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (values uint8 [..., head_dim * bits / 8], scales, biases [..., head_dim /
    group_size] in x's dtype). Each group maps its [min, max] onto 0..2^bits - 1; 4-bit values pack
    two to a byte, the even position in the low nibble (mlx-lm's uint32 words, byte by byte)."""
    groups = x.float().unflatten(-1, (-1, group_size))
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    scales = (high - low) / levels
    steps = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = ((groups - low) / steps).round_().clamp_(0, levels).to(torch.uint8).flatten(-2)
    if bits == 4:
        values = values[..., 0::2] | (values[..., 1::2] << 4)
    # The stored scale and bias are rounded to x's dtype: decoding uses exactly what is stored.
    return values, scales.squeeze(-1).to(x.dtype), low.squeeze(-1).to(x.dtype)


def dequantize_rows(values: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                    group_size: int = KV_GROUP_SIZE) -> torch.Tensor:
    """The inverse of quantize_rows, in the scales' dtype (arithmetic in float32)."""
    if bits == 4:
        values = torch.stack((values & 15, values >> 4), dim=-1).flatten(-2)
    groups = values.float().unflatten(-1, (-1, group_size))
    decoded = groups * scales.float()[..., None] + biases.float()[..., None]
    return decoded.flatten(-2).to(scales.dtype)


class QuantizedKVCache(nn.Module):
    """Preallocated quantized keys and values for `capacity` positions, written by position:
    values [kv_heads, capacity, head_dim * bits / 8] uint8, scales and biases [kv_heads, capacity,
    head_dim / group_size] in `dtype` (the model's). Like KVCache it keeps no length."""

    def __init__(self, kv_heads: int, capacity: int, head_dim: int, bits: int, dtype: torch.dtype,
                 device: torch.device, group_size: int = KV_GROUP_SIZE):
        super().__init__()
        if bits not in (8, 4):
            raise ValueError(f"a quantized KV cache has 8 or 4 bits, not {bits}")
        if head_dim % group_size:
            raise ValueError(f"head_dim {head_dim} is not a multiple of the KV group size {group_size}")
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        width, groups = head_dim * bits // 8, head_dim // group_size
        for name in ("k", "v"):
            self.register_buffer(f"{name}_values", torch.zeros(kv_heads, capacity, width, dtype=torch.uint8, device=device),
                                 persistent=False)
            self.register_buffer(f"{name}_scales", torch.zeros(kv_heads, capacity, groups, dtype=dtype, device=device),
                                 persistent=False)
            self.register_buffer(f"{name}_biases", torch.zeros(kv_heads, capacity, groups, dtype=dtype, device=device),
                                 persistent=False)

    @property
    def capacity(self) -> int:
        return self.k_values.shape[1]

    def write(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v [kv_heads, n, head_dim] into rows start..start+n (`start` may be a
        one-element device tensor: the write is then an index_copy_, which a CUDA graph captures)."""
        n = k.shape[1]
        for name, x in (("k", k), ("v", v)):
            parts = quantize_rows(x, self.bits, self.group_size)
            for suffix, part in zip(("values", "scales", "biases"), parts):
                buffer = getattr(self, f"{name}_{suffix}")
                if isinstance(start, torch.Tensor):
                    buffer.index_copy_(1, start.long() + torch.arange(n, device=start.device), part)
                else:
                    buffer[:, start : start + n] = part

    def rows(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows 0..length, decoded: [kv_heads, length, head_dim] in `dtype`."""
        return tuple(dequantize_rows(getattr(self, f"{name}_values")[:, :length], getattr(self, f"{name}_scales")[:, :length],
                                     getattr(self, f"{name}_biases")[:, :length], self.bits, self.group_size)
                     for name in ("k", "v"))

    def kernel_rows(self):
        """Keys and values as the Triton kernels read them (QuantizedRows): decoded as loaded."""
        from sts_edge.triton_kernels.verify_attention import QuantizedRows

        return tuple(QuantizedRows(getattr(self, f"{name}_values"), getattr(self, f"{name}_scales"),
                                   getattr(self, f"{name}_biases"), self.bits, self.group_size) for name in ("k", "v"))
