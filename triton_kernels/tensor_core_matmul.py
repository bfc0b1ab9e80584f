"""4- and 8-bit weight-only products at decode sizes (1-16 rows) on tensor cores, the weights
decoded in registers: the GPU's path for 4- and 8-bit layers with groups of 64 or 128.

Layout (`TensorCoreWeight.from_mlx`, once at load, the same bytes as mlx-lm's):
  nibbles [inputs / 64, outputs, 4 * bits] int16: nibble i of nibbles[b, n, j] is q[n, 64 b + 16 i + j]
  (4 bits), or that value's low four bits, with its high four in nibble i of nibbles[b, n, 16 + j]
  (8 bits: two planes of nibbles);
  scale_bias [inputs / group_size, outputs] int32: the group's scale (low half) and bias (high
  half) as the activations' 16-bit float (bfloat16 or float16) bits.
A program owns a tile of outputs and a share of the 64-input blocks (split-k). Per block it loads
one [outputs, 16] tile of int16 words per plane and multiplies each four times, once per nibble,
with a [16 inputs, 16 rows] tile of the activations transposed (out^T = W x^T: the outputs fill
the tensor cores' 16-row side, the block's 1-16 rows the 8-wide one). A nibble becomes the float
128 + q (bfloat16) or 1024 + q (float16) by OR-ing it under that number's exponent, one `lop3`
for two values (and a shift for three of the four nibbles), through inline PTX; a high nibble
becomes 16 (128 + q) = 2048 + 16 q (or 16384 + 16 q) the same way under a larger exponent, whose
ulp is 16. The two planes' products go into one sum, so a byte costs what two 4-bit values do: a
bfloat16 cannot hold 256 + q exactly, and this keeps one decode for both widths. Because the
decode is a pure operation of one input, Triton converts the packed tile into the tensor cores'
operand layout before it, and the decoded values go from registers into `mma.sync`. Per block:
  sum_i x_i (s q_i + b) = s sum_i x_i (OFFSET + q_i) + (b - OFFSET s) sum_i x_i,
with OFFSET 128 or 1024, 17 times that for bytes, both sums in float32 (the second as a product
with a tile of ones). The last program of a tile
to finish adds the shares' float32 partial sums (an arrival counter per tile, which it resets), so
a product is one launch. Where the inline PTX cannot run (Triton's CPU interpreter, which CI
runs), the same decode is written with integer ops and the products run in float32.

Programs are two warps: Triton picks Hopper's `wgmma` only for multiples of four, and waits for
each one before the next block's decode, where `mma.sync` overlaps (benchmarks/README.md,
quantized products).

Larger blocks (prefill) decode the weight a slab of outputs at a time into a workspace and use the
dense product (`tensor_core_matmul`): nothing the size of the whole layer in 16 bits is ever held.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sts_edge.triton_kernels.verify_attention import DTYPES, INTERPRETED, KernelInputError

BITS = (4, 8)
GROUP_SIZES = (64, 128)
MAX_ROWS = 16
BLOCK = 64  # inputs per packed word tile: 16 words of four nibbles
_BLOCK = tl.constexpr(BLOCK)  # the same, as the kernels read it
SLAB_WEIGHTS = 1 << 24  # weights decoded at a time for a prefill-sized product (32 MB in 16 bits)


@dataclass(frozen=True)
class TensorCoreWeight:
    """A 4- or 8-bit weight in this kernel's layout (module docstring)."""

    nibbles: torch.Tensor  # int16 [inputs / 64, outputs, 4 * bits]
    scale_bias: torch.Tensor  # int32 [inputs / group_size, outputs]
    group_size: int
    dtype: torch.dtype  # of the scales and biases, and of the activations the kernel takes

    @classmethod
    def from_mlx(cls, words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int,
                 dtype: torch.dtype, chunk: int = 4096) -> "TensorCoreWeight":
        """From mlx-lm's words [outputs, inputs * bits / 32] (uint32 or int32) and scales and
        biases [outputs, groups], for activations in `dtype` (bf16 or fp16), `chunk` outputs at a
        time (the values pass through int32 on the way)."""
        if bits not in BITS:
            raise KernelInputError(f"the tensor-core kernel takes {BITS} bits, got {bits}")
        if group_size not in GROUP_SIZES:
            raise KernelInputError(f"the tensor-core kernel takes groups of {GROUP_SIZES}, got {group_size}")
        outputs, inputs = words.shape[0], words.shape[1] * 32 // bits
        if inputs % group_size:
            raise KernelInputError(f"{inputs} inputs are not a whole number of groups of {group_size}")
        if dtype not in DTYPES:
            raise KernelInputError(f"the tensor-core kernel takes bf16 or fp16 activations, not {dtype}")
        blocks = inputs // BLOCK
        nibbles = torch.empty(blocks, outputs, 4 * bits, dtype=torch.int16, device=words.device)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
        for first in range(0, outputs, chunk):
            part = words[first : first + chunk].view(torch.int32)
            values = ((part[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(part.shape[0], blocks, 4, 16)
            for plane in range(bits // 4):  # [n, b, i, j]: the low nibbles, then (8 bits) the high ones
                q = (values >> 4 * plane) & 15
                packed = q[:, :, 0] | q[:, :, 1] << 4 | q[:, :, 2] << 8 | q[:, :, 3] << 12  # [n, b, j] in 0..65535
                nibbles[:, first : first + chunk, 16 * plane : 16 * plane + 16] = \
                    packed.to(torch.int16).permute(1, 0, 2)  # wraps to int16's bits
        as_bits = lambda t: t.t().to(dtype).contiguous().view(torch.int16).to(torch.int32)  # noqa: E731
        scale_bias = (as_bits(scales) & 0xFFFF) | (as_bits(biases) << 16)
        return cls(nibbles, scale_bias.contiguous(), group_size, dtype)

    @property
    def shape(self) -> tuple[int, int]:
        """(outputs, inputs) of W."""
        return self.nibbles.shape[1], self.nibbles.shape[0] * BLOCK

    @property
    def bits(self) -> int:
        return self.nibbles.shape[2] // 4

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return tensor_core_matmul(x, self, check=False)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The decoded rows `ids` (an embedding lookup) in `dtype`, with torch ops."""
        return _decode_with_torch(self.nibbles[:, ids], self.scale_bias[:, ids], self.group_size, self.dtype).to(dtype)

    @staticmethod
    def concatenate(weights: list["TensorCoreWeight"]) -> "TensorCoreWeight":
        """One weight stacking the weights' outputs (q/k/v, or gate/up)."""
        return TensorCoreWeight(torch.cat([w.nibbles for w in weights], dim=1),
                                    torch.cat([w.scale_bias for w in weights], dim=1), weights[0].group_size,
                                    weights[0].dtype)


def _decode_with_torch(nibbles: torch.Tensor, scale_bias: torch.Tensor, group_size: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """W [outputs, inputs] in float32 from views of the layout."""
    blocks, outputs, words = nibbles.shape
    shifts = torch.arange(0, 16, 4, dtype=torch.int32, device=nibbles.device)
    planes = ((nibbles.to(torch.int32)[:, :, None, :] >> shifts[:, None]) & 15).view(blocks, outputs, 4, -1, 16)
    q = sum(planes[:, :, :, plane] << 4 * plane for plane in range(words // 16))  # [b, n, i, j]
    q = q.permute(1, 0, 2, 3).reshape(outputs, blocks * BLOCK).float()
    halves = lambda t: t.to(torch.int16).view(dtype).float().t()  # noqa: E731  (16 bits of a float -> float32)
    scales, biases = halves(scale_bias & 0xFFFF), halves(scale_bias >> 16)  # [outputs, groups]
    per_group = q.view(outputs, -1, group_size)
    return (per_group * scales[:, :, None] + biases[:, :, None]).reshape(outputs, -1)


def _decode_ptx(magic: str) -> tl.constexpr:
    """PTX for nibble i of two packed int16 words -> two floats OFFSET + q, one string per i."""
    lop3 = f"lop3.b32 $0, {{}}, 0x000F000F, {magic}, 0xEA;"
    return tl.constexpr(tuple([lop3.format("$1")] + [f"{{ .reg .b32 t; shr.b32 t, $1, {4 * i}; {lop3.format('t')} }}"
                                                     for i in (1, 2, 3)]))


BF16_DECODE = _decode_ptx("0x43004300")  # OR-ed under the exponent of 128: 128 + q
FP16_DECODE = _decode_ptx("0x64006400")  # 1024 + q
BF16_DECODE_HIGH = _decode_ptx("0x45004500")  # under 2048's, whose ulp is 16: 2048 + 16 q
FP16_DECODE_HIGH = _decode_ptx("0x74007400")  # 16384 + 16 q


@triton.jit
def _nibble_plus_offset(p, i: tl.constexpr, FP16: tl.constexpr, HIGH: tl.constexpr, IN_PTX: tl.constexpr):
    """Nibble i of each int16 word as the float OFFSET + q (128 in bfloat16, 1024 in float16), or
    as a byte's high nibble (HIGH) 16 (OFFSET + q)."""
    if not IN_PTX:
        w = (((p.to(tl.int32) >> (4 * i)) & 15) + (1024 if FP16 else 128)) * (16 if HIGH else 1)
    elif FP16:
        w = tl.inline_asm_elementwise(FP16_DECODE_HIGH[i] if HIGH else FP16_DECODE[i], "=r,r", [p], dtype=tl.float16,
                                      is_pure=True, pack=2)
    else:
        w = tl.inline_asm_elementwise(BF16_DECODE_HIGH[i] if HIGH else BF16_DECODE[i], "=r,r", [p], dtype=tl.bfloat16,
                                      is_pure=True, pack=2)
    return w


@triton.jit
def _halves_as_floats(scale_bias, FP16: tl.constexpr):
    """The scale (low 16 bits) and bias (high 16 bits) in float32."""
    if FP16:
        scale = (scale_bias & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        bias = (scale_bias >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:  # bfloat16 bits are float32's high half
        scale = (scale_bias << 16).to(tl.float32, bitcast=True)
        bias = (scale_bias & -65536).to(tl.float32, bitcast=True)
    return scale, bias


@triton.jit(do_not_specialize=["rows", "blocks_per_split", "splits"])
def _tensor_core_matmul_kernel(X, Nibbles, ScaleBias, Out, Partials, Arrivals, rows, outputs, blocks_per_split,
                               splits, stride_xm, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                               SPLIT: tl.constexpr, FP16: tl.constexpr, IN_PTX: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, 16)
    j = tl.arange(0, 16)
    n_ok, m_ok = n < outputs, m < rows
    WORDS: tl.constexpr = 4 * BITS  # per output and block
    OFFSET: tl.constexpr = (1024.0 if FP16 else 128.0) * (17 if BITS == 8 else 1)
    ones = tl.full((BLOCK_N, 16), 1.0, tl.float16 if FP16 else tl.bfloat16)
    if not IN_PTX:  # the interpreter multiplies 16-bit tiles as raw integers: float32 there
        ones = ones.to(tl.float32)
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    first = pid_s * blocks_per_split
    last = first + blocks_per_split - 1
    # Scales one block ahead, by hand: Triton pipelines only the loads that feed a product.
    scale_bias_next = tl.load(ScaleBias + (first * _BLOCK // GROUP) * outputs + n, mask=n_ok, other=0)
    for b in range(first, first + blocks_per_split):
        at = Nibbles + (b * outputs + n[:, None]).to(tl.int64) * WORDS + j[None, :]
        words = tl.load(at, mask=n_ok[:, None], other=0)
        if BITS == 8:
            high = tl.load(at + 16, mask=n_ok[:, None], other=0)
        scale_bias = scale_bias_next
        scale_bias_next = tl.load(ScaleBias + (tl.minimum(b + 1, last) * _BLOCK // GROUP) * outputs + n, mask=n_ok,
                                  other=0)
        for i in tl.static_range(4):
            x = tl.load(X + m[None, :] * stride_xm + (j + b * _BLOCK + i * 16)[:, None], mask=m_ok[None, :], other=0.0)
            w = _nibble_plus_offset(words, i, FP16, False, IN_PTX)
            if not IN_PTX:
                x, w = x.to(tl.float32), w.to(tl.float32)
            if i == 0:
                offset_sum = tl.dot(w, x)
                x_sum = tl.dot(ones, x)  # on tensor cores: a row sum (tl.sum) costs a layout conversion
            else:
                offset_sum = tl.dot(w, x, offset_sum)
                x_sum = tl.dot(ones, x, x_sum)
            if BITS == 8:
                w = _nibble_plus_offset(high, i, FP16, True, IN_PTX)
                offset_sum = tl.dot(w if IN_PTX else w.to(tl.float32), x, offset_sum)
        scale, bias = _halves_as_floats(scale_bias, FP16)
        acc += offset_sum * scale[:, None]  # two fused multiply-adds per element, not a product and two sums
        acc += x_sum * (bias - OFFSET * scale)[:, None]
    _write_out(acc, Out, Partials, Arrivals, n, m, n_ok, m_ok, outputs, splits, pid_n, pid_s, BLOCK_N, SPLIT)


@triton.jit
def _write_out(acc, Out, Partials, Arrivals, n, m, n_ok, m_ok, outputs, splits, pid_n, pid_s, BLOCK_N: tl.constexpr,
               SPLIT: tl.constexpr):
    """Store a program's [BLOCK_N outputs, 16 rows] float32 sums transposed into Out [rows, outputs];
    with split-k, as its share's partial sums, the tile's last share to arrive adding them all."""
    out = Out + m[None, :] * outputs + n[:, None]
    mask = m_ok[None, :] & n_ok[:, None]
    if not SPLIT:
        tl.store(out, acc.to(Out.dtype.element_ty), mask=mask)
    else:
        tile = n[:, None] * 16 + m[None, :]  # this tile's place in each share's partial sums
        tl.store(Partials + pid_s * (outputs * 16) + tile, acc, mask=n_ok[:, None])
        tl.debug_barrier()
        arrived = tl.atomic_add(Arrivals + pid_n, 1, sem="acq_rel")
        if arrived == splits - 1:  # the last share of this tile adds them all, in share order
            total = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
            for s in range(0, splits):
                total += tl.load(Partials + s * (outputs * 16) + tile, mask=n_ok[:, None], other=0.0,
                                 cache_modifier=".cg")
            tl.store(out, total.to(Out.dtype.element_ty), mask=mask)
            tl.atomic_xchg(Arrivals + pid_n, 0)


@triton.jit
def _dequantize_kernel(Nibbles, ScaleBias, Out, outputs, first_output, slab, inputs, BITS: tl.constexpr,
                       GROUP: tl.constexpr, BLOCK_N: tl.constexpr, FP16: tl.constexpr):
    """Out[n - first_output, :] = W[n, :] for a slab of outputs, one 64-input block per program."""
    pid_n, b = tl.program_id(0), tl.program_id(1)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n = first_output + local
    ok = (local < slab) & (n < outputs)
    j = tl.arange(0, 16)
    at = Nibbles + (b * outputs + n[:, None]).to(tl.int64) * (4 * BITS) + j[None, :]
    words = tl.load(at, mask=ok[:, None], other=0).to(tl.int32)
    if BITS == 8:
        high = tl.load(at + 16, mask=ok[:, None], other=0).to(tl.int32)
    scale_bias = tl.load(ScaleBias + (b * _BLOCK // GROUP) * outputs + n, mask=ok, other=0)
    scale, bias = _halves_as_floats(scale_bias, FP16)
    for i in tl.static_range(4):
        q = (words >> (4 * i)) & 15
        if BITS == 8:
            q += ((high >> (4 * i)) & 15) << 4
        q = q.to(tl.float32)
        tl.store(Out + local[:, None].to(tl.int64) * inputs + b * _BLOCK + i * 16 + j[None, :],
                 (q * scale[:, None] + bias[:, None]).to(Out.dtype.element_ty), mask=ok[:, None])


@dataclass(frozen=True)
class Launch:
    block_n: int
    splits: int
    num_warps: int = 2  # module docstring


@functools.cache
def launch_for(inputs: int, outputs: int, bits: int) -> Launch:
    """Outputs per program and split count for a weight's shape, from H200 sweeps of the
    Llama-3.1-8B and Llama-3.2-1B shapes (benchmarks/results/int4_launch_sweep_h200.json,
    int8_launch_sweep_h200.json): the wider the layer the wider the tile (narrower for bytes, whose
    blocks are twice the work), and the inputs split until about a thousand programs run, each
    keeping at least 8 blocks of inputs (shorter loops lose more to the pipeline's fill)."""
    if bits == 8:
        block_n = 32 if outputs <= 6144 else 64
    else:
        block_n = 32 if outputs <= 3072 else 64 if outputs <= 16384 else 128
    return Launch(block_n, split_count(inputs, outputs, block_n))


def split_count(inputs: int, outputs: int, block_n: int) -> int:
    """Shares of the 64-input blocks for tiles of `block_n` outputs (launch_for)."""
    tiles, blocks = triton.cdiv(outputs, block_n), inputs // BLOCK
    return max(s for s in range(1, 17) if blocks % s == 0 and (s == 1 or (tiles * s <= 1100 and blocks // s >= 8)))


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_outgrown: list[tuple[torch.Tensor, torch.Tensor]] = []  # kept: CUDA graphs captured earlier still read them


def reserve_workspace(weight: TensorCoreWeight, device: torch.device, launch: Launch | None = None) -> None:
    """Grow the device's shared split-k workspace (partial sums and arrival counters) to fit this
    weight's launch (`launch_for`'s, or the one given). Called at load for every layer, so that no
    product allocates (CUDA graphs capture the pointers); layers run one after another on one
    stream, so they share it."""
    outputs, inputs = weight.shape
    launch = launch or launch_for(inputs, outputs, weight.bits)
    partials = launch.splits * outputs * 16 if launch.splits > 1 else 1
    tiles = triton.cdiv(outputs, launch.block_n)
    have = _workspaces.get(device)
    if have is not None and have[0].numel() >= partials and have[1].numel() >= tiles:
        return
    if have is not None:
        _outgrown.append(have)
        partials, tiles = max(partials, have[0].numel()), max(tiles, have[1].numel())
    _workspaces[device] = (torch.empty(partials, dtype=torch.float32, device=device),
                           torch.zeros(tiles, dtype=torch.int32, device=device))


def check_weight(weight: TensorCoreWeight) -> None:
    """Raise KernelInputError unless the kernel can read this weight."""
    if weight.group_size not in GROUP_SIZES:
        raise KernelInputError(f"the tensor-core kernel takes groups of {GROUP_SIZES}, got {weight.group_size}")
    outputs, inputs = weight.shape
    if weight.nibbles.dtype != torch.int16 or weight.nibbles.dim() != 3 or weight.nibbles.shape[2] not in (16, 32) \
            or not weight.nibbles.is_contiguous():
        raise KernelInputError(f"nibbles must be contiguous int16 [blocks, outputs, 16 or 32], got "
                               f"{weight.nibbles.dtype} {tuple(weight.nibbles.shape)}")
    groups = (inputs // weight.group_size, outputs)
    if inputs % weight.group_size or weight.scale_bias.dtype != torch.int32 \
            or tuple(weight.scale_bias.shape) != groups or not weight.scale_bias.is_contiguous():
        raise KernelInputError(f"scale_bias must be contiguous int32 {list(groups)}, got {weight.scale_bias.dtype} "
                               f"{tuple(weight.scale_bias.shape)}")


def tensor_core_matmul(x: torch.Tensor, weight: TensorCoreWeight, *, check: bool = True,
                       launch: Launch | None = None) -> torch.Tensor:
    """x [rows, inputs] in the weight's dtype (bf16 or fp16) @ W^T -> [rows, outputs] in that dtype.
    `launch` overrides `launch_for`'s choice (benchmark sweeps; its workspace must be reserved)."""
    rows, inputs = x.shape
    outputs = weight.shape[0]
    if check:
        check_weight(weight)
        if x.dtype != weight.dtype or x.stride(1) != 1 or inputs != weight.shape[1]:
            raise KernelInputError(f"x must be {weight.dtype} [rows, {weight.shape[1]}] with contiguous rows, got "
                                   f"{x.dtype} {tuple(x.shape)}")
    if rows > MAX_ROWS:
        return _slab_matmul(x, weight)
    if launch is None:
        launch = launch_for(inputs, outputs, weight.bits)
        if launch.splits > 1:
            reserve_workspace(weight, x.device)  # a no-op once the loader has reserved it
    partials, arrivals = _workspaces[x.device] if launch.splits > 1 else (x, x)
    out = torch.empty(rows, outputs, dtype=x.dtype, device=x.device)
    _tensor_core_matmul_kernel[(triton.cdiv(outputs, launch.block_n), launch.splits)](
        x, weight.nibbles, weight.scale_bias, out, partials, arrivals, rows, outputs,
        inputs // BLOCK // launch.splits, launch.splits, x.stride(0), BITS=weight.bits,
        GROUP=weight.group_size, BLOCK_N=launch.block_n, SPLIT=launch.splits > 1, FP16=weight.dtype == torch.float16,
        IN_PTX=not INTERPRETED, num_warps=launch.num_warps, num_stages=3)
    return out


def _slab_matmul(x: torch.Tensor, weight: TensorCoreWeight) -> torch.Tensor:
    """A prefill-sized product: the weight decoded a slab of outputs at a time, then the dense product."""
    rows, inputs = x.shape
    outputs = weight.shape[0]
    slab = max(256, SLAB_WEIGHTS // inputs // 256 * 256)
    decoded = torch.empty(min(slab, outputs), inputs, dtype=x.dtype, device=x.device)
    out = torch.empty(rows, outputs, dtype=x.dtype, device=x.device)
    for first in range(0, outputs, slab):
        size = min(slab, outputs - first)
        _dequantize_kernel[(triton.cdiv(size, 64), inputs // BLOCK)](
            weight.nibbles, weight.scale_bias, decoded, outputs, first, size, inputs, BITS=weight.bits,
            GROUP=weight.group_size,
            BLOCK_N=64, FP16=weight.dtype == torch.float16)
        out[:, first : first + size] = x @ decoded[:size].t()
    return out
