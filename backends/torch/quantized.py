"""Layers whose weights stay quantized (mlx-lm's affine format, sts_edge/quantization.py).

The names of their tensors are the checkpoint's (`X.weight` packed, `X.scales`, `X.biases`, and
`X.bias` when the layer has one), so a quantized checkpoint loads with a plain state-dict
assignment once `swap_in_quantized` has put these layers where the checkpoint has scales; `repack`
then hands the same bytes to the kernel that multiplies with them: on the CPU our own
(cpu_kernels/affine_matmul.cpp, the checkpoint's layout as it is); on a GPU, 4- and 8-bit layers
with groups of 64 or 128 go to triton_kernels/tensor_core_matmul.py, other 4-bit ones to PyTorch's
int4 kernel where it reads them, the rest to triton_kernels/quantized_matmul.py. Nothing is decoded
ahead of the products.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn

from sts_edge.cpu_kernels.extension import amx_ready as cpu_amx_ready, kernel as cpu_kernel
from sts_edge.triton_kernels.quantized_layout import QuantizedWeight, dequantize

try:  # the GPU's products; a CPU-only install has no Triton, and its packed layers use the CPU's kernels
    from sts_edge.triton_kernels.quantized_matmul import quantized_matmul
    from sts_edge.triton_kernels.tensor_core_matmul import BITS as TENSOR_CORE_BITS
    from sts_edge.triton_kernels.tensor_core_matmul import GROUP_SIZES as TENSOR_CORE_GROUPS
    from sts_edge.triton_kernels.tensor_core_matmul import TensorCoreWeight, reserve_workspace
except ImportError:
    quantized_matmul = TensorCoreWeight = reserve_workspace = None
    TENSOR_CORE_BITS = TENSOR_CORE_GROUPS = ()


def triton_layouts(device: torch.device) -> bool:
    """Whether packed layers on `device` take the Triton kernels' layouts (a GPU; tests run them on
    the CPU through Triton's interpreter)."""
    return device.type == "cuda"


def tensor_core_reads(bits: int, group_size: int, inputs: int, dtype: torch.dtype) -> bool:
    """Whether triton_kernels/tensor_core_matmul.py multiplies such a weight: 4 or 8 bits, groups of
    64 or 128, 16-bit activations."""
    return (bits in TENSOR_CORE_BITS and group_size in TENSOR_CORE_GROUPS and inputs % group_size == 0
            and dtype in (torch.bfloat16, torch.float16))


