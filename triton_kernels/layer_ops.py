"""The small per-token operations of a decoder layer, fused, for decode-sized blocks on the GPU.

At batch size one the arithmetic outside the matrix products is tiny, but in plain PyTorch a
layer launches about 50 kernels (RMSNorm alone is eight: cast, square, mean, add, rsqrt,
multiply, cast, scale), and every kernel costs a launch and a few microseconds even inside a
CUDA graph (scripts/profile_step.py counts them; benchmarks/README.md). Three kernels replace them:

  * rms_norm: the residual add (optional) and RMSNorm in one pass over each row;
  * rope_and_cache: from the fused q/k/v projection, the rotary embedding of q and k (after
    Qwen3's per-head RMSNorm), k and v written to the cache at the block's positions (quantized
    there, for a draft's 8- or 4-bit cache), and q laid out as [heads, n, head_dim] for the
    attention kernels;
  * silu_mul: SwiGLU's silu(gate) * up.

Each rounds to the model dtype wherever the plain path (backends/torch/model.py) does, so the
two agree up to the order of RMSNorm's float32 sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sts_edge.triton_kernels.verify_attention import DTYPES, KernelInputError, QuantizedRows


@triton.jit
def _round(x, dtype: tl.constexpr):
    """x rounded to the model dtype and back: what a PyTorch op in that dtype stores. (Triton's
    CPU interpreter truncates to bfloat16 where GPUs round to nearest: 1 ulp apart there.)"""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    X, Residual, Summed, W, Out,
    stride_x, stride_r, stride_s, stride_o, dim, eps,
    BLOCK: tl.constexpr, ADD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    dtype: tl.constexpr = Out.dtype.element_ty
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if ADD:  # the residual stream: x + residual, stored in the model dtype as the plain path does
        x = _round(x + tl.load(Residual + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32), dtype)
        tl.store(Summed + row * stride_s + cols, x.to(dtype), mask=ok)
    rstd = tl.math.rsqrt(tl.sum(x * x, 0) / dim + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (w * _round(x * rstd, dtype)).to(dtype), mask=ok)


@triton.jit
def _store_cache_row(y1, y2, Values, Scales, Biases, Centres, kv_head, pos, stride_h, stride_r, stride_sh, stride_sr,
                     i, ok, HALF: tl.constexpr, BITS: tl.constexpr, GROUPS: tl.constexpr, dtype: tl.constexpr):
    """Row `pos` of KV head `kv_head` = [y1 | y2] (float32 holding model-dtype values): as stored
    (BITS 16: Values is the cache), or quantized as quantized_kv.quantize_rows does it, less its
    centres (GROUPS 1: the row is one group; 2: each half is one)."""
    if BITS == 16:
        dst = Values + kv_head * stride_h + pos * stride_r
        tl.store(dst + i, y1.to(dtype), mask=ok)
        tl.store(dst + HALF + i, y2.to(dtype), mask=ok)
    else:
        z1 = y1 - tl.load(Centres + kv_head * (2 * HALF) + i)
        z2 = y2 - tl.load(Centres + kv_head * (2 * HALF) + HALF + i)
        low1, high1 = tl.min(z1, 0), tl.max(z1, 0)
        low2, high2 = tl.min(z2, 0), tl.max(z2, 0)
        if GROUPS == 1:
            low1, high1 = tl.minimum(low1, low2), tl.maximum(high1, high2)
            low2, high2 = low1, high1
        levels: tl.constexpr = (1 << BITS) - 1
        scale1, scale2 = tl.math.div_rn(high1 - low1, levels * 1.0), tl.math.div_rn(high2 - low2, levels * 1.0)
        step1, step2 = tl.where(scale1 > 0, scale1, 1.0), tl.where(scale2 > 0, scale2, 1.0)
        q1 = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(z1 - low1, step1) + 0.5), 0.0), levels * 1.0).to(tl.uint8)
        q2 = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(z2 - low2, step2) + 0.5), 0.0), levels * 1.0).to(tl.uint8)
        dst = Values + kv_head * stride_h + pos * stride_r
        if BITS == 8:
            tl.store(dst + i, q1)
            tl.store(dst + HALF + i, q2)
        else:  # positions 2j and 2j + 1 share byte j, the even one in the low nibble
            j = tl.arange(0, HALF // 2)
            even1, odd1 = tl.split(tl.reshape(q1, (HALF // 2, 2)))
            even2, odd2 = tl.split(tl.reshape(q2, (HALF // 2, 2)))
            tl.store(dst + j, even1 | (odd1 << 4))
            tl.store(dst + HALF // 2 + j, even2 | (odd2 << 4))
        row = kv_head * stride_sh + pos * stride_sr
        tl.store(Scales + row, scale1)
        tl.store(Biases + row, low1)
        if GROUPS == 2:
            tl.store(Scales + row + 1, scale2)
            tl.store(Biases + row + 1, low2)


@triton.jit
def _rope_and_cache_kernel(
    QKV, Cos, Sin, QNormW, KNormW, Qout, K, V, KScales, KBiases, KCentres, VScales, VBiases, VCentres, Start,
    stride_t, stride_qh, stride_qn, stride_kh, stride_kr, stride_vh, stride_vr, stride_sh, stride_sr, eps,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
    QK_NORM: tl.constexpr, START_IN_MEMORY: tl.constexpr, KV_BITS: tl.constexpr, KV_GROUPS: tl.constexpr,
):
    """One program per (head of q, k or v, token): heads 0..HEADS are q, then KV_HEADS of k, then v."""
    head = tl.program_id(0).to(tl.int64)  # 64-bit offsets: caches can pass 2^31 elements
    t = tl.program_id(1)
    if START_IN_MEMORY:  # a CUDA graph replays one launch at every position: read it on the device
        start = tl.load(Start)
    else:
        start = Start
    pos = (start + t).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = i < HALF
    dtype: tl.constexpr = Qout.dtype.element_ty
    src = QKV + t.to(tl.int64) * stride_t + head * (2 * HALF)
    x1 = tl.load(src + i, mask=ok, other=0.0).to(tl.float32)  # rotate-half layout: the two halves
    x2 = tl.load(src + HALF + i, mask=ok, other=0.0).to(tl.float32)
    if head < HEADS + KV_HEADS:
        if QK_NORM:  # Qwen3 normalises each q and k head before the rotation
            if head < HEADS:
                w1 = tl.load(QNormW + i, mask=ok, other=0.0).to(tl.float32)
                w2 = tl.load(QNormW + HALF + i, mask=ok, other=0.0).to(tl.float32)
            else:
                w1 = tl.load(KNormW + i, mask=ok, other=0.0).to(tl.float32)
                w2 = tl.load(KNormW + HALF + i, mask=ok, other=0.0).to(tl.float32)
            rstd = tl.math.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * HALF) + eps)
            x1 = _round(w1 * _round(x1 * rstd, dtype), dtype)
            x2 = _round(w2 * _round(x2 * rstd, dtype), dtype)
        cos = tl.load(Cos + pos * HALF + i, mask=ok, other=0.0).to(tl.float32)
        sin = tl.load(Sin + pos * HALF + i, mask=ok, other=0.0).to(tl.float32)
        # (x1 cos - x2 sin, x2 cos + x1 sin), each product rounded as PyTorch does in bf16/fp16.
        y1 = _round(_round(x1 * cos, dtype) - _round(x2 * sin, dtype), dtype)
        y2 = _round(_round(x2 * cos, dtype) + _round(x1 * sin, dtype), dtype)
        if head < HEADS:
            dst = Qout + head * stride_qh + t * stride_qn
            tl.store(dst + i, y1.to(dtype), mask=ok)
            tl.store(dst + HALF + i, y2.to(dtype), mask=ok)
        else:
            _store_cache_row(y1, y2, K, KScales, KBiases, KCentres, head - HEADS, pos, stride_kh, stride_kr, stride_sh,
                             stride_sr, i, ok, HALF, KV_BITS, KV_GROUPS, dtype)
    else:
        _store_cache_row(x1, x2, V, VScales, VBiases, VCentres, head - HEADS - KV_HEADS, pos, stride_vh, stride_vr,
                         stride_sh, stride_sr, i, ok, HALF, KV_BITS, KV_GROUPS, dtype)


@triton.jit
def _silu_mul_kernel(GateUp, Out, stride_g, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    dtype: tl.constexpr = Out.dtype.element_ty
    gate = tl.load(GateUp + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GateUp + row * stride_g + inter + cols, mask=ok, other=0.0).to(tl.float32)
    silu = _round(gate / (1.0 + tl.exp(-gate)), dtype)
    tl.store(Out + row * stride_o + cols, (silu * up).to(dtype), mask=ok)


def _check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise KernelInputError(f"{name} must be 2-D [tokens, features] with contiguous rows, got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise KernelInputError(f"{name} must be bfloat16 or float16, got {x.dtype}")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of each row of x [tokens, dim], scaled by weight [dim].

    With `residual` (same shape and dtype) the rows normalised are x + residual, and the result
    is (normalised, x + residual): the residual add that precedes each norm, in the same pass.
    """
    _check_rows("x", x)
    dim = x.shape[1]
    if weight.shape != (dim,) or weight.dtype != x.dtype or weight.device != x.device:
        raise KernelInputError(f"weight must be [{dim}] in {x.dtype} on {x.device}, got {tuple(weight.shape)} "
                               f"{weight.dtype} on {weight.device}")
    add = residual is not None
    if add and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise KernelInputError(f"residual must match x ({tuple(x.shape)}, {x.dtype}), got {tuple(residual.shape)} "
                               f"{residual.dtype}")
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if add else out
    residual = residual if add else x
    block = triton.next_power_of_2(dim)
    _rms_norm_kernel[(x.shape[0],)](
        x, residual, summed, weight, out, x.stride(0), residual.stride(0), summed.stride(0), out.stride(0), dim, eps,
        BLOCK=block, ADD=add, num_warps=8 if block > 4096 else 4,
    )
    return (out, summed) if add else out


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_k: torch.Tensor | QuantizedRows,
    cache_v: torch.Tensor | QuantizedRows,
    start: int | torch.Tensor,
    heads: int,
    *,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """Split the fused projection qkv [n, (heads + 2 kv_heads) * head_dim] at positions
    start..start+n: rotate q and k by the tables cos/sin [capacity, head_dim // 2] (rotate-half
    layout, indexed by position here), write k and v to cache rows start..start+n
    ([kv_heads, capacity, head_dim]), and return q as [heads, n, head_dim].

    The caches may be a draft's quantized ones (QuantizedRows, groups of head_dim or head_dim / 2):
    rows are then quantized as they are written, against centres already set (the write at row 0
    sets them: backends/torch/quantized_kv.py). `q_norm`/`k_norm` [head_dim]: RMSNorm weights
    applied to each head before the rotation (Qwen3). `start` may be a one-element int32 device
    tensor (CUDA graphs); it is then trusted.
    """
    _check_rows("qkv", qkv)
    kv_heads, capacity, head_dim = cache_k.shape
    n = qkv.shape[0]
    if head_dim % 2 or qkv.shape[1] != (heads + 2 * kv_heads) * head_dim:
        raise KernelInputError(f"qkv must have (heads + 2 kv_heads) * head_dim = {(heads + 2 * kv_heads) * head_dim} "
                               f"features for {heads} heads and the cache's {kv_heads} x {head_dim}, got {qkv.shape[1]}")
    quantized = isinstance(cache_k, QuantizedRows)
    if quantized:
        _check_quantized_caches(cache_k, cache_v, head_dim)
        k_parts, v_parts = ((c.values, c.scales, c.biases, c.centres) for c in (cache_k, cache_v))
    else:
        if cache_v.shape != cache_k.shape or cache_k.stride(2) != 1 or cache_v.stride(2) != 1:
            raise KernelInputError(f"caches must be [kv_heads, capacity, head_dim] with contiguous rows, got "
                                   f"{tuple(cache_k.shape)} and {tuple(cache_v.shape)}")
        k_parts, v_parts = (cache_k,) * 4, (cache_v,) * 4  # the scale, bias and centre pointers are unused
    tables = (cos, sin) + ((cache_k, cache_v) if not quantized else ()) + ((q_norm, k_norm) if q_norm is not None else ())
    if any(t.dtype != qkv.dtype or t.device != qkv.device for t in tables):
        raise KernelInputError(f"rotary tables, caches and norm weights must be {qkv.dtype} on {qkv.device}")
    if cos.shape != sin.shape or cos.shape[1:] != (head_dim // 2,) or not cos.is_contiguous() or not sin.is_contiguous():
        raise KernelInputError(f"rotary tables must be contiguous [positions, {head_dim // 2}], got {tuple(cos.shape)} "
                               f"and {tuple(sin.shape)}")
    in_memory = isinstance(start, torch.Tensor)
    if not in_memory and not (0 <= start and start + n <= min(capacity, cos.shape[0])):
        raise KernelInputError(f"positions {start}..{start + n} do not fit the cache ({capacity} rows) and rotary "
                               f"tables ({cos.shape[0]} positions)")
    q = torch.empty(heads, n, head_dim, dtype=qkv.dtype, device=qkv.device)
    qk_norm = q_norm is not None
    scale_strides = cache_k.scales.stride()[:2] if quantized else (0, 0)
    _rope_and_cache_kernel[(heads + 2 * kv_heads, n)](
        qkv, cos, sin, q_norm if qk_norm else cos, k_norm if qk_norm else cos, q, k_parts[0], v_parts[0],
        *k_parts[1:], *v_parts[1:], start,
        qkv.stride(0), q.stride(0), q.stride(1), k_parts[0].stride(0), k_parts[0].stride(1), v_parts[0].stride(0),
        v_parts[0].stride(1), *scale_strides, eps,
        HEADS=heads, KV_HEADS=kv_heads, HALF=head_dim // 2, BLOCK=triton.next_power_of_2(head_dim // 2),
        QK_NORM=qk_norm, START_IN_MEMORY=in_memory, KV_BITS=cache_k.bits if quantized else 16,
        KV_GROUPS=head_dim // cache_k.group_size if quantized else 1, num_warps=1,
    )
    return q


def writes_quantized_rows(cache: QuantizedRows, head_dim: int) -> bool:
    """Whether rope_and_cache writes into such a quantized cache: groups of the whole row or of
    each half, a power-of-two half."""
    half = head_dim // 2
    return cache.group_size in (head_dim, half) and half & (half - 1) == 0 and half >= 2


def _check_quantized_caches(cache_k: QuantizedRows, cache_v: QuantizedRows, head_dim: int) -> None:
    if not isinstance(cache_v, QuantizedRows) or cache_v.shape != cache_k.shape or \
            (cache_v.bits, cache_v.group_size) != (cache_k.bits, cache_k.group_size):
        raise KernelInputError("keys and values must both be quantized alike (QuantizedRows of one shape)")
    if not writes_quantized_rows(cache_k, head_dim):
        raise KernelInputError(f"rope_and_cache quantizes groups of head_dim or head_dim / 2 with a power-of-two half, "
                               f"got groups of {cache_k.group_size} for head_dim {head_dim}")
    for cache in (cache_k, cache_v):
        if cache.values.dtype != torch.uint8 or cache.values.stride(2) != 1 or cache.scales.stride() != cache_k.scales.stride() \
                or cache.biases.stride() != cache_k.scales.stride() or not cache.centres.is_contiguous():
            raise KernelInputError("quantized caches must be uint8 values with contiguous rows, scales and biases "
                                   "of one layout, contiguous centres")


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [tokens, 2 * intermediate] = [gate | up] (SwiGLU)."""
    _check_rows("gate_up", gate_up)
    if gate_up.shape[1] % 2:
        raise KernelInputError(f"gate_up must hold gate and up side by side (an even width), got {gate_up.shape[1]}")
    inter = gate_up.shape[1] // 2
    out = torch.empty(gate_up.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(gate_up.shape[0], triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4,
    )
    return out
