"""Weight-only quantized matrix product: y = x @ W^T with W in mlx-lm's affine format.

mlx-lm stores W [outputs, inputs] as uint32 words [outputs, inputs * bits / 32] (values from the
least significant bits up) and per group of `group_size` consecutive inputs a scale and a bias
([outputs, inputs / group_size]), so that W[j, i] = scale * q + bias. At load the words, scales and
biases are transposed once (`QuantizedWeight.from_mlx`) to [inputs * bits / 32, outputs] and
[inputs / group_size, outputs]: the same bytes, laid out so that a program's loads run along the
outputs, where consecutive threads read consecutive words.

Per group, sum_i x_i (s q_i + b) = s (x . q) + b sum_i x_i: the kernel multiplies the activations
with the integer values themselves (exact in bf16/fp16: at most 255), on tensor cores, and applies
the scale and bias once per group to the [rows, outputs] tile, not once per weight. One program
owns a tile of outputs and a share of the groups (split-k, so that a short output dimension still
gives every multiprocessor work); a second, small kernel adds the shares' float32 partial sums.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sts_edge.triton_kernels.quantized_layout import QuantizedWeight, dequantize  # noqa: F401 (re-exported)
from sts_edge.triton_kernels.verify_attention import DTYPES, INTERPRETED, KernelInputError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
MAX_ROWS = 16  # decode-sized products take one row tile; larger ones tile the rows too


@triton.jit
def _quantized_matmul_kernel(
    X, Packed, Scales, Biases, Out,
    rows, outputs, groups, groups_per_split,
    stride_xm, stride_pk, stride_sk, stride_om, stride_os,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = GROUP // PER_WORD
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < rows, n < outputs
    shifts = tl.arange(0, PER_WORD) * BITS
    first = pid_s * groups_per_split
    last = tl.minimum(first + groups_per_split, groups)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(first, last):
        k = g * GROUP + tl.arange(0, GROUP)
        x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None], other=0.0)
        words = tl.load(Packed + (g * WORDS + tl.arange(0, WORDS))[:, None] * stride_pk + n[None, :],
                        mask=n_ok[None, :], other=0)
        # [words, values per word, outputs] -> [inputs of the group, outputs]: input i*PER_WORD + j
        # is value j of word i, so merging the two leading axes keeps the input order.
        q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1), (GROUP, BLOCK_N))
        if UPCAST:  # the interpreter multiplies bf16 tiles as raw integers: float32 there
            part = tl.dot(x.to(tl.float32), q.to(tl.float32))
        else:
            part = tl.dot(x, q.to(x.dtype))
        scale = tl.load(Scales + g * stride_sk + n, mask=n_ok, other=0.0).to(tl.float32)
        bias = tl.load(Biases + g * stride_sk + n, mask=n_ok, other=0.0).to(tl.float32)
        acc += part * scale[None, :] + tl.sum(x.to(tl.float32), axis=1)[:, None] * bias[None, :]
    out = Out + pid_s * stride_os + m[:, None] * stride_om + n[None, :]
    tl.store(out, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_splits_kernel(Partial, Out, size, splits, BLOCK: tl.constexpr, SPLITS: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.arange(0, SPLITS)
    ok = i < size
    parts = tl.load(Partial + s[:, None] * size + i[None, :], mask=(s < splits)[:, None] & ok[None, :], other=0.0)
    tl.store(Out + i, tl.sum(parts, axis=0).to(Out.dtype.element_ty), mask=ok)


def check_weight(weight: QuantizedWeight) -> None:
    """Raise KernelInputError unless the kernel can read this weight."""
    if weight.bits not in BITS:
        raise KernelInputError(f"the quantized kernel takes {BITS} bits, got {weight.bits}")
    if weight.group_size not in GROUP_SIZES:
        raise KernelInputError(f"the quantized kernel takes groups of {GROUP_SIZES}, got {weight.group_size}")
    outputs, inputs = weight.shape
    if weight.packed.dtype != torch.int32 or weight.packed.dim() != 2 or weight.packed.stride(1) != 1:
        raise KernelInputError(f"packed weights must be int32 [words, outputs] with contiguous rows, got "
                               f"{weight.packed.dtype} {tuple(weight.packed.shape)}")
    if inputs % weight.group_size or inputs % 32:
        raise KernelInputError(f"{inputs} inputs are not a whole number of groups of {weight.group_size}")
    groups = (inputs // weight.group_size, outputs)
    for name, tensor in (("scales", weight.scales), ("biases", weight.biases)):
        if tuple(tensor.shape) != groups or tensor.dtype not in DTYPES + (torch.float32,) or tensor.stride(1) != 1:
            raise KernelInputError(f"{name} must be [{groups[0]}, {groups[1]}] floats with contiguous rows, got "
                                   f"{tensor.dtype} {tuple(tensor.shape)}")


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def quantized_matmul(x: torch.Tensor, weight: QuantizedWeight, *, block_n: int | None = None,
                     splits: int | None = None, num_warps: int = 4, num_stages: int | None = None,
                     check: bool = True) -> torch.Tensor:
    """x [rows, inputs] (bf16 or fp16) @ W^T -> [rows, outputs] in x's dtype.

    `block_n` (outputs per program) and `splits` (shares of the groups along the inputs) default
    to tiles that give every multiprocessor about two programs.
    """
    rows, inputs = x.shape
    outputs = weight.packed.shape[1]
    if check:
        check_weight(weight)
        if x.dtype not in DTYPES or x.stride(1) != 1 or inputs != weight.shape[1]:
            raise KernelInputError(f"x must be bf16/fp16 [rows, {weight.shape[1]}] with contiguous rows, got "
                                   f"{x.dtype} {tuple(x.shape)}")
    groups = inputs // weight.group_size
    small = rows <= MAX_ROWS
    block_m = 16 if small else 64
    # The best of a sweep at decode sizes (scripts/bench_quantized.py --sweep; benchmarks/README.md).
    block_n = block_n or (256 if small else 128)
    num_stages = num_stages or (4 if small else 3)
    row_tiles = triton.cdiv(rows, block_m)
    tiles = triton.cdiv(outputs, block_n) * row_tiles
    if splits is None:
        splits = max(1, min(groups, 2 * _multiprocessors(x.device) // tiles))
    groups_per_split = triton.cdiv(groups, splits)
    splits = triton.cdiv(groups, groups_per_split)  # no empty share
    out = torch.empty(rows, outputs, dtype=x.dtype, device=x.device)
    partial = out if splits == 1 else torch.empty(splits, rows, outputs, dtype=torch.float32, device=x.device)
    _quantized_matmul_kernel[(triton.cdiv(outputs, block_n), splits, row_tiles)](
        x, weight.packed, weight.scales, weight.biases, partial,
        rows, outputs, groups, groups_per_split,
        x.stride(0), weight.packed.stride(0), weight.scales.stride(0), outputs, rows * outputs,
        BITS=weight.bits, GROUP=weight.group_size, BLOCK_M=block_m, BLOCK_N=block_n,
        UPCAST=INTERPRETED and x.dtype == torch.bfloat16, num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        size = rows * outputs
        _sum_splits_kernel[(triton.cdiv(size, 1024),)](partial, out, size, splits, BLOCK=1024,
                                                       SPLITS=triton.next_power_of_2(splits))
    return out
