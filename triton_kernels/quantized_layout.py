"""The layout the quantized kernels read, and its decoding, in plain torch: what a CPU-only install
(no Triton) needs of triton_kernels/quantized_matmul.py.

mlx-lm stores W [outputs, inputs] as uint32 words [outputs, inputs * bits / 32] (values from the
least significant bits up) and per group of `group_size` consecutive inputs a scale and a bias,
W[j, i] = scale * q + bias. `QuantizedWeight.from_mlx` transposes them once, so that the kernel's
loads run along the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight in the kernel's layout: the transpose of mlx-lm's (see the module docstring)."""

    packed: torch.Tensor  # int32 [inputs * bits / 32, outputs] (uint32's bits; torch's uint32 has few kernels)
    scales: torch.Tensor  # [inputs / group_size, outputs]
    biases: torch.Tensor
    bits: int
    group_size: int

    @classmethod
    def from_mlx(cls, packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                 group_size: int) -> "QuantizedWeight":
        """The one-time repacking at load: mlx-lm's [outputs, ...] tensors, transposed."""
        return cls(packed.view(torch.int32).t().contiguous(), scales.t().contiguous(), biases.t().contiguous(), bits,
                   group_size)

    @property
    def shape(self) -> tuple[int, int]:
        """(outputs, inputs) of W."""
        return self.packed.shape[1], self.packed.shape[0] * 32 // self.bits


def dequantize(weight: QuantizedWeight, rows: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W [outputs, inputs] (or the outputs `rows` of it, as an embedding looks up) decoded in `dtype`
    (default: the scales' dtype), with torch ops."""
    packed, scales, biases = weight.packed, weight.scales, weight.biases
    if rows is not None:
        packed, scales, biases = packed[:, rows], scales[:, rows], biases[:, rows]
    words, outputs = packed.shape
    per_word = 32 // weight.bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * weight.bits
    values = (packed.t()[:, :, None] >> shifts) & ((1 << weight.bits) - 1)  # [outputs, words, per_word]
    inputs = words * per_word
    grouped = values.reshape(outputs, inputs // weight.group_size, weight.group_size).float()
    decoded = grouped * scales.t().float()[..., None] + biases.t().float()[..., None]
    return decoded.reshape(outputs, inputs).to(dtype or scales.dtype)
