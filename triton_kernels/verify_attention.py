"""Verification attention over index lists (or the whole context), split over the KV length.

The target verifies a block of n = gamma + 1 queries at positions start..start+n. In each layer,
every query head of KV group k attends to the rows I(k) of the KV cache (a sorted, per-KV-head
list, CSR-style) plus the block itself, causally. With no lists the same kernel reads rows
0..start: that is our dense verification path.

Layout of the work (flash-decoding):
  * one program per (KV head, split of its list). The program's query tile packs all `group`
    query heads of the KV head and all n queries ([group * n, head_dim]), so each K/V row it
    gathers is loaded once and used by every query that needs it;
  * one more program per KV head attends to the block's own n rows, with the causal mask;
  * a merge kernel combines the splits' partial outputs by their log-sum-exp.

The same two kernels serve the draft (n = 1 decode step, dense) and write the probabilities
for draft_attention.py to turn into importance scores.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_QUERIES = 16
HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16)
# Triton's CPU interpreter (TRITON_INTERPRET=1, how CI runs these kernels) stores bf16 as uint16
# and its tl.dot then multiplies the raw integers; there, bf16 tiles are upcast before each dot.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
PDL_DEFAULT = os.environ.get("STS_EDGE_PDL", "1") == "1"
# The merge reads up to this many splits per pass: one pass over all of them is one round trip to L2
# (benchmarks/README.md measures it against passes of 16).
MERGE_SPLITS = 64


class KernelInputError(ValueError):
    """An input the kernels cannot take; the message says which and what is expected."""


@dataclass(frozen=True)
class IndexLists:
    """Rows each KV head reads, laid end to end (CSR): KV head k reads indices[offsets[k]:offsets[k+1]].

    indices: int32, flat, each list sorted ascending without repeats, inside the committed context;
    offsets: int32 [kv_heads + 1]; longest: the longest list (computed, with a sync, when None)."""

    indices: torch.Tensor
    offsets: torch.Tensor
    longest: int | None = None


@dataclass(frozen=True)
class QuantizedRows:
    """A KV cache quantized group-wise along head_dim (backends/torch/quantized_kv.py): values uint8
    [kv_heads, capacity, head_dim * bits / 8] (4 bits: two to a byte, the even position in the low
    nibble), scales and biases float32 [kv_heads, capacity, head_dim / group_size], centres float32
    [kv_heads, head_dim], value = scale * q + bias + centre. The kernels decode 8-bit rows as they
    load them and multiply 4-bit codes as they are (exactly, where decoding rounds each value to
    the model's dtype); nothing is decoded to memory."""

    values: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor
    centres: torch.Tensor
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        kv_heads, capacity, width = self.values.shape
        return kv_heads, capacity, width * 8 // self.bits


@dataclass(frozen=True)
class ProbabilityOutputs:
    """Where the dense path stores the draft's attention probabilities (see split_attention)."""

    tile_probs: torch.Tensor
    tile_max: torch.Tensor
    lse: torch.Tensor


@dataclass(frozen=True)
class Launch:
    """Launch settings of split_attention; None picks the tuned default (benchmarks/README.md).

    `block_m` (a power of two >= 16) pads the packed query tile of group * n rows. `pdl`: launch
    both kernels with programmatic dependent launch (Hopper and later), so each one's launch
    overlaps the tail of the kernel before it; each waits for that kernel's completion before its
    first memory access. By default on where the GPU has it, unless STS_EDGE_PDL=0. `early_next`:
    the caller's next kernel is PDL-launched too (draft_attention's fold): the merge lets it launch
    as soon as every merge program has started, not as they end."""

    num_splits: int | None = None
    block_m: int | None = None
    block_n: int | None = None
    num_warps: int = 4
    num_stages: int | None = None
    pdl: bool | None = None
    early_next: bool = False


@triton.jit
def _load_rows(base, scale_base, bias_base, centre_base, rows, stride_r, stride_sr, ok, D: tl.constexpr,
               BLOCK: tl.constexpr, KV_BITS: tl.constexpr, KV_GROUP: tl.constexpr, DTYPE: tl.constexpr):
    """Rows `rows` [BLOCK] of a cache [.., head_dim]: as stored (KV_BITS 16), or decoded from 8 bits
    (QuantizedRows) in float32 and rounded once to DTYPE, the model's, as
    quantized_kv.dequantize_rows decodes them. (4-bit caches are read by _nibbles instead.)"""
    d = tl.arange(0, D)
    if KV_BITS == 16:
        x = tl.load(base + rows[:, None] * stride_r + d[None, :], mask=ok[:, None], other=0.0)
    else:
        values = tl.load(base + rows[:, None] * stride_r + d[None, :], mask=ok[:, None], other=0)
        groups = tl.arange(0, D // KV_GROUP)
        scales = tl.load(scale_base + rows[:, None] * stride_sr + groups[None, :], mask=ok[:, None], other=0.0)
        biases = tl.load(bias_base + rows[:, None] * stride_sr + groups[None, :], mask=ok[:, None], other=0.0)
        scales = tl.reshape(tl.broadcast_to(scales[:, :, None], (BLOCK, D // KV_GROUP, KV_GROUP)), (BLOCK, D))
        biases = tl.reshape(tl.broadcast_to(biases[:, :, None], (BLOCK, D // KV_GROUP, KV_GROUP)), (BLOCK, D))
        centres = tl.load(centre_base + d)
        x = (values.to(tl.float32) * scales + biases + centres[None, :]).to(DTYPE)
    return x


# Four bytes of a 4-bit cache (eight values) -> float16 operands, exactly: each byte's low nibble q
# as q - 8 and its high nibble as 16 (q - 8). A nibble OR-ed under the exponent of 1024 is
# 1024 + q (float16's ulp there is 1), a high nibble left in place 1024 + 16 q; a packed
# multiply-add moves both down. Integer-to-float conversions and float32-to-16-bit roundings run at
# a fraction of the multiply-add rate, and decoding every value through them bounded the read; so
# the codes are multiplied as they are and the scales applied per group after the products. The
# even and odd positions stay apart (no interleaving: tl.join and tl.reshape compiled to a wrong
# order inside the pipelined loop on an H200, Triton 3.6).
NIBBLE_DECODE = tl.constexpr(
    "{ .reg .b32 t0, t1, one, low, high;"
    " mov.b32 one, 0x3C003C00; mov.b32 low, 0xE408E408; mov.b32 high, 0xE480E480;"
    " prmt.b32 t0, $4, 0, 0x4140; prmt.b32 t1, $4, 0, 0x4342;"
    " lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA; lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xEA;"
    " lop3.b32 $2, t0, 0x00F000F0, 0x64006400, 0xEA; lop3.b32 $3, t1, 0x00F000F0, 0x64006400, 0xEA;"
    " fma.rn.f16x2 $0, $0, one, low; fma.rn.f16x2 $1, $1, one, low;"
    " fma.rn.f16x2 $2, $2, one, high; fma.rn.f16x2 $3, $3, one, high; }")


@triton.jit
def _nibbles(base, rows, stride_r, ok, D: tl.constexpr, IN_PTX: tl.constexpr):
    """Rows `rows` of a 4-bit cache as (q - 8 of the even positions, 16 (q - 8) of the odd ones),
    each [rows, D / 2], exact: float16 on the GPU, float32 under the interpreter."""
    half = tl.arange(0, D // 2)
    packed = tl.load(base + rows[:, None] * stride_r + half[None, :], mask=ok[:, None], other=0)
    if IN_PTX:
        low, high = tl.inline_asm_elementwise(NIBBLE_DECODE, "=r,=r,=r,=r,r", [packed],
                                              dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        b = packed.to(tl.int32)
        low = ((b & 15) - 8).to(tl.float32)
        high = (((b >> 4) - 8) * 16).to(tl.float32)
    return low, high


@triton.jit
def _code_logits(q_low, q_high, q_both, q_dot_centre, base, scale_base, bias_base, rows, stride_r, stride_sr, ok,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, KV_GROUP: tl.constexpr,
                 IN_PTX: tl.constexpr):
    """q . k for 4-bit keys, per group g: scale_g (q_g . (code - 8)) + (bias_g + 8 scale_g) sum(q_g),
    plus q . centre. The codes multiply on tensor cores as they are; no key is decoded to a float.
    q_low and q_high are q's even and odd positions (the odd ones over 16), q_both their sum."""
    low, high = _nibbles(base, rows, stride_r, ok, D, IN_PTX)
    half = tl.arange(0, D // 2)
    s = tl.zeros((BLOCK_M, BLOCK), tl.float32) + q_dot_centre[:, None]
    for g in tl.static_range(D // KV_GROUP):
        in_group = (half // (KV_GROUP // 2)) == g  # positions 2j and 2j + 1 share a group
        part = tl.dot(tl.where(in_group[None, :], q_low, 0.0), tl.trans(low))
        part = tl.dot(tl.where(in_group[None, :], q_high, 0.0), tl.trans(high), part)
        scale = tl.load(scale_base + rows * stride_sr + g, mask=ok, other=0.0)
        bias = tl.load(bias_base + rows * stride_sr + g, mask=ok, other=0.0)
        q_sum = tl.sum(tl.where(in_group[None, :], q_both, 0.0), 1)
        s += part * scale[None, :] + q_sum[:, None] * (bias + 8 * scale)[None, :]
    return s


@triton.jit
def _code_values(p, base, scale_base, bias_base, rows, stride_r, stride_sr, ok, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, KV_GROUP: tl.constexpr, CODE_DTYPE: tl.constexpr, IN_PTX: tl.constexpr):
    """p . (v - centre) for 4-bit values, even and odd positions apart ([BLOCK_M, D / 2] each): per
    group, (p scale_g) . (code - 8) on tensor cores plus p . (bias_g + 8 scale_g). The codes are
    exact small integers, so p scale_g's one rounding to 16 bits is the only one (decoding rounds
    every value instead)."""
    low, high = _nibbles(base, rows, stride_r, ok, D, IN_PTX)
    half = tl.arange(0, D // 2)
    even = tl.zeros((BLOCK_M, D // 2), tl.float32)
    odd = tl.zeros((BLOCK_M, D // 2), tl.float32)
    for g in tl.static_range(D // KV_GROUP):
        in_group = ((half // (KV_GROUP // 2)) == g)[None, :]
        scale = tl.load(scale_base + rows * stride_sr + g, mask=ok, other=0.0)
        bias = tl.load(bias_base + rows * stride_sr + g, mask=ok, other=0.0)
        weighted = (p * scale[None, :]).to(CODE_DTYPE)
        offset = tl.sum(p * (bias + 8 * scale)[None, :], 1)[:, None]
        even += tl.where(in_group, tl.dot(weighted, low) + offset, 0.0)
        odd += tl.where(in_group, tl.dot(weighted, high) * 0.0625 + offset, 0.0)
    return even, odd


@triton.jit
def _split_attention_kernel(
    Q, K, V, KScales, KBiases, KCentres, VScales, VBiases, VCentres, Idx, Offsets, Opart, Lpart, Probs, TileMax,
    stride_qh, stride_qn, stride_kh, stride_kr, stride_vh, stride_vr, stride_ksh, stride_ksr, stride_vsh, stride_vsr,
    stride_kch, stride_vch,
    stride_ph, stride_pn, stride_th, stride_tn,
    Start, rows_per_split, num_splits, qk_scale, block_slot,
    N: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SELF: tl.constexpr,
    DENSE: tl.constexpr, WRITE_PROBS: tl.constexpr, UPCAST: tl.constexpr, START_IN_MEMORY: tl.constexpr,
    USE_PDL: tl.constexpr, KV_BITS: tl.constexpr, KV_GROUP: tl.constexpr, UPCAST_CODES: tl.constexpr,
):
    if USE_PDL:  # launched while the kernel before it finishes: no memory access before this wait
        tl.extra.cuda.gdc_wait()
    if START_IN_MEMORY:  # a CUDA graph replays one launch at every position: read it on the device
        start = tl.load(Start)
    else:
        start = Start
    kv_head = tl.program_id(0).to(tl.int64)  # 64-bit offsets: caches can pass 2^31 elements
    split = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    valid_m = m < GROUP * N
    head = kv_head * GROUP + m // N
    query = m % N
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_vh
    ks_base, kb_base = KScales + kv_head * stride_ksh, KBiases + kv_head * stride_ksh
    vs_base, vb_base = VScales + kv_head * stride_vsh, VBiases + kv_head * stride_vsh
    kc_base, vc_base = KCentres + kv_head * stride_kch, VCentres + kv_head * stride_vch
    # 4-bit caches are read by products with their codes (_code_logits, _code_values); 8-bit ones
    # are decoded row by row (_load_rows).
    CODES: tl.constexpr = KV_BITS == 4
    IN_PTX: tl.constexpr = not UPCAST_CODES
    CODE_DTYPE: tl.constexpr = tl.float32 if UPCAST_CODES else tl.float16
    q_at = Q + head[:, None] * stride_qh + query[:, None] * stride_qn
    if CODES:
        half = tl.arange(0, D // 2)
        q_even = tl.load(q_at + 2 * half[None, :], mask=valid_m[:, None], other=0.0).to(tl.float32)
        q_odd = tl.load(q_at + 2 * half[None, :] + 1, mask=valid_m[:, None], other=0.0).to(tl.float32)
        q_dot_centre = tl.sum(q_even * tl.load(kc_base + 2 * half)[None, :] + q_odd * tl.load(kc_base + 2 * half + 1)[None, :], 1)
        # float16 holds a bfloat16 query to within 2^-25 where |q| < 65504 (attention queries are)
        q_low, q_high, q_both = q_even.to(CODE_DTYPE), (q_odd * 0.0625).to(CODE_DTYPE), q_even + q_odd
        acc_even = tl.zeros([BLOCK_M, D // 2], tl.float32)
        acc_odd = tl.zeros([BLOCK_M, D // 2], tl.float32)
    else:
        q = tl.load(q_at + d[None, :], mask=valid_m[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if split < num_splits:
        # A slice of the context rows: rows I(k)[lo:hi] (or lo..hi when dense).
        if DENSE:
            seg_lo = 0
            seg_hi = start
            if START_IN_MEMORY:  # the launch was sized for a graph's `bound`: spread the live rows over every split
                rows_per_split = tl.cdiv(tl.cdiv(tl.maximum(start, 1), num_splits), BLOCK_N) * BLOCK_N
        else:
            seg_lo = tl.load(Offsets + kv_head)
            seg_hi = tl.load(Offsets + kv_head + 1)
        lo = seg_lo + split * rows_per_split
        hi = tl.minimum(lo + rows_per_split, seg_hi)
        for r in range(lo, hi, BLOCK_N):
            pos = r + tl.arange(0, BLOCK_N)
            ok = pos < hi
            if DENSE:
                rows = pos.to(tl.int64)
            else:
                rows = tl.load(Idx + pos, mask=ok, other=0).to(tl.int64)
            if CODES:
                s = _code_logits(q_low, q_high, q_both, q_dot_centre, k_base, ks_base, kb_base, rows, stride_kr,
                                 stride_ksr, ok, D, BLOCK_M, BLOCK_N, KV_GROUP, IN_PTX) * qk_scale  # log2 domain
            else:
                # Both gathers are issued before any use, so the K and V rows are in flight together.
                k = _load_rows(k_base, ks_base, kb_base, kc_base, rows, stride_kr, stride_ksr, ok, D, BLOCK_N,
                               KV_BITS, KV_GROUP, Q.dtype.element_ty)
                v = _load_rows(v_base, vs_base, vb_base, vc_base, rows, stride_vr, stride_vsr, ok, D, BLOCK_N,
                               KV_BITS, KV_GROUP, Q.dtype.element_ty)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 domain
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            if WRITE_PROBS:  # dense only: this tile is context rows r..r+BLOCK_N, tile r // BLOCK_N
                tl.store(Probs + head[:, None] * stride_ph + query[:, None] * stride_pn + rows[None, :],
                         p.to(tl.float16), mask=valid_m[:, None] & ok[None, :])
                tl.store(TileMax + head * stride_th + query * stride_tn + r // BLOCK_N, m_new, mask=valid_m)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if CODES:
                even, odd = _code_values(p, v_base, vs_base, vb_base, rows, stride_vr, stride_vsr, ok, D, BLOCK_M,
                                         KV_GROUP, CODE_DTYPE, IN_PTX)
                acc_even = acc_even * alpha[:, None] + even
                acc_odd = acc_odd * alpha[:, None] + odd
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    else:
        # The block itself: query i sees block rows 0..i.
        j = tl.arange(0, BLOCK_SELF)
        rows = start + j
        ok_j = j < N
        if CODES:
            s = _code_logits(q_low, q_high, q_both, q_dot_centre, k_base, ks_base, kb_base, rows, stride_kr,
                             stride_ksr, ok_j, D, BLOCK_M, BLOCK_SELF, KV_GROUP, IN_PTX) * qk_scale
        else:
            k = _load_rows(k_base, ks_base, kb_base, kc_base, rows, stride_kr, stride_ksr, ok_j, D, BLOCK_SELF,
                           KV_BITS, KV_GROUP, Q.dtype.element_ty)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(ok_j[None, :] & (j[None, :] <= query[:, None]), s, float("-inf"))
        m_i = tl.max(s, 1)
        p = tl.math.exp2(s - m_i[:, None])
        if WRITE_PROBS:
            tl.store(Probs + head[:, None] * stride_ph + query[:, None] * stride_pn + rows[None, :],
                     p.to(tl.float16), mask=valid_m[:, None] & ok_j[None, :])
            tl.store(TileMax + head * stride_th + query * stride_tn + block_slot, m_i, mask=valid_m)
        l_i = tl.sum(p, 1)
        if CODES:
            acc_even, acc_odd = _code_values(p, v_base, vs_base, vb_base, rows, stride_vr, stride_vsr, ok_j, D,
                                             BLOCK_M, KV_GROUP, CODE_DTYPE, IN_PTX)
        else:
            v = _load_rows(v_base, vs_base, vb_base, vc_base, rows, stride_vr, stride_vsr, ok_j, D, BLOCK_SELF,
                           KV_BITS, KV_GROUP, Q.dtype.element_ty)
            if UPCAST:
                v = v.to(tl.float32)
            acc = tl.dot(p.to(v.dtype), v)

    if USE_PDL:  # the merge kernel may start launching now; it waits for these stores in gdc_wait
        tl.extra.cuda.gdc_launch_dependents()
    # Partial results: normalised output and log2-sum-exp of this split (-inf when it saw nothing).
    norm = tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.math.log2(l_i), float("-inf"))
    slot = kv_head * (num_splits + 1) + split
    out_at = Opart + (slot * BLOCK_M + m[:, None]) * D
    if CODES:  # the values' centres, which p . (v - centre) left out, come back with weight one
        tl.store(out_at + 2 * half[None, :], acc_even / norm + tl.load(vc_base + 2 * half)[None, :],
                 mask=valid_m[:, None])
        tl.store(out_at + 2 * half[None, :] + 1, acc_odd / norm + tl.load(vc_base + 2 * half + 1)[None, :],
                 mask=valid_m[:, None])
    else:
        tl.store(out_at + d[None, :], acc / norm, mask=valid_m[:, None])
    tl.store(Lpart + slot * BLOCK_M + m, lse, mask=valid_m)


@triton.jit
def _merge_kernel(
    Opart, Lpart, Out, Lse,
    stride_oh, stride_on, num_splits,
    N: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr, WRITE_LSE: tl.constexpr, USE_PDL: tl.constexpr, EARLY_NEXT: tl.constexpr,
):
    """One program per (query head, query): out = sum_s w_s * out_s, w_s = 2^(lse_s - lse)."""
    if USE_PDL:  # launched before the split kernel finished (programmatic dependent launch)
        tl.extra.cuda.gdc_wait()
    if EARLY_NEXT:  # the kernel after this one (PDL-launched, waiting on this one's end) may launch now
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)  # head * N + query
    head = row // N
    query = row % N
    kv_head = head // GROUP
    m = (head % GROUP) * N + query
    d = tl.arange(0, D)
    splits = num_splits + 1
    base = kv_head * splits
    # One pass, rescaling as the running max of the splits' lse grows (empty splits have -inf).
    top = tl.full([], float("-inf"), tl.float32)
    total = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = s < splits
        lse = tl.load(Lpart + (base + s) * BLOCK_M + m, mask=ok, other=float("-inf"))
        part = tl.load(Opart + ((base + s[:, None]) * BLOCK_M + m) * D + d[None, :], mask=ok[:, None], other=0.0)
        new_top = tl.maximum(top, tl.max(lse, 0))
        safe_top = tl.where(new_top == float("-inf"), 0.0, new_top)
        w = tl.math.exp2(lse - safe_top)
        rescale = tl.math.exp2(top - safe_top)
        acc = acc * rescale + tl.sum(part * w[:, None], 0)
        total = total * rescale + tl.sum(w, 0)
        top = new_top
    tl.store(Out + head * stride_oh + query * stride_on + d, (acc / total).to(Out.dtype.element_ty))
    if WRITE_LSE:
        tl.store(Lse + row, top + tl.math.log2(total))


def _check_inputs(q: torch.Tensor, cache_k: torch.Tensor | QuantizedRows, cache_v: torch.Tensor | QuantizedRows,
                  start: int) -> None:
    quantized = isinstance(cache_k, QuantizedRows)
    if quantized != isinstance(cache_v, QuantizedRows):
        raise KernelInputError("keys and values must both be quantized (QuantizedRows) or neither")
    if q.dim() != 3 or len(cache_k.shape) != 3 or len(cache_v.shape) != 3:
        raise KernelInputError(
            f"expected q [heads, n, head_dim] and caches [kv_heads, capacity, head_dim], got q {tuple(q.shape)}, "
            f"k {tuple(cache_k.shape)}, v {tuple(cache_v.shape)}"
        )
    if tuple(cache_k.shape) != tuple(cache_v.shape):
        raise KernelInputError(f"key and value caches differ in shape: {tuple(cache_k.shape)} vs {tuple(cache_v.shape)}")
    heads, n, head_dim = q.shape
    kv_heads, capacity, cache_dim = cache_k.shape
    if q.dtype not in DTYPES or (not quantized and (cache_k.dtype != q.dtype or cache_v.dtype != q.dtype)):
        raise KernelInputError(f"q, k and v must all be bfloat16 or float16, got {q.dtype}, "
                               f"{'quantized' if quantized else cache_k.dtype}, {'quantized' if quantized else cache_v.dtype}")
    if head_dim not in HEAD_DIMS or cache_dim != head_dim:
        raise KernelInputError(f"head_dim must be one of {HEAD_DIMS} in q and caches, got {head_dim} and {cache_dim}")
    if heads % kv_heads:
        raise KernelInputError(f"query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    if not 1 <= n <= MAX_QUERIES:
        raise KernelInputError(f"the block must have 1..{MAX_QUERIES} queries (gamma + 1), got {n}")
    if not 0 <= start or start + n > capacity:
        raise KernelInputError(f"block rows {start}..{start + n} do not fit the cache of {capacity} rows")
    tensors = [q] + ([part for cache in (cache_k, cache_v)
                      for part in (cache.values, cache.scales, cache.biases, cache.centres)] if quantized else [cache_k, cache_v])
    if any(t.stride(-1) != 1 for t in tensors):
        raise KernelInputError("the last axis of q and of every cache tensor must be contiguous")
    if any(t.device != q.device for t in tensors):
        raise KernelInputError(f"q and the caches are on different devices: {sorted({str(t.device) for t in tensors})}")
    if quantized:
        for cache in (cache_k, cache_v):
            groups = head_dim // cache.group_size if cache.group_size and head_dim % cache.group_size == 0 else 0
            if cache.bits not in (8, 4) or cache.values.dtype != torch.uint8 or not groups \
                    or groups & (groups - 1) or cache.group_size < 2:
                raise KernelInputError(f"quantized caches are uint8 values of 8 or 4 bits in groups dividing head_dim "
                                       f"into a power of two, got {cache.values.dtype}, {cache.bits} bits, groups of "
                                       f"{cache.group_size}")
            if cache.scales.shape != (kv_heads, capacity, groups) or cache.biases.shape != cache.scales.shape \
                    or cache.scales.stride() != cache.biases.stride() or cache.centres.shape != (kv_heads, head_dim) \
                    or {cache.scales.dtype, cache.biases.dtype, cache.centres.dtype} != {torch.float32}:
                raise KernelInputError(f"scales and biases must be float32 [{kv_heads}, {capacity}, {groups}] with one "
                                       f"layout and centres float32 [{kv_heads}, {head_dim}], got "
                                       f"{tuple(cache.scales.shape)}, {tuple(cache.biases.shape)} and "
                                       f"{tuple(cache.centres.shape)}")
        if (cache_k.bits, cache_k.group_size, cache_k.scales.stride()) != (cache_v.bits, cache_v.group_size,
                                                                           cache_v.scales.stride()):
            raise KernelInputError("keys and values must be quantized alike")


def check_index_lists(indices: torch.Tensor, offsets: torch.Tensor, kv_heads: int, start: int) -> None:
    """Raise KernelInputError unless the lists are int32, CSR-shaped, in range and sorted (strictly).

    This costs a pass over the lists and a device sync: callers that produced the lists
    themselves (selection.py) skip it.
    """
    if indices.dtype != torch.int32 or offsets.dtype != torch.int32:
        raise KernelInputError(f"indices and offsets must be int32, got {indices.dtype} and {offsets.dtype}")
    if indices.dim() != 1 or offsets.shape != (kv_heads + 1,):
        raise KernelInputError(
            f"expected flat indices and offsets [kv_heads + 1] = [{kv_heads + 1}], got {tuple(indices.shape)} and "
            f"{tuple(offsets.shape)}"
        )
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != indices.numel() or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise KernelInputError(f"offsets must rise from 0 to len(indices) = {indices.numel()}, got {bounds}")
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= start:
            raise KernelInputError(f"indices must lie in the committed context 0..{start - 1}, got {low}..{high}")
        rising = indices[1:] > indices[:-1]
        boundary = torch.zeros_like(rising)
        inner = torch.tensor([b - 1 for b in bounds[1:-1] if 0 < b < indices.numel()], dtype=torch.long, device=indices.device)
        boundary[inner] = True
        if not bool((rising | boundary).all()):
            raise KernelInputError("each KV head's index list must be sorted ascending without repeats")


def _num_splits(kv_heads: int, device: torch.device) -> int:
    """About two programs per multiprocessor (the best of a sweep: scripts/bench_kernels.py --sections
    tune). The launcher makes no split shorter than one tile, so short lists get fewer."""
    programs = 2 * (_multiprocessors(device) if device.type == "cuda" else 4)
    return math.ceil(programs / kv_heads)


@functools.cache
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def dense_tile_rows(cache_k: torch.Tensor | QuantizedRows) -> int:
    """Rows per tile of a dense read: 128, or 256 for a 4-bit cache, whose products with the codes
    do more work per byte read than a decoded tile's (the best of a sweep: benchmarks/README.md)."""
    return 256 if isinstance(cache_k, QuantizedRows) and cache_k.bits == 4 else 128


def pdl_available(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper and later, compiled (not interpreted), unless STS_EDGE_PDL=0."""
    return PDL_DEFAULT and not INTERPRETED and device.type == "cuda" and _capability(device) >= 9


def split_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor | QuantizedRows,
    cache_v: torch.Tensor | QuantizedRows,
    start: int | torch.Tensor,
    lists: IndexLists | None = None,
    *,
    bound: int | None = None,
    probs: ProbabilityOutputs | None = None,
    launch: Launch = Launch(),
    check: bool = True,
) -> torch.Tensor:
    """Attention of q [heads, n, head_dim] at positions start..start+n over a KV cache.

    cache_k/cache_v: [kv_heads, capacity, head_dim] with the block already written at rows
    start..start+n, in q's dtype or quantized (QuantizedRows, both alike). With `lists` each KV head reads its listed rows plus the block; without, rows
    0..start plus the block. Returns [heads, n, head_dim] in q's dtype (a view of [n, heads, head_dim]).

    For the draft's scores (dense only), `probs`: every row's probability is
    2^(tile_max[h, i, t] - lse[h * n + i]) * tile_probs[h, i, row], where t is the row's tile,
    row // block_n for context rows and the last column for the block's own rows. tile_probs
    [heads, n, >= start + n] float16 holds each tile's probabilities relative to the running max at
    that tile, in (0, 1]: 11 bits for those within 2^-14 of it, an absolute 2^-24 of it below, at
    half the bytes of float32 logits. tile_max [heads, n, cdiv(start, block_n) + 1] float32 (`bound`
    for `start` when that is on the device) holds those maxima (log2 domain), lse [heads * n] float32
    each query's log2-sum-exp.

    For CUDA graphs, `start` may be a one-element int32 device tensor read by the kernel, with
    `bound` >= start fixing the launch shape (and the widths of `probs`); inputs are then trusted.
    """
    pdl, early_next, num_warps = launch.pdl, launch.early_next, launch.num_warps
    block_m, block_n, num_stages, num_splits = launch.block_m, launch.block_n, launch.num_stages, launch.num_splits
    in_memory = isinstance(start, torch.Tensor)
    if pdl is None:
        pdl = pdl_available(q.device)
    if in_memory:
        if bound is None:
            raise KernelInputError("a device-side start needs `bound`, the largest start the launch must cover")
        check = False
    if check:
        _check_inputs(q, cache_k, cache_v, start)
    reach = bound if in_memory else start  # the most context rows any list can hold
    heads, n, head_dim = q.shape
    kv_heads = cache_k.shape[0]
    group = heads // kv_heads
    dense = lists is None
    if dense:
        longest = reach
        indices = offsets = q  # unused by the kernel
    else:
        indices, offsets, longest = lists.indices, lists.offsets, lists.longest
        if check:
            check_index_lists(indices, offsets, kv_heads, start)
        if longest is None:
            longest = int((offsets[1:] - offsets[:-1]).max())
    # Launch settings: the best of sweeps (benchmarks/README.md; bench_kernels.py --sections tune).
    # With index lists Triton's pipeliner shares num_stages - 1 stages between the index load and
    # the gathers it feeds, so 5 stages give the gathers two buffers where 2-4 give them one.
    block_n = block_n or (dense_tile_rows(cache_k) if dense else 32)
    num_stages = num_stages or ((3 if block_n > 128 else 2) if dense else 5)
    if num_splits is None:
        num_splits = _num_splits(kv_heads, q.device)
    # Whole tiles per split (at least one), then only as many splits as the longest list fills.
    rows_per_split = triton.cdiv(triton.cdiv(max(longest, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(longest, rows_per_split))
    packed = triton.next_power_of_2(group * n)
    if block_m is None:
        block_m = max(16, packed)
        if not dense and packed > 16 and q.is_cuda and not INTERPRETED and _capability(q.device) == 9:
            # Hopper, index lists: a 64-row tile makes Triton multiply with warpgroup MMAs, which
            # read the gathered K/V tile straight from shared memory; a 32-row tile (4 heads x 5-8
            # queries) goes through mma.sync and stalls on shared-memory loads. The dense path and
            # tiles of <= 16 rows gain nothing from it (benchmarks/README.md).
            block_m = max(64, packed)
    if block_m < max(16, packed) or block_m & (block_m - 1):
        raise KernelInputError(f"block_m must be a power of two >= max(16, group * n = {group * n}), got {block_m}")
    block_self = max(16, triton.next_power_of_2(n))
    opart = torch.empty(kv_heads * (num_splits + 1) * block_m * head_dim, dtype=torch.float32, device=q.device)
    lpart = torch.empty(kv_heads * (num_splits + 1) * block_m, dtype=torch.float32, device=q.device)
    write_probs = probs is not None
    block_slot = triton.cdiv(reach, block_n)  # tile_max's column for the block's own rows
    lse = probs.lse if write_probs else None
    if write_probs:
        tile_probs, tile_max = probs.tile_probs, probs.tile_max
        tiles = block_slot + 1
        if not dense:
            raise KernelInputError("probabilities are written by the dense path only (the draft's scores)")
        if tile_probs.dtype != torch.float16 or tile_probs.shape[:2] != (heads, n) or tile_probs.shape[2] < reach + n \
                or tile_probs.stride(2) != 1:
            raise KernelInputError(f"tile_probs must be float16 [{heads}, {n}, >= {reach + n}] with rows contiguous")
        if tile_max.dtype != torch.float32 or tile_max.shape != (heads, n, tiles) or tile_max.stride(2) != 1:
            raise KernelInputError(f"tile_max must be float32 [{heads}, {n}, {tiles}] (block_n {block_n}) with rows contiguous")
    else:
        tile_probs = tile_max = lpart
    if isinstance(cache_k, QuantizedRows):
        kv_bits, kv_group = cache_k.bits, cache_k.group_size
        k_parts, v_parts = ((cache.values, cache.scales, cache.biases, cache.centres) for cache in (cache_k, cache_v))
    else:  # the scale, bias and centre pointers are unused
        kv_bits, kv_group = 16, head_dim
        k_parts, v_parts = (cache_k,) * 4, (cache_v,) * 4
    _split_attention_kernel[(kv_heads, num_splits + 1)](
        q, k_parts[0], v_parts[0], *k_parts[1:], *v_parts[1:], indices, offsets, opart, lpart, tile_probs, tile_max,
        q.stride(0), q.stride(1), k_parts[0].stride(0), k_parts[0].stride(1), v_parts[0].stride(0), v_parts[0].stride(1),
        k_parts[1].stride(0), k_parts[1].stride(1), v_parts[1].stride(0), v_parts[1].stride(1),
        k_parts[3].stride(0), v_parts[3].stride(0),
        *(tile_probs.stride()[:2] if write_probs else (0, 0)), *(tile_max.stride()[:2] if write_probs else (0, 0)),
        start, rows_per_split, num_splits, head_dim**-0.5 * LOG2E, block_slot,
        N=n, GROUP=group, D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SELF=block_self,
        DENSE=dense, WRITE_PROBS=write_probs, UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
        START_IN_MEMORY=in_memory, USE_PDL=pdl, KV_BITS=kv_bits, KV_GROUP=kv_group, UPCAST_CODES=INTERPRETED,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )
    # Stored token-major, so that the caller's [n, heads * head_dim] for the output projection
    # is a view, not one more copy kernel per layer.
    out = torch.empty(n, heads, head_dim, dtype=q.dtype, device=q.device).transpose(0, 1)
    write_lse = lse is not None
    _merge_kernel[(heads * n,)](
        opart, lpart, out, lse if write_lse else lpart, out.stride(0), out.stride(1), num_splits,
        N=n, GROUP=group, D=head_dim, BLOCK_M=block_m, BLOCK_S=min(MERGE_SPLITS, triton.next_power_of_2(num_splits + 1)),
        WRITE_LSE=write_lse, USE_PDL=pdl, EARLY_NEXT=pdl and early_next, num_warps=4, launch_pdl=pdl,
    )
    return out
