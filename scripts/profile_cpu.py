"""Where the CPU path's time goes: the quantized product alone, and the demo pair's forwards; JSON out.

    python scripts/profile_cpu.py --out benchmarks/results/profile_cpu.json

1. The product on the demo target's largest projections (1536 -> 8960 and 8960 -> 1536, 4-bit,
   groups of 64, random weights) at 1-8 rows and at a 256-row prefill chunk: our kernel
   (cpu_kernels/affine_matmul.cpp) with float32 and with int8 activations (the AVX2 loop, and where
   the CPU has them AMX tiles, at every row count), PyTorch's int4 kernel
   (`_weight_int4pack_mm_for_cpu`, bfloat16 path), and float32 `x @ w.t()` on the decoded weight.
   Medians of repeated calls, milliseconds.
2. Attention of a decode-sized block over a bfloat16 cache with the demo models' head shapes
   (target: 12 query heads over 2 KV heads of 128; draft: 14 over 2 of 64) at --context rows:
   our kernel (cpu_kernels/decode_attention.cpp; on AMX tiles where the CPU has them, and its AVX2
   loops) against PyTorch's operations as the backend ran them before it (one row at a time,
   `dense_attend` with the kernel off). Medians, milliseconds per layer.
3. The demo pair as loaded by default: a forward of 1-5 tokens after a --context prompt (a decode
   step is 1 token; a verification block gamma + 1), and torch.profiler's split of one 1-token and
   one 3-token forward of each model into its costliest operators.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sts_edge.bench.latency import header


def median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def products(rows_list: list[int]) -> list[dict]:
    from sts_edge.cpu_kernels.extension import amx_ready, kernel

    affine = kernel()
    gen = torch.Generator().manual_seed(0)
    found = []
    for inputs, outputs in ((1536, 8960), (8960, 1536)):
        words = torch.randint(-2**31, 2**31 - 1, (outputs, inputs // 8), dtype=torch.int32, generator=gen)
        scales = (torch.rand(outputs, inputs // 64, generator=gen) * 0.01).bfloat16()
        biases = (torch.randn(outputs, inputs // 64, generator=gen) * 0.01).bfloat16()
        values = ((words[:, :, None] >> torch.arange(0, 32, 4, dtype=torch.int32)) & 15).reshape(outputs, inputs)
        decoded = (values.reshape(outputs, -1, 64).float() * scales.float()[..., None] + biases.float()[..., None])
        decoded = decoded.reshape(outputs, inputs)
        int4pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.contiguous(), 8)
        scales_and_zeros = torch.stack((scales.float().t(), (biases.float() + 8 * scales.float()).t()), -1).bfloat16()
        for rows in rows_list:
            x = torch.randn(rows, inputs, generator=gen)
            repeats = 5 if rows > 8 else 50
            row = {"inputs": inputs, "outputs": outputs, "rows": rows,
                   "pytorch_int4_bf16_ms": median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                       x.bfloat16(), int4pack, 64, scales_and_zeros), repeats),
                   "float32_matmul_decoded_ms": median_ms(lambda: x @ decoded.t(), repeats)}
            if affine is not None:
                row["ours_float32_ms"] = median_ms(lambda: affine(x, words, scales, biases, 4, 64, False), repeats)
                if rows <= 8:  # the AVX2 loop
                    row["ours_int8_activations_ms"] = median_ms(lambda: affine(x, words, scales, biases, 4, 64, True), repeats)
                if amx_ready():  # AMX tiles (one row: AVX-512 VNNI), at every block size
                    row["ours_int8_amx_ms"] = median_ms(lambda: affine(x, words, scales, biases, 4, 64, True, True), repeats)
            found.append(row)
            print(json.dumps(row), flush=True)
    return found


def attention(context: int) -> list[dict]:
    from sts_edge.backends.torch import attention as plain
    from sts_edge.cpu_kernels.extension import attention_kernel

    kernel = attention_kernel()
    gen = torch.Generator().manual_seed(0)
    found = []
    for label, heads, kv_heads, head_dim in (("target", 12, 2, 128), ("draft", 14, 2, 64)):
        keys, values = (torch.randn(kv_heads, context + 16, head_dim, generator=gen).bfloat16() for _ in range(2))
        for rows in (1, 2, 3, 5):
            q = torch.randn(heads, rows, head_dim, generator=gen).bfloat16()
            row = {"model": label, "context": context, "rows": rows, "pytorch_row_by_row_ms": median_ms(
                lambda: plain.dense_attend(q, keys[:, : context + rows], values[:, : context + rows], context), 20)}
            if kernel is not None:
                row["ours_ms"] = median_ms(lambda: kernel(q, keys, values, context, None, None, True, False, True), 20)
                row["ours_avx2_ms"] = median_ms(lambda: kernel(q, keys, values, context, None, None, True, False, False), 20)
            found.append(row)
            print(json.dumps(row), flush=True)
    return found


def forwards(model, context: int, label: str) -> dict:
    ids = list(range(100, 100 + context))
    model.prefill(ids)

    def forward(n: int):
        model.verify(list(range(200, 200 + n)))
        model.rollback(context)

    result = {"model": label, "context": context, "forward_ms": {n: median_ms(lambda: forward(n), 8) for n in range(1, 6)}}
    for n in (1, 3):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            forward(n)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        result[f"profile_{n}_tokens"] = {"total_ms": total / 1000, "costliest": [
            {"op": e.key, "calls": e.count, "ms": e.self_cpu_time_total / 1000} for e in events[:8]]}
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen-coder-1.5b", help="target: alias or directory (default: the demo's)")
    parser.add_argument("--draft", default="qwen-coder-0.5b", help="draft: alias or directory")
    parser.add_argument("--context", type=int, default=512, help="prompt tokens before the timed forwards (default: 512)")
    parser.add_argument("--rows", default="1,2,3,4,5,8,256", help="rows of the product sweep (default: 1,2,3,4,5,8,256)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)

    from sts_edge import api
    from sts_edge.host import cpu_threads

    if cpu_threads() is not None:  # as the runtime sets them, for the products measured before it loads
        torch.set_num_threads(cpu_threads())
    report = {**header("torch-cpu"), "what": "scripts/profile_cpu.py (see its docstring)", "threads": torch.get_num_threads()}
    report["products"] = products([int(r) for r in args.rows.split(",")])
    report["attention"] = attention(args.context)
    engine = api.load(args.model, args.draft, backend="torch-cpu", max_seq_len=args.context + 64)
    report["threads"] = torch.get_num_threads()
    report["precision"] = engine.target.precision
    report["forwards"] = [forwards(engine.target, args.context, "target"), forwards(engine.draft, args.context, "draft")]
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
