"""bench_kernels.py's MLX mode: the Metal kernels (metal_kernels/) on Apple silicon; JSON out in the
same schema as the CUDA mode's `verify` and `draft` sections.

    python scripts/bench_kernels_mlx.py --out benchmarks/results/kernels_m3.json

Sections (--sections):
  verify  sparse verification attention (Llama-3.1-8B layer: 32 query / 8 KV heads, head_dim 128,
          bf16) at --contexts, gamma+1 of --queries, --budgets, against (a) our dense variant,
          (b) mx.fast.scaled_dot_product_attention (MLX's own kernel, the dense baseline), (c) the
          plain gather path (backends/mlx/attention.py);
  draft   the draft's decode attention with STS scores (Llama-3.2-1B layer: 32/8 heads,
          head_dim 64) against our kernel without scores and MLX's SDPA.

Every kernel is checked against a float32 reference before it is timed. Times are medians over
repeated evaluations of a batch of calls that cycle over enough input copies to leave the
system-level cache; bandwidth counts the bytes a call must read, and copy bandwidth is MLX's own
copy of a large array. No Metal figures have been measured by the project yet: this is how
anyone with a Mac produces a file to set beside the CUDA ones. `--emulate` runs the kernels through
the Linux executor instead (metal_kernels/emulator), on tiny shapes, to check the script itself:
its times mean nothing and the file says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from sts_edge.backends.mlx import attention as plain
from sts_edge.backends.mlx.attention import ScoreBuffer
from sts_edge.backend import ScoreSpec
from sts_edge.metal_kernels import attention as metal

TARGET = dict(heads=32, kv_heads=8, head_dim=128)  # Llama-3.1-8B attention
DRAFT = dict(heads=32, kv_heads=8, head_dim=64)  # Llama-3.2-1B attention
CACHE_BYTES = 64 << 20  # input copies per batch until they exceed this (Apple GPUs' system cache is smaller)
MAX_COPIES = 16


def time_calls(calls: list, repeats: int) -> float:
    """Median microseconds per call over `repeats` evaluations of all `calls` in one graph."""
    mx.eval([call() for call in calls])  # compile and warm up
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        mx.eval([call() for call in calls])
        times.append((time.perf_counter() - begin) / len(calls) * 1e6)
    return statistics.median(times)


def copy_bandwidth(repeats: int, mib: int) -> float:
    """Bytes read plus written per second (GB/s) by MLX copying a large array."""
    src = mx.random.normal((mib << 18,))
    return 2 * src.nbytes / time_calls([lambda: src + 0], repeats) / 1e3


def rel_error(out: mx.array, ref: np.ndarray) -> float:
    out = np.array(out.astype(mx.float32)).astype(np.float64)
    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    if err != err:
        raise AssertionError("NaN in kernel output")
    return err


def random_cache(kv_heads: int, rows: int, head_dim: int) -> mx.array:
    return mx.random.normal((1, kv_heads, rows, head_dim)).astype(mx.bfloat16)


def sorted_lists(units: int, context: int, kept: int) -> mx.array:
    return mx.sort(mx.argpartition(mx.random.uniform(shape=(units, context)), kth=kept - 1, axis=-1)[:, :kept], axis=-1).astype(mx.int32)


def float64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32)).astype(np.float64)


def bench_verify(contexts: list[int], queries: list[int], budgets: list[str], copy_gbs: float, repeats: int) -> list[dict]:
    heads, kv_heads, head_dim = TARGET.values()
    scale = head_dim**-0.5
    rows = []
    for context in contexts:
        for n in queries:
            cache_bytes = 2 * kv_heads * (context + n) * head_dim * 2
            copies = max(1, min(MAX_COPIES, -(-CACHE_BYTES // cache_bytes)))
            sets = [(mx.random.normal((1, heads, n, head_dim)).astype(mx.bfloat16), random_cache(kv_heads, context + 16, head_dim),
                     random_cache(kv_heads, context + 16, head_dim)) for _ in range(copies)]
            q, k, v = sets[0]
            ref = float64(plain.dense_attend(q.astype(mx.float32), k[:, :, : context + n].astype(mx.float32),
                                             v[:, :, : context + n].astype(mx.float32), context, scale))
            dense_err = rel_error(metal.dense_attention(q, k, v, context, scale), ref)
            dense_us = time_calls([lambda s=s: metal.dense_attention(s[0], s[1], s[2], context, scale) for s in sets], repeats)
            sdpa_us = time_calls([lambda s=s: plain.dense_attend(s[0], s[1][:, :, : context + n], s[2][:, :, : context + n],
                                                                 context, scale) for s in sets], repeats)
            dense_bw = cache_bytes / dense_us / 1e3
            rows.append({"kernel": "dense", "context": context, "queries": n, "kept": context, "time_us": dense_us,
                         "bandwidth_gbs": dense_bw, "copy_fraction": dense_bw / copy_gbs, "sdpa_us": sdpa_us,
                         "vs_sdpa": sdpa_us / dense_us, "rel_error": dense_err})
            print(f"ctx {context:>6} n {n} dense: ours {dense_us:8.1f} us ({dense_bw / copy_gbs:5.1%} of copy)  "
                  f"SDPA {sdpa_us:8.1f} us", flush=True)
            for budget in budgets:
                kept = int(context * float(budget[:-1]) / 100) if budget.endswith("%") else int(budget)
                kept = min(kept, context)
                lists = [sorted_lists(kv_heads, context, kept) for _ in sets]
                offsets = mx.arange(0, (kv_heads + 1) * kept, kept, dtype=mx.int32)
                ref = float64(plain.sparse_attend(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), context,
                                                  lists[0], scale))
                err = rel_error(metal.sparse_attention(q, k, v, context, lists[0].reshape(-1), offsets, scale, max_rows=kept), ref)
                sparse_us = time_calls([lambda s=s, idx=idx: metal.sparse_attention(s[0], s[1], s[2], context, idx.reshape(-1),
                                                                                     offsets, scale, max_rows=kept)
                                        for s, idx in zip(sets, lists)], repeats)
                gather_us = time_calls([lambda s=s, idx=idx: plain.sparse_attend(s[0], s[1], s[2], context, idx, scale)
                                        for s, idx in zip(sets, lists)], repeats)
                read = 2 * kv_heads * (kept + n) * head_dim * 2 + kv_heads * kept * 4
                bw = read / sparse_us / 1e3
                rows.append({"kernel": "sparse", "context": context, "queries": n, "budget": budget, "kept": kept,
                             "lists": "random rows", "time_us": sparse_us, "bytes_read": read, "bandwidth_gbs": bw,
                             "copy_fraction": bw / copy_gbs, "vs_dense": dense_us / sparse_us, "vs_sdpa": sdpa_us / sparse_us,
                             "vs_gather": gather_us / sparse_us, "gather_us": gather_us, "rel_error": err})
                print(f"    budget {budget:>5} ({kept:>6} rows): {sparse_us:7.1f} us ({bw / copy_gbs:5.1%} of copy)  "
                      f"x{dense_us / sparse_us:5.1f} vs dense  x{sdpa_us / sparse_us:5.1f} vs SDPA  "
                      f"x{gather_us / sparse_us:5.1f} vs gather  err {err:.1e}", flush=True)
    return rows


def bench_draft(contexts: list[int], copy_gbs: float, repeats: int) -> list[dict]:
    heads, kv_heads, head_dim = DRAFT.values()
    scale = head_dim**-0.5
    rows = []
    for context in contexts:
        cache_bytes = 2 * kv_heads * (context + 1) * head_dim * 2
        copies = max(1, min(MAX_COPIES, -(-CACHE_BYTES // cache_bytes)))
        sets = [(mx.random.normal((1, heads, 1, head_dim)).astype(mx.bfloat16), random_cache(kv_heads, context + 16, head_dim),
                 random_cache(kv_heads, context + 16, head_dim), mx.zeros((kv_heads, context + 1))) for _ in range(copies)]
        q, k, v, live = sets[0]
        buffer = ScoreBuffer(mx.zeros((1, kv_heads, context + 1)), ScoreSpec("kv", "max"))
        ref = float64(plain.attend_and_score(q.astype(mx.float32), k[:, :, : context + 1].astype(mx.float32),
                                             v[:, :, : context + 1].astype(mx.float32), context, scale, buffer, 0))
        out, scores = metal.dense_attention_with_scores(q, k, v, context, scale, live, "max")
        err, score_err = rel_error(out, ref), rel_error(scores, float64(buffer.buffer[0]))
        scored_us = time_calls([lambda s=s: metal.dense_attention_with_scores(s[0], s[1], s[2], context, scale, s[3], "max")
                                for s in sets], repeats)
        plain_us = time_calls([lambda s=s: metal.dense_attention(s[0], s[1], s[2], context, scale) for s in sets], repeats)
        sdpa_us = time_calls([lambda s=s: plain.dense_attend(s[0], s[1][:, :, : context + 1], s[2][:, :, : context + 1],
                                                             context, scale) for s in sets], repeats)
        rows.append({"context": context, "scored_us": scored_us, "plain_us": plain_us, "sdpa_us": sdpa_us,
                     "cost_vs_plain": scored_us / plain_us, "cost_vs_sdpa": scored_us / sdpa_us,
                     "plain_copy_fraction": cache_bytes / plain_us / 1e3 / copy_gbs,
                     "rel_error": err, "scores_rel_error": score_err})
        print(f"draft ctx {context:>6}: with scores {scored_us:7.1f} us, plain {plain_us:7.1f} us, SDPA {sdpa_us:7.1f} us; "
              f"err {err:.1e}/{score_err:.1e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="8192,32768,131072")
    parser.add_argument("--queries", default="1,5,8", help="gamma + 1 values")
    parser.add_argument("--budgets", default="256,512,2048,10%")
    parser.add_argument("--sections", default="verify,draft")
    parser.add_argument("--repeats", type=int, default=20, help="timed evaluations per case (the median is kept)")
    parser.add_argument("--emulate", action="store_true",
                        help="run the kernels through the Linux executor (checks the script; its times mean nothing)")
    parser.add_argument("--out", default="benchmarks/results/kernels_metal.json")
    args = parser.parse_args(argv)
    if args.emulate:
        from sts_edge.metal_kernels import emulator  # noqa: PLC0415 (test tooling, not needed on a Mac)

        global MAX_COPIES
        metal.KERNELS, MAX_COPIES = metal.Kernels.build(emulator.metal_kernel), 1
    elif not (mx.metal.is_available() and mx.default_device() == mx.gpu):
        print("bench_kernels_mlx.py needs MLX on Metal (Apple silicon); on Linux pytest runs the kernels through "
              "the executor in metal_kernels/emulator, and --emulate checks this script", file=sys.stderr)
        return 1
    contexts = [int(c) for c in args.contexts.split(",")]
    sections = args.sections.split(",")
    copy_gbs = copy_bandwidth(args.repeats, 4 if args.emulate else 1024)
    device = "Linux Metal executor (emulated: times mean nothing)" if args.emulate else mx.metal.device_info().get(
        "device_name", platform.processor())
    print(f"{device}: copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    record: dict = {
        "date": datetime.date.today().isoformat(), "device": device, "backend": "mlx",
        "versions": {"mlx": mx.__version__, "python": platform.python_version(), "macos": platform.mac_ver()[0]},
        "copy_bandwidth_gbs": copy_gbs, "target_layer": TARGET, "draft_layer": DRAFT, "dtype": "bfloat16",
        "timing": f"median of {args.repeats} evaluations of a batch of calls, inputs rotated past the system cache",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "verify" in sections:
        record["verify"] = bench_verify(contexts, [int(n) for n in args.queries.split(",")], args.budgets.split(","),
                                        copy_gbs, args.repeats)
        out.write_text(json.dumps(record, indent=1))
    if "draft" in sections:
        record["draft"] = bench_draft(contexts, copy_gbs, args.repeats)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
