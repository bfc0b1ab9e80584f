"""The draft's KV cache in 8 or 4 bits: group-wise affine along head_dim, one scale and one bias per
group, value = scale * q + bias + centre (mlx-lm's convention for its quantized KV cache and our
weights', plus a fixed per-channel centre), rows quantized once as they are written.

Only the draft's cache is ever quantized: its attention chooses STS's sets and proposes tokens,
so its precision may change acceptance but never the output; the target's cache stays exact,
since its selected rows are what verification reads. Rolling back stays forgetting a number.

Two choices keep int8's error small enough for the draft's predictions
(benchmarks/README.md, "The draft's KV cache in 8 and 4 bits"):
  * Each channel's centre (per KV head, the mean of that channel over the rows of the write that
    starts at row 0, i.e. the prompt's first chunk) is subtracted before the groups are quantized
    and added back when decoding. Qwen2's keys have a few channels that sit at a near-constant
    -145 or +130 (the low-frequency rotary pairs, which barely turn); in a group of 32 along
    head_dim they set the step for all the small channels beside them. Centred, a group spans a
    few units. The centres only change precision, never range (the groups cover whatever is left),
    so rows written later, after a rollback or far from the prompt, are still decoded correctly.
  * Scales, biases and centres are float32 and decoding is float32, rounded once to the model's
    dtype: a bfloat16 bias of -100 is off by up to 0.25 for the whole group. Once centred, biases
    are small and this matters less (the demo draft's logit error 1.4% against 1.6% with bfloat16
    scales and biases), for 4 more bytes per group of each row.
"""

from __future__ import annotations

import torch
from torch import nn

from sts_edge.backend import KV_GROUP_SIZE


def quantize_rows(x: torch.Tensor, bits: int, group_size: int = KV_GROUP_SIZE,
                  centres: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., head_dim] (minus `centres`, broadcast against it, when given) -> (values uint8 [...,
    head_dim * bits / 8], scales, biases float32 [..., head_dim / group_size]). Each group maps its
    [min, max] onto 0..2^bits - 1; 4-bit values pack two to a byte, the even position in the low
    nibble (mlx-lm's uint32 words, byte by byte)."""
    x = x.float() if centres is None else x.float() - centres
    groups = x.unflatten(-1, (-1, group_size))
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    scales = (high - low) / levels
    steps = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = ((groups - low) / steps).round_().clamp_(0, levels).to(torch.uint8).flatten(-2)
    if bits == 4:
        values = values[..., 0::2] | (values[..., 1::2] << 4)
    return values, scales.squeeze(-1), low.squeeze(-1)


def dequantize_rows(values: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                    group_size: int = KV_GROUP_SIZE, centres: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of quantize_rows: arithmetic in float32, rounded once to `dtype`."""
    if bits == 4:
        values = torch.stack((values & 15, values >> 4), dim=-1).flatten(-2)
    groups = values.float().unflatten(-1, (-1, group_size))
    decoded = (groups * scales.float()[..., None] + biases.float()[..., None]).flatten(-2)
    if centres is not None:
        decoded = decoded + centres.float()
    return decoded.to(dtype)


class QuantizedKVCache(nn.Module):
    """Preallocated quantized keys and values for `capacity` positions, written by position:
    values [kv_heads, capacity, head_dim * bits / 8] uint8, scales and biases [kv_heads, capacity,
    head_dim / group_size] float32, centres [kv_heads, head_dim] float32; rows decode to `dtype`
    (the model's). Like KVCache it keeps no length."""

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
            for part, shape in (("scales", (capacity, groups)), ("biases", (capacity, groups)), ("centres", (head_dim,))):
                self.register_buffer(f"{name}_{part}", torch.zeros(kv_heads, *shape, dtype=torch.float32, device=device),
                                     persistent=False)

    @property
    def capacity(self) -> int:
        return self.k_values.shape[1]

    def write(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v [kv_heads, n, head_dim] into rows start..start+n (`start` may be a
        one-element device tensor: the write is then an index_copy_, which a CUDA graph captures).
        A write at row 0 (a host int: a new prompt, every row after it stale) sets the centres."""
        n = k.shape[1]
        for name, x in (("k", k), ("v", v)):
            centres = getattr(self, f"{name}_centres")
            if not isinstance(start, torch.Tensor) and start == 0:
                centres.copy_(x.float().mean(1))
            parts = quantize_rows(x, self.bits, self.group_size, centres[:, None])
            for suffix, part in zip(("values", "scales", "biases"), parts):
                buffer = getattr(self, f"{name}_{suffix}")
                if isinstance(start, torch.Tensor):
                    buffer.index_copy_(1, start.long() + torch.arange(n, device=start.device), part)
                else:
                    buffer[:, start : start + n] = part

    def rows(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows 0..length, decoded: [kv_heads, length, head_dim] in `dtype`."""
        return tuple(dequantize_rows(getattr(self, f"{name}_values")[:, :length], getattr(self, f"{name}_scales")[:, :length],
                                     getattr(self, f"{name}_biases")[:, :length], self.bits, self.group_size,
                                     getattr(self, f"{name}_centres")[:, None], self.dtype)
                     for name in ("k", "v"))

    def kernel_writes(self) -> bool:
        """Whether layer_ops.rope_and_cache can write rows into this cache (after its centres are set)."""
        from sts_edge.triton_kernels.layer_ops import writes_quantized_rows

        return writes_quantized_rows(self.kernel_rows()[0], self.k_values.shape[2] * 8 // self.bits)

    def kernel_rows(self):
        """Keys and values as the Triton kernels read them (QuantizedRows): decoded as loaded."""
        from sts_edge.triton_kernels.verify_attention import QuantizedRows

        return tuple(QuantizedRows(getattr(self, f"{name}_values"), getattr(self, f"{name}_scales"),
                                   getattr(self, f"{name}_biases"), getattr(self, f"{name}_centres"), self.bits,
                                   self.group_size) for name in ("k", "v"))
