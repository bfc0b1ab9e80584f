"""Two-stage selection's second stage on the GPU: of the draft's nominated rows, keep the budget
with the most attention mass of the verification block's own queries.

Per unit (a KV head) the nominated list [m] is sorted and holds the sink and the window. The mass
of a candidate is the sum, over the unit's queries (its query heads x the block's n positions), of
their softmax over the candidates and the block itself (causally): mask.candidate_attention is
the reference. The torch-ops path (backends/torch/selection.refine_sets) issues some twenty small
kernels per layer, each a few microseconds however little it reads; here it is three:

  1. scores: one program per (unit, 64 candidates) gathers their keys, writes the block's logits
     and its per-query max and sum of exponentials; one more program per unit covers the block's
     own rows (they enter the softmax's normaliser, not the selection);
  2. mass: the same grid merges the partial sums into each query's log-sum-exp and writes each
     candidate's mass;
  3. keep: one program per unit finds the budget's threshold by a search on the masses' bits
     (non-negative floats order as their bit patterns; ranked to one part in 1024), then compacts
     the rows between the sink and the window to those at or above it (ties by position): the
     output stays sorted, as the attention kernels need, with no sort.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sts_edge.triton_kernels.verify_attention import INTERPRETED

LOG2E = 1.4426950408889634
ROWS = 64  # candidates per program of the first two kernels
MAX_NOMINATED = 16384  # the keep kernel holds a unit's whole list in one program's registers
KEY_SHIFT = tl.constexpr(13)  # masses ranked on 10 of float32's 23 mantissa bits: one part in 1024
FLOOR_OCTAVES = tl.constexpr(19)  # masses below 2^-19 of a unit's largest rank as equal


@triton.jit
def _scores_kernel(Q, K, Nominated, Start, Logits, PartMax, PartSum,
                   stride_qh, stride_qn, stride_kh, stride_kr, stride_nu, stride_lu, stride_lq, stride_pu, stride_ps,
                   m, scale_log2,
                   N: tl.constexpr, HEADS_PER_UNIT: tl.constexpr, GROUP: tl.constexpr, QP: tl.constexpr,
                   HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, START_IN_MEMORY: tl.constexpr,
                   UPCAST: tl.constexpr):
    unit = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1) - 1  # the last program of a unit takes the block's own rows
    start = tl.load(Start) if START_IN_MEMORY else Start
    j = tl.arange(0, QP)  # the unit's queries: head unit * HEADS_PER_UNIT + j // N at position start + j % N
    live_q = j < HEADS_PER_UNIT * N
    head = unit * HEADS_PER_UNIT + j // N
    kv = (unit * HEADS_PER_UNIT) // GROUP
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + head[:, None].to(tl.int64) * stride_qh + (j % N)[:, None] * stride_qn + d[None, :],
                mask=live_q[:, None], other=0.0)
    r = tl.arange(0, ROWS)
    slot = split * ROWS + r
    candidate = slot < m
    in_block = slot >= splits * ROWS  # the unit's last program (m <= splits * ROWS)
    nominated = tl.load(Nominated + unit * stride_nu + slot, mask=candidate, other=0)
    rows = tl.where(in_block, start + r, nominated)
    live_r = candidate | (in_block & (r < N))
    visible = live_q[:, None] & live_r[None, :] & (~in_block[None, :] | (r[None, :] <= (j % N)[:, None]))
    k = tl.load(K + kv.to(tl.int64) * stride_kh + rows[:, None].to(tl.int64) * stride_kr + d[None, :],
                mask=live_r[:, None], other=0.0)
    if UPCAST:  # the interpreter multiplies bf16 as raw integers
        q, k = q.to(tl.float32), k.to(tl.float32)
    logits = tl.where(visible, tl.dot(q, tl.trans(k)) * scale_log2, float("-inf"))  # log2 units
    top = tl.maximum(tl.max(logits, axis=1), -1e30)  # rows no query sees stay finite
    total = tl.sum(tl.math.exp2(logits - top[:, None]), axis=1)
    tl.store(PartMax + unit * stride_pu + split * stride_ps + j, top)
    tl.store(PartSum + unit * stride_pu + split * stride_ps + j, total)
    tl.store(Logits + unit * stride_lu + j[:, None] * stride_lq + slot[None, :], logits,
             mask=live_q[:, None] & candidate[None, :])  # padding queries are neither written nor read


@triton.jit
def _mass_kernel(Logits, PartMax, PartSum, Mass, stride_lu, stride_lq, stride_pu, stride_ps, stride_mu, m,
                 N: tl.constexpr, HEADS_PER_UNIT: tl.constexpr, QP: tl.constexpr, SP: tl.constexpr,
                 ROWS: tl.constexpr):
    unit = tl.program_id(0)
    split = tl.program_id(1)
    parts = tl.num_programs(1) + 1
    s = tl.arange(0, SP)
    j = tl.arange(0, QP)
    live_s = s < parts
    part_max = tl.load(PartMax + unit * stride_pu + s[:, None] * stride_ps + j[None, :], mask=live_s[:, None],
                       other=-1e30)
    part_sum = tl.load(PartSum + unit * stride_pu + s[:, None] * stride_ps + j[None, :], mask=live_s[:, None],
                       other=0.0)
    top = tl.max(part_max, axis=0)
    total = tl.sum(part_sum * tl.math.exp2(part_max - top[None, :]), axis=0)  # >= 1 for a live query
    lse = top + tl.math.log2(tl.maximum(total, 1e-30))  # [QP]; the floor keeps padding queries finite
    slot = split * ROWS + tl.arange(0, ROWS)
    live_r = slot < m
    live_q = j < HEADS_PER_UNIT * N
    logits = tl.load(Logits + unit * stride_lu + j[:, None] * stride_lq + slot[None, :],
                     mask=live_q[:, None] & live_r[None, :], other=float("-inf"))
    p = tl.where(live_q[:, None], tl.math.exp2(logits - lse[:, None]), 0.0)
    tl.store(Mass + unit * stride_mu + slot, tl.sum(p, axis=0), mask=live_r)


@triton.jit
def _keep_kernel(Mass, Nominated, Out, stride_mu, stride_nu, stride_ou, m, budget, sink, window,
                 MP: tl.constexpr, FP: tl.constexpr):
    unit = tl.program_id(0)
    f = tl.arange(0, FP)  # sink and window: the list's first and last entries, kept as they are
    tl.store(Out + unit * stride_ou + f, tl.load(Nominated + unit * stride_nu + f, mask=f < sink), mask=f < sink)
    tl.store(Out + unit * stride_ou + sink + budget + f,
             tl.load(Nominated + unit * stride_nu + m - window + f, mask=f < window), mask=f < window)
    i = tl.arange(0, MP)  # the rows between them, of which the budget is kept
    live = i < m - sink - window
    rows = tl.load(Nominated + unit * stride_nu + sink + i, mask=live, other=0)
    bits = tl.maximum(tl.load(Mass + unit * stride_mu + sink + i, mask=live, other=0.0), 0.0).to(tl.int32, bitcast=True)
    # Non-negative floats order as their bit patterns. The key drops the low KEY_SHIFT mantissa bits
    # and all below 2^-FLOOR_OCTAVES of the unit's largest mass: a ranking finer than bf16 keys can
    # resolve (a mass that small is noise beside the largest), in keys below 19 x 1024 + 1 <= 3^9,
    # so nine search passes where the full bits take 31 (each a reduction the program waits on).
    floor = tl.maximum(tl.max(bits, axis=0) - (FLOOR_OCTAVES << 23), 0)
    key = tl.where(live, (tl.maximum(bits, floor) - floor) >> KEY_SHIFT, -1)
    # The largest t with at least `budget` keys at or above it, by thirds: both counts of a pass in
    # one reduction (each below 2^16), nine passes where halving takes fifteen;
    # count(key >= low) >= budget > count(key >= high) throughout.
    low = tl.full([], 0, tl.int32)
    high = tl.max(key, axis=0) + 1
    above_high = tl.full([], 0, tl.int32)  # count(key >= high)
    while high - low > 1:
        third = (high - low + 2) // 3
        t1 = low + third
        t2 = tl.minimum(t1 + third, high)
        packed = tl.sum((key >= t1).to(tl.int32) + ((key >= t2).to(tl.int32) << 16), axis=0)
        c1 = packed & 0xFFFF
        c2 = packed >> 16
        if c2 >= budget:
            low = t2
        elif c1 >= budget:
            low = t1
            high = t2
            above_high = c2
        else:
            high = t1
            above_high = c1
    above = key > low
    ties = key == low
    room = budget - above_high  # for the ties at low, earliest first
    # One scan for both running counts (each below 2^16), where the kept rows' slots would take a
    # second scan after the ties' one: a kept row's slot is the rows above the threshold so far
    # plus the ties kept so far.
    running = tl.cumsum(above.to(tl.int32) + (ties.to(tl.int32) << 16), axis=0)
    ties_so_far = running >> 16
    keep = above | (ties & (ties_so_far <= room))
    slot = (running & 0xFFFF) + tl.minimum(ties_so_far, room) - 1
    tl.store(Out + unit * stride_ou + sink + slot, rows, mask=keep)


def keep_warps(middle: int) -> int:
    """The threshold search is bound by its reductions' latency: more warps shorten each only
    while they have work (1, 2, 16 or 32 warps did worse; so did other searches: benchmarks/README.md)."""
    return 8 if middle >= 4096 else 4


def refine_sets_kernel(q: torch.Tensor, cache_k: torch.Tensor, start: int | torch.Tensor, nominated: torch.Tensor,
                       budget: int, sink: int, window: int) -> torch.Tensor:
    """selection.refine_sets on the GPU, one set per KV head or per query head: q [heads, n,
    head_dim] at positions start..; cache_k [kv_heads, capacity, head_dim] in q's dtype; nominated
    int32 [units, m] sorted, its first `sink` entries the sink and its last `window` the window
    (as select_sets lays them out), at least `budget` between; `start` an int or a one-element
    int32 device tensor. Returns sorted int32 [units, budget + sink + window]."""
    heads, n, head_dim = q.shape
    kv_heads = cache_k.shape[0]
    units, m = nominated.shape
    if m > MAX_NOMINATED:
        raise ValueError(f"{m} nominated rows per unit; the kernel takes at most {MAX_NOMINATED}")
    heads_per_unit = heads // units
    queries = heads_per_unit * n
    qp = max(16, triton.next_power_of_2(queries))
    splits = triton.cdiv(m, ROWS)
    device = q.device
    nominated = nominated.to(torch.int32).contiguous()
    logits = torch.empty(units, qp, m, dtype=torch.float32, device=device)
    part_max = torch.empty(units, splits + 1, qp, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    mass = torch.empty(units, m, dtype=torch.float32, device=device)
    in_memory = isinstance(start, torch.Tensor)
    _scores_kernel[(units, splits + 1)](
        q, cache_k, nominated, start, logits, part_max, part_sum,
        q.stride(0), q.stride(1), cache_k.stride(0), cache_k.stride(1), nominated.stride(0), logits.stride(0),
        logits.stride(1), part_max.stride(0), part_max.stride(1), m, head_dim**-0.5 * LOG2E,
        N=n, HEADS_PER_UNIT=heads_per_unit, GROUP=heads // kv_heads, QP=qp, HEAD_DIM=head_dim, ROWS=ROWS,
        START_IN_MEMORY=in_memory, UPCAST=INTERPRETED)
    _mass_kernel[(units, splits)](
        logits, part_max, part_sum, mass, logits.stride(0), logits.stride(1), part_max.stride(0), part_max.stride(1),
        mass.stride(0), m, N=n, HEADS_PER_UNIT=heads_per_unit, QP=qp, SP=triton.next_power_of_2(splits + 1), ROWS=ROWS)
    return keep_heaviest(mass, nominated, budget, sink, window)


def keep_heaviest(mass: torch.Tensor, nominated: torch.Tensor, budget: int, sink: int, window: int) -> torch.Tensor:
    """The third kernel alone: of each unit's nominated rows (int32 [units, m], laid out as in
    refine_sets_kernel), the sink, the window and the `budget` rows between them with the largest
    masses (float32 [units, m], non-negative), ranked to one part in 1024, ties by position.
    Returns sorted int32 [units, budget + sink + window]."""
    units, m = nominated.shape
    out = torch.empty(units, budget + sink + window, dtype=torch.int32, device=nominated.device)
    middle = triton.next_power_of_2(m - sink - window)
    _keep_kernel[(units,)](mass, nominated, out, mass.stride(0), nominated.stride(0), out.stride(0), m, budget, sink,
                           window, MP=middle, FP=triton.next_power_of_2(max(sink, window, 1)),
                           num_warps=keep_warps(middle))
    return out