@dataclass(frozen=True)
class CpuAffineWeight:
    """A weight in mlx-lm's own layout (uint32 words [outputs, inputs * bits / 32], scales and
    biases [outputs, groups] in the checkpoint's dtype), multiplied by cpu_kernels/affine_matmul.cpp
    in float32."""

    words: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor
    bits: int
    group_size: int
    int8_activations: bool = False  # 4 bits: decode-sized products in integers (see the kernel)
    amx: bool = False  # those integer products on AMX tiles, at every block size (see the kernel)

    @classmethod
    def for_products(cls, words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int,
                     int8_activations: bool) -> CpuAffineWeight:
        """The weight with the products this machine runs best: int8 activations on AMX tiles where
        the CPU has them (4 bits, groups of 64 or 128; STS_EDGE_CPU_AMX=0 at load turns them off)."""
        int8_activations = int8_activations and bits == 4
        amx = int8_activations and group_size in (64, 128) and cpu_amx_ready()
        return cls(words, scales, biases, bits, group_size, int8_activations, amx)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # Prefill chunks with bfloat16 activations multiply decoded tiles in bfloat16 too: the
        # activations are bfloat16 only where the CPU multiplies it natively (loader.cpu_dtype).
        y = cpu_kernel()(x.float().contiguous(), self.words, self.scales, self.biases, self.bits, self.group_size,
                         self.int8_activations, self.amx, x.dtype == torch.bfloat16)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The decoded rows `ids` (an embedding lookup) in `dtype`: decoded in float32 and rounded
        once, as the products see the weights (the scales may be stored in a narrower dtype)."""
        transposed = QuantizedWeight(self.words.t(), self.scales.t(), self.biases.t(), self.bits, self.group_size)
        return dequantize(transposed, rows=ids, dtype=dtype)


# `quantized_products` that asks 4-bit layers on the CPU to round decode-sized activations to int8
# per group (our kernel's integer products, as llama.cpp multiplies); 8-bit layers stay in float32.
INT8_PRODUCTS = torch.int8


def cpu_kernel_reads(bits: int, group_size: int, inputs: int) -> bool:
    """Whether cpu_kernels/affine_matmul.cpp multiplies such a weight on this machine: 4 or 8 bits,
    groups of 32-128, and the inputs whole AVX2 registers of words (8 words)."""
    return (bits in (4, 8) and group_size in (32, 64, 128) and inputs % group_size == 0
            and inputs % (8 * 32 // bits) == 0 and cpu_kernel() is not None)


@dataclass(frozen=True)
class Int4PackWeight:
    """A 4-bit weight in PyTorch's own int4 layout, for `_weight_int4pack_mm` on a GPU (the tinygemm
    kernel gpt-fast and torchao use) or `_weight_int4pack_mm_for_cpu` on the CPU. Their rule
    w = (q - 8) * scale + zero is mlx-lm's w = q * scale + bias with zero = bias + 8 * scale."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # [inputs / group_size, outputs, 2]
    group_size: int

    # The CPU layout packs outputs in blocks of up to 64 (the block depends on the instruction set):
    # layouts stack along the outputs only where each block is whole.
    CPU_BLOCK = 64

    @classmethod
    def from_mlx(cls, packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group_size: int,
                 dtype: torch.dtype, chunk: int = 4096) -> "Int4PackWeight":
        """From mlx-lm's words [outputs, inputs / 8] and scales and biases [outputs, groups] (or
        views of them), repacked `chunk` outputs at a time into a tensor allocated once: the values
        pass through int32, 8x the packed bytes, which for a whole LM head would be gigabytes at
        once. The scales are kept in `dtype`, the products' (the GPU kernel takes bf16 only; on the
        CPU `matmul` casts activations of another dtype to it)."""
        outputs, inputs = packed.shape[0], packed.shape[1] * 8
        cpu = not packed.is_cuda
        inner_k_tiles = 8 if inputs % 1024 == 0 else 4 if inputs % 512 == 0 else 2
        shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
        out = None
        for first in range(0, outputs, chunk):
            words = packed[first : first + chunk].view(torch.int32)
            values = ((words[:, :, None] >> shifts) & 15).reshape(words.shape[0], inputs)  # [outputs, inputs]
            if cpu:
                part = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.contiguous(), inner_k_tiles)
            else:
                as_bytes = (values[:, ::2] << 4 | values[:, 1::2]).to(torch.uint8)
                part = torch.ops.aten._convert_weight_to_int4pack(as_bytes, inner_k_tiles)
            if out is None:  # both layouts lead with the outputs (the GPU's in tiles of 8)
                per_output = part.shape[0] / words.shape[0]
                out = torch.empty((round(outputs * per_output),) + part.shape[1:], dtype=part.dtype, device=part.device)
            out[round(first * per_output) : round(first * per_output) + part.shape[0]] = part
        scales, biases = scales.float().t(), biases.float().t()  # [groups, outputs]
        scales_and_zeros = torch.stack((scales, biases + 8 * scales), dim=-1).to(dtype).contiguous()
        return cls(out, scales_and_zeros, group_size)

    @classmethod
    def from_quantized(cls, weight: QuantizedWeight, dtype: torch.dtype) -> "Int4PackWeight":
        """From the Triton kernel's transposed layout (views of it: no copy of the words)."""
        return cls.from_mlx(weight.packed.t(), weight.scales.t(), weight.biases.t(), weight.group_size, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_and_zeros)
        if x.dtype != self.scales_and_zeros.dtype:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(self.scales_and_zeros.dtype), self.packed,
                                                                self.group_size, self.scales_and_zeros).to(x.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)


