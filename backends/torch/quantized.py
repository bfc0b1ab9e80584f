"""Layers whose weights stay in mlx-lm's affine format on the GPU (sts_edge/quantization.py).

The names of their tensors are the checkpoint's (`X.weight` packed, `X.scales`, `X.biases`, and
`X.bias` when the layer has one), so a quantized checkpoint loads with a plain state-dict
assignment once `swap_in_quantized` has put these layers where the checkpoint has scales; `repack`
then lays the same bytes out for the kernel. Products run through
triton_kernels/quantized_matmul.py; nothing is decoded ahead of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sts_edge.triton_kernels.quantized_matmul import QuantizedWeight, dequantize, quantized_matmul


@dataclass(frozen=True)
class Int4PackWeight:
    """A 4-bit weight in PyTorch's own int4 layout, for `_weight_int4pack_mm` on a GPU (the tinygemm
    kernel gpt-fast and torchao use) or `_weight_int4pack_mm_for_cpu` on the CPU. Their rule
    w = (q - 8) * scale + zero is mlx-lm's w = q * scale + bias with zero = bias + 8 * scale."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # [inputs / group_size, outputs, 2]
    group_size: int

    @classmethod
    def from_quantized(cls, weight: QuantizedWeight, dtype: torch.dtype, chunk: int = 4096) -> "Int4PackWeight":
        """Repacked `chunk` outputs at a time: the values pass through int32, 8x the packed bytes,
        which for a whole LM head would be gigabytes at once. The scales are kept in `dtype`, the
        activations' (the GPU kernel takes bf16 only), on the CPU always in bfloat16 (`matmul`)."""
        outputs, inputs = weight.shape
        cpu = not weight.packed.is_cuda
        inner_k_tiles = 8 if inputs % 1024 == 0 else 4 if inputs % 512 == 0 else 2
        shifts = torch.arange(0, 32, 4, device=weight.packed.device, dtype=torch.int32)
        parts = []
        for first in range(0, outputs, chunk):
            words = weight.packed[:, first : first + chunk].t()
            values = ((words[:, :, None] >> shifts) & 15).reshape(words.shape[0], inputs)  # [outputs, inputs]
            if cpu:
                parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.contiguous(), inner_k_tiles))
            else:
                as_bytes = (values[:, ::2] << 4 | values[:, 1::2]).to(torch.uint8)
                parts.append(torch.ops.aten._convert_weight_to_int4pack(as_bytes, inner_k_tiles))
        packed = torch.cat(parts) if len(parts) > 1 else parts[0]
        if cpu:
            # The CPU kernel's float32 path is a plain loop, 5-40x slower than its bfloat16 one even
            # where bfloat16 is emulated (AVX2): float32 models multiply through it in bfloat16.
            dtype = torch.bfloat16
        scales, biases = weight.scales.float(), weight.biases.float()  # [groups, outputs]
        scales_and_zeros = torch.stack((scales, biases + 8 * scales), dim=-1).to(dtype).contiguous()
        return cls(packed, scales_and_zeros, weight.group_size)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_and_zeros)
        if self.scales_and_zeros.dtype == torch.bfloat16 and x.dtype != torch.bfloat16:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), self.packed, self.group_size,
                                                                self.scales_and_zeros).to(x.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)


def int4pack_readable(device: torch.device, bits: int, group_size: int, inputs: int, outputs: int,
                      dtype: torch.dtype) -> bool:
    """Whether PyTorch's int4 kernel reads such a weight: 4 bits, groups it knows; on a GPU bf16
    activations, inputs a multiple of 256 and outputs of 8; on the CPU float32 or bf16 activations
    and outputs a multiple of 16 (their tiles)."""
    if bits != 4 or group_size not in (32, 64, 128, 256) or inputs % group_size:
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and inputs % 256 == 0 and outputs % 8 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm")
    return dtype in (torch.float32, torch.bfloat16) and outputs % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int4pack_available(weight: QuantizedWeight, dtype: torch.dtype) -> bool:
    outputs, inputs = weight.shape
    return int4pack_readable(weight.packed.device, weight.bits, weight.group_size, inputs, outputs, dtype)


