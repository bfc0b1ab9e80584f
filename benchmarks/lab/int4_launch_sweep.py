"""Lab: time triton_kernels/tensor_core_matmul.py at a few launches per Llama-3.1-8B shape (H200; JSON out).

    python benchmarks/lab/int4_launch_sweep.py --bits 4 --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_kernels import copies_for, run_header, time_graph  # noqa: E402

from sts_edge.triton_kernels.tensor_core_matmul import Launch, TensorCoreWeight, launch_for, tensor_core_matmul  # noqa: E402
from sts_edge.triton_kernels import tensor_core_matmul as module  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096), "lm_head": (4096, 128256),
          # Llama-3.2-1B, the draft
          "1b_qkv": (2048, 3072), "1b_o": (2048, 2048), "1b_gate_up": (2048, 16384), "1b_down": (8192, 2048),
          "1b_lm_head": (2048, 128256)}
LAUNCHES = [(64, 2), (128, 2), (256, 2), (32, 2), (64, 4), (128, 4)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rows", default="1,9")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_args()
    record = run_header()
    record["rows"], record["bits"] = [], args.bits
    for name in args.shapes.split(","):
        inputs, outputs = SHAPES[name]
        copies = copies_for(inputs * outputs * args.bits // 8)
        weights = []
        for _ in range(copies):
            words = torch.randint(-2**31, 2**31 - 1, (outputs, inputs * args.bits // 32), dtype=torch.int32, device="cuda")
            scales = torch.rand(outputs, inputs // 64, device="cuda") * 0.02
            weights.append(TensorCoreWeight.from_mlx(words, scales, -8 * scales, args.bits, 64, torch.bfloat16))
        bf16 = [torch.randn(outputs, inputs, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(inputs * outputs * 2))]
        blocks = inputs // 64
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, inputs, device="cuda", dtype=torch.bfloat16)
            bf16_us = time_graph([lambda w=w: x @ w.t() for w in bf16])
            default = launch_for(inputs, outputs, args.bits)
            for block_n, warps in LAUNCHES:
                tiles = -(-outputs // block_n)
                for splits in sorted({s for s in (1, 2, 4, 7, 8, 14, 16, 32) if blocks % s == 0 and tiles * s <= 2200}):
                    launch = Launch(block_n, splits, warps)
                    partials = torch.empty(splits * outputs * 16, device="cuda")
                    arrivals = torch.zeros(tiles, dtype=torch.int32, device="cuda")
                    module._workspaces[x.device] = (partials, arrivals)
                    us = time_graph([lambda w=w: tensor_core_matmul(x, w, check=False, launch=launch) for w in weights], replays=10)
                    row = {"shape": name, "rows": rows, "block_n": block_n, "num_warps": warps, "splits": splits,
                           "us": us, "vs_bf16": bf16_us / us, "default": launch == default}
                    record["rows"].append(row)
                    print(json.dumps(row), flush=True)
        del weights, bf16
        torch.cuda.empty_cache()
        if args.out:
            Path(args.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
