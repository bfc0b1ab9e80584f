"""Benchmark the Triton kernels of the CUDA backend on a GPU; JSON out.

    python scripts/bench_kernels.py --out benchmarks/results/kernels_h100.json

Sections (--sections):
  verify  sparse verification attention (Llama-3.1-8B layer: 32 query / 8 KV heads, head_dim 128,
          bf16) at contexts 8K/32K/128K, gamma+1 of 1/5/8, budgets 256/512/2048/10%, against
          (a) our dense kernel, (b) SDPA, (c) the plain gather path, all in this run;
  draft   the draft's decode attention with STS scores (Llama-3.2-1B layer: 32/8 heads,
          head_dim 64) against the same kernel without scores and SDPA;
  select  top-B selection with sink and window for every layer of the target in one call:
          selection.py's torch.topk against the issue's alternative, a sorting-free threshold
          kernel (below, not used by the runtime: it lost at 32K and 128K);
  ceiling what reading the same bytes costs with no attention at all, at 128K with 10% kept: a
          Triton kernel that only gathers the rows (best of a small sweep), the same kernel on
          contiguous rows, and torch.sum over as many contiguous bytes; the sparse kernel beside them;
  round   one speculative round (gamma 4, budget 512) of Llama-3.1-8B-shaped target and
          Llama-3.2-1B-shaped draft with random weights, split into draft, selection and
          verification, dense speculative decoding against STS (see scripts/bench_round.py).

Every kernel is checked against a float32 reference before it is timed. Times are medians of
CUDA-graph replays of at least 16 calls each (so launch overhead is out), cycling over enough
copies of the inputs to exceed the L2 cache and over fresh index lists for every call; bandwidth
counts the bytes the kernel must read (selected K/V rows, the block's rows, the index lists).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sts_edge.backends.torch.attention import attend_and_score, causal_block_mask, sparse_attend
from sts_edge.backends.torch.attention import dense_attend as attend
from sts_edge.backends.torch.selection import csr_offsets, select_sets
from sts_edge.triton_kernels.draft_attention import draft_attention_with_scores
from sts_edge.triton_kernels.verify_attention import IndexLists, Launch, split_attention

TARGET = dict(heads=32, kv_heads=8, head_dim=128)  # Llama-3.1-8B attention
DRAFT = dict(heads=32, kv_heads=8, head_dim=64)  # Llama-3.2-1B attention


MIN_CALLS = 16


def time_graph(calls: list[Callable[[], object]], replays: int = 30) -> float:
    """Median microseconds per call, from CUDA-graph replays of all `calls` in a row.

    The list is repeated up to MIN_CALLS calls per graph: a replay's own launch costs several
    microseconds (as much as a short kernel; benchmarks/README.md), which in the
    runtime is spread over a whole decode step's graph, so it is spread here too."""
    calls = calls * -(-MIN_CALLS // len(calls))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up: compilation and autotuning stay out of the graph
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times)


def run_header() -> dict:
    """What every results file starts with: the date, and the device and versions that ran it."""
    return {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}}


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second (GB/s): the best of a few sizes."""
    best = 0.0
    for mib in (256, 1024, 2048):
        src = torch.randn(mib * 2**18, device="cuda")
        dst = torch.empty_like(src)
        for _ in range(20):  # let the clocks ramp up from idle
            dst.copy_(src)
        us = time_graph([lambda: dst.copy_(src)], replays=20)
        best = max(best, 2 * src.numel() * 4 / us / 1e3)
    return best


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """The best SDPA form we found for a GQA block: each KV group's query heads and queries packed
    as one [group * n] query block over its KV head (enable_gqa=True is far slower here)."""
    heads, n, head_dim = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    mask = None if n == 1 else causal_block_mask(start, n, q.device).repeat(group, 1)
    out = F.scaled_dot_product_attention(q.reshape(1, kv_heads, group * n, head_dim), k[None], v[None], attn_mask=mask)
    return out.reshape(heads, n, head_dim)


def copies_for(bytes_each: int) -> int:
    """How many input sets make one replay's working set at least 4x the L2 cache."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(16, -(-4 * l2 // bytes_each)))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    err = float((out - ref).norm() / ref.norm())
    if err != err:
        raise AssertionError("NaN in kernel output")
    return err