class QuantizedLinear(nn.Module):
    """A linear layer whose weight stays quantized. It loads mlx-lm's tensors by their checkpoint
    names; `repack` then lays the same bytes out for the kernel that multiplies with them: PyTorch's
    int4 kernel where it reads the weight (it measures faster than ours at decode sizes;
    benchmarks/README.md), else triton_kernels/quantized_matmul.py."""

    def __init__(self, inputs: int, outputs: int, bits: int, group_size: int, bias: bool):
        super().__init__()
        self.inputs, self.outputs, self.bits, self.group_size = inputs, outputs, bits, group_size
        self.register_buffer("weight", torch.empty(outputs, inputs * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(outputs, inputs // group_size))
        self.register_buffer("biases", torch.empty(outputs, inputs // group_size))
        self.bias = nn.Parameter(torch.empty(outputs)) if bias else None
        self.packed: QuantizedWeight | Int4PackWeight | None = None

    def repack(self, dtype: torch.dtype) -> None:
        """Once, after loading: the kernel's layout replaces the checkpoint's (activations in `dtype`)."""
        weight = QuantizedWeight.from_mlx(self.weight, self.scales, self.biases, self.bits, self.group_size)
        self.weight = self.scales = self.biases = None
        self.packed = Int4PackWeight.from_quantized(weight, dtype) if int4pack_available(weight, dtype) else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.inputs)
        y = self.packed.matmul(flat) if isinstance(self.packed, Int4PackWeight) else \
            quantized_matmul(flat, self.packed, check=False)
        y = y.reshape(*x.shape[:-1], self.outputs)
        return y + self.bias if self.bias is not None else y


class QuantizedEmbedding(nn.Module):
    """An embedding table kept quantized: looked-up rows are decoded; as the LM head (tied
    embeddings) it is a quantized product."""

    def __init__(self, rows: int, dim: int, bits: int, group_size: int):
        super().__init__()
        self.rows, self.dim, self.bits, self.group_size = rows, dim, bits, group_size
        self.register_buffer("weight", torch.empty(rows, dim * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(rows, dim // group_size))
        self.register_buffer("biases", torch.empty(rows, dim // group_size))
        self.packed: QuantizedWeight | None = None
        self.head: Int4PackWeight | None = None

    def repack(self, dtype: torch.dtype, as_head: bool = False) -> None:
        self.packed = QuantizedWeight.from_mlx(self.weight, self.scales, self.biases, self.bits, self.group_size)
        self.weight = self.scales = self.biases = None
        # As the LM head (tied embeddings), PyTorch's int4 kernel where it reads the table: a second,
        # int4 copy of it (its layout cannot be looked up by row), which an untied model never holds.
        if as_head and int4pack_available(self.packed, dtype):
            self.head = Int4PackWeight.from_quantized(self.packed, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize(self.packed, rows=ids)

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.matmul(x) if self.head is not None else quantized_matmul(x, self.packed, check=False)


def swap_in_quantized(model: nn.Module, settings: dict[str, tuple[int, int]]) -> None:
    """Replace each nn.Linear / nn.Embedding at a module path in `settings` ({path: (group_size,
    bits)}) by its quantized counterpart (on the meta device, before the weights are assigned)."""
    for path, (group_size, bits) in settings.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = getattr(parent, name)
        with torch.device("meta"):
            if isinstance(layer, nn.Embedding):
                swapped = QuantizedEmbedding(layer.num_embeddings, layer.embedding_dim, bits, group_size)
            else:
                swapped = QuantizedLinear(layer.in_features, layer.out_features, bits, group_size, layer.bias is not None)
        setattr(parent, name, swapped)


def fuse_quantized(*layers: QuantizedLinear) -> QuantizedLinear | None:
    """One quantized layer stacking the layers' outputs (one product for q/k/v, or gate/up); None
    when their formats differ. Called after `repack`; the model then runs the stacked layer on every
    path, and the layers give up their tensors, so nothing is stored twice."""
    first = layers[0]
    if any((layer.bits, layer.group_size, layer.inputs, type(layer.packed)) !=
           (first.bits, first.group_size, first.inputs, type(first.packed)) for layer in layers):
        return None
    has_bias = first.bias is not None
    with torch.device("meta"):
        fused = QuantizedLinear(first.inputs, sum(layer.outputs for layer in layers), first.bits, first.group_size, has_bias)
    fused.weight = fused.scales = fused.biases = None
    with torch.no_grad():
        if isinstance(first.packed, Int4PackWeight):  # the layout's outputs lead, its scales [groups, outputs, 2]
            fused.packed = Int4PackWeight(torch.cat([layer.packed.packed for layer in layers]),
                                          torch.cat([layer.packed.scales_and_zeros for layer in layers], dim=1),
                                          first.group_size)
        else:
            fused.packed = QuantizedWeight(*(torch.cat([getattr(layer.packed, name) for layer in layers], dim=1)
                                             for name in ("packed", "scales", "biases")), first.bits, first.group_size)
        if has_bias:
            fused.bias = nn.Parameter(torch.cat([layer.bias for layer in layers]), requires_grad=False)
    for layer in layers:
        layer.packed, layer.bias = None, None
    return fused