@functools.cache
def cpu_int4_kernel_agrees(dtype: torch.dtype) -> bool:
    """Whether PyTorch's CPU int4 kernel computes mlx-lm's rule on this machine, checked once on a
    small random layer against the decoded weight. Its packing differs across PyTorch versions and
    instruction sets, so a disagreement decodes the layers at load instead: slower, not wrong."""
    gen = torch.Generator().manual_seed(0)
    outputs, inputs, group = 64, 256, 64
    words = torch.randint(-2**31, 2**31 - 1, (outputs, inputs // 8), dtype=torch.int32, generator=gen)
    scales = torch.rand(outputs, inputs // group, generator=gen) * 0.1
    biases = torch.randn(outputs, inputs // group, generator=gen) * 0.1
    x = torch.randn(3, inputs, generator=gen).to(dtype)
    try:
        got = Int4PackWeight.from_mlx(words, scales, biases, group, dtype).matmul(x).float()
    except RuntimeError:
        return False
    want = x.float() @ dequantize(QuantizedWeight.from_mlx(words, scales, biases, 4, group)).float().t()
    return bool(((got - want).norm() / want.norm()) < 0.02)


def int4pack_readable(device: torch.device, bits: int, group_size: int, inputs: int, outputs: int,
                      dtype: torch.dtype) -> bool:
    """Whether PyTorch's int4 kernel reads such a weight: 4 bits, groups it knows; on a GPU bf16
    activations, inputs a multiple of 256 and outputs of 8; on the CPU float32 or bf16 activations
    and outputs a multiple of 16 (their tiles)."""
    if bits != 4 or group_size not in (32, 64, 128, 256) or inputs % group_size:
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and inputs % 256 == 0 and outputs % 8 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm")
    return (dtype in (torch.float32, torch.bfloat16) and outputs % 16 == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and cpu_int4_kernel_agrees(dtype))


def int4pack_available(weight: QuantizedWeight, dtype: torch.dtype) -> bool:
    outputs, inputs = weight.shape
    return int4pack_readable(weight.packed.device, weight.bits, weight.group_size, inputs, outputs, dtype)


class QuantizedLinear(nn.Module):
    """A linear layer whose weight stays quantized. It loads mlx-lm's tensors by their checkpoint
    names; `repack` then lays the same bytes out for the kernel that multiplies with them (see the
    module docstring)."""

    def __init__(self, inputs: int, outputs: int, bits: int, group_size: int, bias: bool):
        super().__init__()
        self.inputs, self.outputs, self.bits, self.group_size = inputs, outputs, bits, group_size
        self.register_buffer("weight", torch.empty(outputs, inputs * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(outputs, inputs // group_size))
        self.register_buffer("biases", torch.empty(outputs, inputs // group_size))
        self.bias = nn.Parameter(torch.empty(outputs)) if bias else None
        self.packed: QuantizedWeight | TensorCoreWeight | Int4PackWeight | CpuAffineWeight | None = None

    def repack(self, dtype: torch.dtype) -> None:
        """Once, after loading: the kernel's layout replaces the checkpoint's (activations in `dtype`)."""
        device = self.weight.device
        if not triton_layouts(device) and cpu_kernel_reads(self.bits, self.group_size, self.inputs):
            self.packed = CpuAffineWeight.for_products(self.weight, self.scales, self.biases, self.bits, self.group_size,
                                                       dtype == INT8_PRODUCTS)
        elif triton_layouts(device) and tensor_core_reads(self.bits, self.group_size, self.inputs, dtype):
            self.packed = TensorCoreWeight.from_mlx(self.weight, self.scales, self.biases, self.bits, self.group_size,
                                                    dtype)
            reserve_workspace(self.packed, device)
        else:
            dtype = torch.bfloat16 if dtype == INT8_PRODUCTS else dtype  # PyTorch's kernel's nearest
            if int4pack_readable(device, self.bits, self.group_size, self.inputs, self.outputs, dtype):
                # Straight from the checkpoint's layout: no transposed copy of a whole layer on the way.
                self.packed = Int4PackWeight.from_mlx(self.weight, self.scales, self.biases, self.group_size, dtype)
            else:
                self.packed = QuantizedWeight.from_mlx(self.weight, self.scales, self.biases, self.bits, self.group_size)
        self.weight = self.scales = self.biases = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.inputs)
        y = quantized_matmul(flat, self.packed, check=False) if isinstance(self.packed, QuantizedWeight) else \
            self.packed.matmul(flat)
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
        self.packed: QuantizedWeight | TensorCoreWeight | CpuAffineWeight | None = None
        self.head: Int4PackWeight | TensorCoreWeight | CpuAffineWeight | None = None
        self.dtype: torch.dtype | None = None

    def repack(self, dtype: torch.dtype, as_head: bool = False, products: torch.dtype | None = None) -> None:
        """Once, after loading: rows are looked up in `dtype`; as the LM head (`as_head`) the table
        multiplies in `products` (default: `dtype`)."""
        self.dtype, products = dtype, products or dtype
        device = self.weight.device
        if not triton_layouts(device) and cpu_kernel_reads(self.bits, self.group_size, self.dim):
            # The checkpoint's layout serves both the lookups and, tied, the LM head's product.
            self.packed = CpuAffineWeight(self.weight, self.scales, self.biases, self.bits, self.group_size)
            self.head = CpuAffineWeight.for_products(self.weight, self.scales, self.biases, self.bits, self.group_size,
                                                     products == INT8_PRODUCTS) if as_head else None
        elif triton_layouts(device) and tensor_core_reads(self.bits, self.group_size, self.dim, products):
            # One layout for both: rows decode from it as they are looked up.
            self.packed = TensorCoreWeight.from_mlx(self.weight, self.scales, self.biases, self.bits, self.group_size,
                                                    products)
            self.head = self.packed if as_head else None
            if as_head:
                reserve_workspace(self.packed, device)
        else:
            products = torch.bfloat16 if products == INT8_PRODUCTS else products
            self.packed = QuantizedWeight.from_mlx(self.weight, self.scales, self.biases, self.bits, self.group_size)
            # As the LM head (tied embeddings), PyTorch's int4 kernel where it reads the table: a
            # second, int4 copy of it (its layout cannot be looked up by row), which an untied model
            # never holds.
            if as_head and int4pack_available(self.packed, products):
                self.head = Int4PackWeight.from_quantized(self.packed, products)
        self.weight = self.scales = self.biases = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.packed, QuantizedWeight):
            return self.packed.rows(ids, self.dtype)
        return dequantize(self.packed, rows=ids, dtype=self.dtype)

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
    path, and the layers give up their tensors, so nothing is stored twice. None also where the
    layouts cannot be stacked (PyTorch's CPU int4 blocks, below)."""
    first = layers[0]
    if any((layer.bits, layer.group_size, layer.inputs, type(layer.packed)) !=
           (first.bits, first.group_size, first.inputs, type(first.packed)) for layer in layers):
        return None
    if isinstance(first.packed, Int4PackWeight) and not first.packed.packed.is_cuda and \
            any(layer.outputs % Int4PackWeight.CPU_BLOCK for layer in layers[:-1]):
        return None  # a partial block of outputs would sit inside the stacked layout
    has_bias = first.bias is not None
    with torch.device("meta"):
        fused = QuantizedLinear(first.inputs, sum(layer.outputs for layer in layers), first.bits, first.group_size, has_bias)
    fused.weight = fused.scales = fused.biases = None
    with torch.no_grad():
        if isinstance(first.packed, CpuAffineWeight):  # the checkpoint's layout: outputs lead everywhere
            fused.packed = dataclasses.replace(first.packed, **{name: torch.cat([getattr(layer.packed, name) for layer in layers])
                                                                for name in ("words", "scales", "biases")})
        elif TensorCoreWeight is not None and isinstance(first.packed, TensorCoreWeight):
            fused.packed = TensorCoreWeight.concatenate([layer.packed for layer in layers])
            reserve_workspace(fused.packed, fused.packed.nibbles.device)  # the stacked shape's launch
        elif isinstance(first.packed, Int4PackWeight):  # the layout's outputs lead, its scales [groups, outputs, 2]
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