def random_lists(kv_heads: int, context: int, kept: int, device: str, run: int = 1) -> torch.Tensor:
    """Sorted random sets [kv_heads, kept] of positions < context: single rows (the worst case for
    gathers), or whole runs of `run` consecutive rows (Quest-like pages; real attention clusters)."""
    pages = torch.rand(kv_heads, context // run, device=device).topk(kept // run, dim=-1).indices.sort(dim=-1).values
    rows = (pages[..., None] * run + torch.arange(run, device=device)).flatten(1)
    return rows.to(torch.int32)


def fresh_lists(kv_heads: int, context: int, kept: int, calls: int, run: int = 1) -> list[torch.Tensor]:
    """One flat list set (kv_heads * kept rows, int32) per call in a graph, so repeated calls do
    not find their rows in L2."""
    return [random_lists(kv_heads, context, kept, "cuda", run).flatten() for _ in range(max(calls, MIN_CALLS))]


def bytes_read(kv_heads: int, head_dim: int, rows: int, n: int, indexed: bool) -> int:
    """What one attention call must read: the bf16 K and V of `rows` context rows and of the block's
    n rows, plus the int32 index lists when the rows are `indexed`."""
    return 2 * kv_heads * (rows + n) * head_dim * 2 + (kv_heads * rows * 4 if indexed else 0)


def bench_verify(contexts: list[int], queries: list[int], budgets: list[str], copy_gbs: float) -> list[dict]:
    heads, kv_heads, head_dim = TARGET.values()
    rows = []
    for context in contexts:
        for n in queries:
            cache_bytes = bytes_read(kv_heads, head_dim, context, n, indexed=False)
            copies = copies_for(cache_bytes)
            sets = []
            for _ in range(copies):
                k = torch.randn(kv_heads, context + 16, head_dim, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                q = torch.randn(heads, n, head_dim, device="cuda", dtype=torch.bfloat16)
                sets.append((q, k, v))
            q, k, v = sets[0]
            ref = attend(q.float(), k[:, : context + n].float(), v[:, : context + n].float(), context)
            dense_err = rel_error(split_attention(q, k, v, context), ref)
            dense_us = time_graph([lambda s=s: split_attention(s[0], s[1], s[2], context, check=False) for s in sets])
            sdpa_err = rel_error(sdpa(q, k[:, : context + n], v[:, : context + n], context), ref)
            sdpa_us = time_graph([lambda s=s: sdpa(s[0], s[1][:, : context + n], s[2][:, : context + n], context)
                                  for s in sets])
            dense_bw = cache_bytes / dense_us / 1e3
            rows.append({"kernel": "dense", "context": context, "queries": n, "kept": context, "time_us": dense_us,
                         "bandwidth_gbs": dense_bw, "copy_fraction": dense_bw / copy_gbs, "sdpa_us": sdpa_us,
                         "vs_sdpa": sdpa_us / dense_us, "rel_error": dense_err,
                         "sdpa_rel_error": sdpa_err})
            print(f"ctx {context:>6} n {n} dense: ours {dense_us:8.1f} us ({dense_bw / copy_gbs:5.1%} of copy)  "
                  f"SDPA {sdpa_us:8.1f} us", flush=True)
            runs = [(budget, 1) for budget in budgets] + [(budget, 16) for budget in budgets if budget.endswith("%")]
            for budget, run in runs:
                kept = int(context * float(budget[:-1]) / 100) if budget.endswith("%") else int(budget)
                kept -= kept % run
                lists = fresh_lists(kv_heads, context, kept, len(sets), run)
                offsets = csr_offsets(kv_heads, kept, torch.device("cuda"))
                ref = sparse_attend(q.float(), k.float(), v.float(), context, lists[0].view(kv_heads, kept).long())
                err = rel_error(split_attention(q, k, v, context, IndexLists(lists[0], offsets, kept)), ref)
                sparse_us = time_graph([lambda s=s, idx=idx: split_attention(s[0], s[1], s[2], context,
                                                                             IndexLists(idx, offsets, kept), check=False)
                                        for s, idx in zip(itertools.cycle(sets), lists)])
                gather_us = time_graph([lambda s=s, idx=idx: sparse_attend(s[0], s[1], s[2], context,
                                                                           idx.view(kv_heads, kept).long())
                                        for s, idx in zip(itertools.cycle(sets), lists)])
                read = bytes_read(kv_heads, head_dim, kept, n, indexed=True)
                bw = read / sparse_us / 1e3
                rows.append({"kernel": "sparse", "context": context, "queries": n, "budget": budget, "kept": kept,
                             "lists": "random rows" if run == 1 else f"random runs of {run} rows",
                             "time_us": sparse_us, "bytes_read": read, "bandwidth_gbs": bw, "copy_fraction": bw / copy_gbs,
                             "vs_dense": dense_us / sparse_us, "vs_sdpa": sdpa_us / sparse_us,
                             "vs_gather": gather_us / sparse_us, "gather_us": gather_us, "rel_error": err})
                print(f"    budget {budget:>5} ({kept:>6} rows, runs of {run:>2}): {sparse_us:7.1f} us ({bw / copy_gbs:5.1%} of copy)  "
                      f"x{dense_us / sparse_us:5.1f} vs dense  x{sdpa_us / sparse_us:5.1f} vs SDPA  "
                      f"x{gather_us / sparse_us:5.1f} vs gather  err {err:.1e}", flush=True)
            del sets
    return rows


def bench_draft(contexts: list[int], copy_gbs: float) -> list[dict]:
    heads, kv_heads, head_dim = DRAFT.values()
    rows = []
    for context in contexts:
        cache_bytes = bytes_read(kv_heads, head_dim, context, 1, indexed=False)
        sets = []
        for _ in range(copies_for(cache_bytes)):
            k = torch.randn(kv_heads, context + 16, head_dim, device="cuda", dtype=torch.bfloat16)
            sets.append((torch.randn(heads, 1, head_dim, device="cuda", dtype=torch.bfloat16), k, torch.randn_like(k),
                         torch.zeros(kv_heads, context + 16, device="cuda")))
        q, k, v, scores = sets[0]
        ref_scores = torch.zeros_like(scores)
        ref = attend_and_score(q.float(), k[:, : context + 1].float(), v[:, : context + 1].float(), context, ref_scores, "max", "kv")
        err = rel_error(draft_attention_with_scores(q, k, v, context, scores), ref)
        score_err = rel_error(scores, ref_scores)
        scored_us = time_graph([lambda s=s: draft_attention_with_scores(s[0], s[1], s[2], context, s[3], check=False)
                                for s in sets])
        plain_us = time_graph([lambda s=s: split_attention(s[0], s[1], s[2], context, check=False) for s in sets])
        sdpa_us = time_graph([lambda s=s: sdpa(s[0], s[1][:, : context + 1], s[2][:, : context + 1], context) for s in sets])
        rows.append({"context": context, "scored_us": scored_us, "plain_us": plain_us, "sdpa_us": sdpa_us,
                     "cost_vs_plain": scored_us / plain_us, "cost_vs_sdpa": scored_us / sdpa_us,
                     "plain_copy_fraction": cache_bytes / plain_us / 1e3 / copy_gbs,
                     "rel_error": err, "scores_rel_error": score_err})
        print(f"draft ctx {context:>6}: with scores {scored_us:7.1f} us, plain {plain_us:7.1f} us, SDPA {sdpa_us:7.1f} us "
              f"-> x{scored_us / plain_us:.2f} of plain, x{scored_us / sdpa_us:.2f} of SDPA; err {err:.1e}/{score_err:.1e}",
              flush=True)
        del sets
    return rows


@triton.jit
def _order_key(x):
    """float32 scores as int64 keys in [0, 2^32) in the same order (NaN lowest, as in the reference)."""
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(bits >= 0, bits + 2147483648, 2147483647 - (bits & 2147483647))
    return tl.where(x != x, 0, key)


@triton.jit
def _threshold_select_kernel(Scores, Out, stride_row, context, sink, window, budget, keep,
                             BLOCK: tl.constexpr, BITS: tl.constexpr):
    """One program per score row: the sink, the budget best of positions sink..context-window, the
    window, in position order."""
    row = tl.program_id(0).to(tl.int64)
    src = Scores + row * stride_row
    dst = Out + row * keep
    lo = sink
    hi = context - window
    bins = tl.arange(0, 1 << BITS)
    # Radix select, BITS bits a pass from the top: the key of the budget-th largest score, and how
    # many of the scores equal to it the set takes (the first ones by position).
    prefix = tl.zeros([], tl.int64)
    remaining = budget
    for p in tl.static_range((32 + BITS - 1) // BITS):
        shift = max(32 - BITS * (p + 1), 0)
        top = 32 - BITS * p  # the bits above `top` are already decided
        counts = tl.zeros([1 << BITS], tl.int32)
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < hi
            key = _order_key(tl.load(src + offs, mask=ok, other=0.0))
            match = ok & ((key >> top) == (prefix >> top))
            counts += tl.histogram(((key >> shift) & ((1 << (top - shift)) - 1)).to(tl.int32), 1 << BITS, mask=match)
        at_least = tl.cumsum(counts, 0, reverse=True)  # keys with this digit or a larger one
        digit = tl.sum((at_least >= remaining).to(tl.int32), 0) - 1
        remaining -= tl.sum(tl.where(bins == digit, at_least - counts, 0), 0)
        prefix += digit.to(tl.int64) << shift
    for start in range(0, sink, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(dst + offs, offs, mask=offs < sink)
    count = sink
    ties = 0
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < hi
        key = _order_key(tl.load(src + offs, mask=ok, other=0.0))
        equal = ok & (key == prefix)
        take = (ok & (key > prefix)) | (equal & (ties + tl.cumsum(equal.to(tl.int32), 0) <= remaining))
        tl.store(dst + count + tl.cumsum(take.to(tl.int32), 0) - 1, offs, mask=take)
        count += tl.sum(take.to(tl.int32), 0)
        ties += tl.sum(equal.to(tl.int32), 0)
    for start in range(0, window, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(dst + sink + budget + offs, hi + offs, mask=offs < window)


def threshold_sets(scores: torch.Tensor, context: int, budget: int, sink: int, window: int,
                   block: int = 2048, bits: int = 8, warps: int = 8) -> torch.Tensor:
    """select_sets' result from a sorting-free kernel: one program per score row finds the key of the
    budget-th largest score by radix select (tl.histogram passes of `bits` bits), then writes the
    positions at or above it in position order, so the set needs no sort."""
    rows = scores.reshape(-1, scores.shape[-1])
    keep = budget + sink + window
    sets = torch.empty(rows.shape[0], keep, dtype=torch.int32, device=scores.device)
    _threshold_select_kernel[(rows.shape[0],)](rows, sets, rows.stride(0), context, sink, window, budget, keep,
                                               BLOCK=block, BITS=bits, num_warps=warps)
    return sets.view(*scores.shape[:-1], keep)


# Launch settings of the threshold kernel timed: eight-bit digits (four passes) with small and
# large loads, and eleven-bit digits (three passes).
THRESHOLD_SETTINGS = [(8, 2048, 8), (8, 8192, 16), (11, 8192, 8)]


def bench_select(contexts: list[int], budgets: list[int], layers: int = 32, kv_heads: int = 8) -> list[dict]:
    rows = []
    for context in contexts:
        scores = torch.rand(layers, kv_heads, context, device="cuda")
        for budget in budgets:
            want = select_sets(scores, context, budget, 4, 64)
            us = time_graph([lambda: select_sets(scores, context, budget, 4, 64)])
            row = {"context": context, "budget": budget, "layers": layers, "kv_heads": kv_heads, "time_us": us,
                   "threshold_us": {}}
            for bits, block, warps in THRESHOLD_SETTINGS:
                assert torch.equal(threshold_sets(scores, context, budget, 4, 64, block, bits, warps), want)
                row["threshold_us"][f"bits {bits}, block {block}, warps {warps}"] = time_graph(
                    [lambda: threshold_sets(scores, context, budget, 4, 64, block, bits, warps)])
            best = min(row["threshold_us"], key=row["threshold_us"].get)
            rows.append(row)
            print(f"select ctx {context:>6} budget {budget:>5}: {us:7.1f} us for {layers} layers (torch.topk); "
                  f"threshold kernel {row['threshold_us'][best]:7.1f} us at best ({best})", flush=True)
    return rows


@triton.jit
def _read_rows_kernel(K, V, Idx, Sums, rows_per_program, stride_kh, stride_kr, rows_per_head,
                      BLOCK_N: tl.constexpr, D: tl.constexpr, GATHER: tl.constexpr):
    """Sum K and V rows (a list's rows with GATHER, else rows 0..rows_per_head): the reads of the
    sparse kernel without its attention, its second kernel or its partial results."""
    head = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    d = tl.arange(0, D)
    lo = part * rows_per_program
    hi = tl.minimum(lo + rows_per_program, rows_per_head)
    total = tl.zeros([BLOCK_N, D], tl.float32)
    for r in range(lo, hi, BLOCK_N):
        pos = r + tl.arange(0, BLOCK_N)
        ok = pos < hi
        if GATHER:
            rows = tl.load(Idx + head * rows_per_head + pos, mask=ok, other=0).to(tl.int64)
        else:
            rows = pos.to(tl.int64)
        k = tl.load(K + head * stride_kh + rows[:, None] * stride_kr + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + head * stride_kh + rows[:, None] * stride_kr + d[None, :], mask=ok[:, None], other=0.0)
        total += k.to(tl.float32) + v.to(tl.float32)
    tl.store(Sums + (head * tl.num_programs(1) + part) * D + d, tl.sum(total, 0))


def bench_ceiling(copy_gbs: float, context: int = 131072, fraction: float = 0.1) -> dict:
    """How fast can the sparse kernel's bytes be read at all? Times reads of exactly those rows with
    no attention math and no merge, so the sparse kernel's share of copy bandwidth has a yardstick."""
    heads, kv_heads, head_dim = TARGET.values()
    kept = int(context * fraction)
    k = torch.randn(kv_heads, context + 16, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lists = fresh_lists(kv_heads, context, kept, MIN_CALLS)
    rows_bytes = 2 * kv_heads * kept * head_dim * 2  # the K and V rows
    index_bytes = kv_heads * kept * 4
    slabs = context // kept - 1  # contiguous reads take a different slab per call, so none is in L2

    def read_rows(block_n: int, warps: int, programs_per_head: int, gather: bool) -> float:
        per_program = triton.cdiv(triton.cdiv(kept, programs_per_head), block_n) * block_n
        grid = (kv_heads, triton.cdiv(kept, per_program))
        sums = torch.empty(kv_heads * grid[1] * head_dim, device="cuda")

        def launch(keys, values, idx):
            _read_rows_kernel[grid](keys, values, idx, sums, per_program, keys.stride(0), keys.stride(1), kept,
                                    BLOCK_N=block_n, D=head_dim, GATHER=gather, num_warps=warps, num_stages=2)
        if gather:
            return time_graph([lambda idx=idx: launch(k, v, idx) for idx in lists])
        return time_graph([lambda j=j: launch(k[:, j * kept:], v[:, j * kept:], lists[0]) for j in range(slabs)])

    record: dict = {"context": context, "kept": kept, "rows": []}

    def add(kind: str, us: float, read: int, **config) -> None:
        record["rows"].append({"kind": kind, **config, "time_us": us, "bytes_read": read,
                               "copy_fraction": read / us / 1e3 / copy_gbs})

    for gather in (True, False):
        for block_n, warps, programs in ((64, 4, 33), (64, 8, 33), (128, 4, 33), (128, 8, 16), (128, 4, 16)):
            add("triton gather read" if gather else "triton contiguous read", read_rows(block_n, warps, programs, gather),
                rows_bytes + index_bytes if gather else rows_bytes, block_n=block_n, warps=warps,
                programs_per_kv_head=programs)
    flat = torch.randn(4, rows_bytes // 2, device="cuda", dtype=torch.bfloat16)
    add("torch.sum, contiguous", time_graph([lambda x=x: x.sum() for x in flat]), rows_bytes)
    del flat
    offsets = csr_offsets(kv_heads, kept, torch.device("cuda"))
    for n in (1, 5):
        q = torch.randn(heads, n, head_dim, device="cuda", dtype=torch.bfloat16)
        us = time_graph([lambda idx=idx: split_attention(q, k, v, context, IndexLists(idx, offsets, kept), check=False)
                         for idx in lists])
        add(f"sparse verification, {n} queries", us, bytes_read(kv_heads, head_dim, kept, n, indexed=True))
    best = {}
    for row in record["rows"]:
        if row["kind"] not in best or row["time_us"] < best[row["kind"]]["time_us"]:
            best[row["kind"]] = row
    for kind, row in best.items():
        print(f"ceiling {kind:>32}: {row['time_us']:6.1f} us ({row['copy_fraction']:5.1%} of copy)", flush=True)
    return record


def tune(copy_gbs: float) -> list[dict]:
    """Sweep the verification kernel's launch settings on the cases the bars are set on."""
    heads, kv_heads, head_dim = TARGET.values()
    rows = []
    for context, n, kept in ((131072, 5, 13107), (131072, 5, None), (131072, 5, 256), (32768, 5, 3276), (131072, 1, 13107)):
        k = torch.randn(kv_heads, context + 16, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(heads, n, head_dim, device="cuda", dtype=torch.bfloat16)
        lists = [None] if kept is None else fresh_lists(kv_heads, context, kept, MIN_CALLS)
        offsets = None if kept is None else csr_offsets(kv_heads, kept, torch.device("cuda"))
        read = bytes_read(kv_heads, head_dim, kept or context, n, indexed=kept is not None)
        results = []
        for block_n in (32, 64, 128):
            for splits in (8, 16, 32, 64):
                for warps in (4, 8):
                    for stages in (2, 3, 4, 5, 7):  # with lists: one gather buffer at 2-4, two at 5-6, three at 7
                        try:
                            launch = Launch(num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
                            us = time_graph([lambda idx=idx: split_attention(
                                q, k, v, context, None if idx is None else IndexLists(idx, offsets, kept),
                                launch=launch, check=False)
                                             for idx in lists], replays=20)
                        except Exception as err:  # noqa: BLE001 (out of shared memory for some tiles)
                            print(f"  block_n {block_n} warps {warps} stages {stages}: {type(err).__name__}", flush=True)
                            continue
                        results.append({"context": context, "queries": n, "kept": kept, "block_n": block_n,
                                        "splits": splits, "warps": warps, "stages": stages, "time_us": us,
                                        "copy_fraction": read / us / 1e3 / copy_gbs})
        results.sort(key=lambda r: r["time_us"])
        for r in results[:5]:
            print(f"tune ctx {context} n {n} kept {kept}: {r}", flush=True)
        rows += results
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="8192,32768,131072")
    parser.add_argument("--queries", default="1,5,8", help="gamma + 1 values")
    parser.add_argument("--budgets", default="256,512,2048,10%")
    parser.add_argument("--sections", default="verify,draft,ceiling,select,round")
    parser.add_argument("--round-contexts", default="32768,131072")
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (the kernels are tested on the CPU by pytest instead)", file=sys.stderr)
        return 1
    contexts = [int(c) for c in args.contexts.split(",")]
    sections = args.sections.split(",")
    copy_gbs = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    record: dict = {
        **run_header(),
        "copy_bandwidth_gbs": copy_gbs, "target_layer": TARGET, "draft_layer": DRAFT, "dtype": "bfloat16",
        "timing": "median of CUDA-graph replays of >= 16 calls, inputs rotated past the L2 cache, fresh index lists per call",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "tune" in sections:
        record["tune"] = tune(copy_gbs)
        out.write_text(json.dumps(record, indent=1))
    if "verify" in sections:
        record["verify"] = bench_verify(contexts, [int(n) for n in args.queries.split(",")], args.budgets.split(","), copy_gbs)
        out.write_text(json.dumps(record, indent=1))
    if "draft" in sections:
        record["draft"] = bench_draft(contexts, copy_gbs)
        out.write_text(json.dumps(record, indent=1))
    if "ceiling" in sections:
        record["ceiling"] = bench_ceiling(copy_gbs)
        out.write_text(json.dumps(record, indent=1))
    if "select" in sections:
        record["select"] = bench_select(contexts, [256, 512, 2048])
        out.write_text(json.dumps(record, indent=1))
    if "round" in sections:
        from bench_round import bench_round  # noqa: PLC0415 (needs the GPU and the full models)

        record["round"] = bench_round([int(c) for c in args.round_contexts.split(",")])
        out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
