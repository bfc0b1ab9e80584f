"""Lab (issue 18's int8 bar): 8-bit weights with float16 activations decoded a byte at a time.

A float16 holds 1024 + q exactly for every byte q (its ulp is 1 up to 2048), so one `prmt` per two
values turns bytes into tensor-core operands: the runtime's 8-bit path (two nibble planes, two
products, which bfloat16 needs) against this, on Llama-3.1-8B's shapes, group 64, float16, in one
run with `x @ w.t()` in float16 (CUDA-graph replays cycling over weight copies, as bench_quantized).

    PYTHONPATH=... python benchmarks/lab/int8_fp16_bytes.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_kernels import copies_for, rel_error, run_header, time_graph  # noqa: E402

from sts_edge.triton_kernels.tensor_core_matmul import (Launch, TensorCoreWeight, _halves_as_floats,  # noqa: E402
                                                        _workspaces, _write_out, reserve_workspace, split_count,
                                                        tensor_core_matmul)

# (outputs per program, warps, pipeline stages): the first run's three tile widths at 2-4 warps and 3
# stages, then deeper pipelines and more warps.
ROWS = (1, 5, 9, 16)
LAUNCHES = [(32, 2, 3), (64, 2, 3), (128, 4, 3), (64, 2, 5), (64, 4, 4), (128, 4, 5), (128, 8, 4), (256, 8, 3)]
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096), "lm_head": (4096, 128256)}
# Four bytes -> four float16 1024 + q: result bytes (b0, 0x64, b1, 0x64) and (b2, 0x64, b3, 0x64).
BYTE_DECODE = tl.constexpr("prmt.b32 $0, $2, 0x64646464, 0x4140; prmt.b32 $1, $2, 0x64646464, 0x4342;")


@triton.jit(do_not_specialize=["rows", "blocks_per_split", "splits"])
def _bytes_kernel(X, Bytes, ScaleBias, Out, Partials, Arrivals, rows, outputs, blocks_per_split, splits, stride_xm,
                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, 16)
    k = tl.arange(0, 64)
    n_ok, m_ok = n < outputs, m < rows
    ones = tl.full((BLOCK_N, 64), 1.0, tl.float16)
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    first = pid_s * blocks_per_split
    for b in range(first, first + blocks_per_split):
        w8 = tl.load(Bytes + (b * outputs + n[:, None]).to(tl.int64) * 64 + k[None, :], mask=n_ok[:, None], other=0)
        x = tl.load(X + m[None, :] * stride_xm + (b * 64 + k)[:, None], mask=m_ok[None, :], other=0.0)
        w = tl.inline_asm_elementwise(BYTE_DECODE, "=r,=r,r", [w8], dtype=tl.float16, is_pure=True, pack=4)
        offset_sum = tl.dot(w, x)
        x_sum = tl.dot(ones, x)
        scale_bias = tl.load(ScaleBias + (b * 64 // GROUP) * outputs + n, mask=n_ok, other=0)
        scale, bias = _halves_as_floats(scale_bias, True)
        acc += offset_sum * scale[:, None]
        acc += x_sum * (bias - 1024.0 * scale)[:, None]
    _write_out(acc, Out, Partials, Arrivals, n, m, n_ok, m_ok, outputs, splits, pid_n, pid_s, BLOCK_N, SPLIT)


def bytes_layout(words: torch.Tensor) -> torch.Tensor:
    """mlx-lm's 8-bit words [outputs, inputs / 4] -> bytes [inputs / 64, outputs, 64] (a word's bytes
    are its values in input order, least significant first, as little-endian memory holds them)."""
    outputs = words.shape[0]
    return words.contiguous().view(torch.uint8).view(outputs, -1, 64).permute(1, 0, 2).contiguous()


def bytes_matmul(x: torch.Tensor, bytes_: torch.Tensor, scale_bias: torch.Tensor, block_n: int, splits: int,
                 num_warps: int = 0, num_stages: int = 3) -> torch.Tensor:
    rows, inputs = x.shape
    outputs = bytes_.shape[1]
    partials, arrivals = _workspaces[x.device] if splits > 1 else (x, x)
    out = torch.empty(rows, outputs, dtype=x.dtype, device=x.device)
    _bytes_kernel[(triton.cdiv(outputs, block_n), splits)](
        x, bytes_, scale_bias, out, partials, arrivals, rows, outputs, inputs // 64 // splits, splits, x.stride(0),
        GROUP=64, BLOCK_N=block_n, SPLIT=splits > 1, num_warps=num_warps or (2 if block_n <= 64 else 4),
        num_stages=num_stages)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    found = []
    for name, (inputs, outputs) in SHAPES.items():
        copies = copies_for(inputs * outputs)
        words = [torch.randint(-2**31, 2**31 - 1, (outputs, inputs // 4), dtype=torch.int32, device="cuda") for _ in range(copies)]
        scales = [torch.rand(outputs, inputs // 64, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
        biases = [torch.randn(outputs, inputs // 64, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
        nibbles = [TensorCoreWeight.from_mlx(w, s, b, 8, 64, torch.float16) for w, s, b in zip(words, scales, biases)]
        for layout in nibbles:
            reserve_workspace(layout, layout.nibbles.device)
        bytes_ = [bytes_layout(w) for w in words]
        dense = [((w.view(torch.uint8).view(outputs, -1, 64).float() * s.float()[..., None]) + b.float()[..., None])
                 .view(outputs, inputs).half() for w, s, b in zip(words, scales, biases)]
        for rows in ROWS:
            xs = [torch.randn(rows, inputs, device="cuda", dtype=torch.float16) for _ in range(copies)]
            reference = xs[0].float() @ dense[0].float().t()
            row = {"shape": name, "inputs": inputs, "outputs": outputs, "rows": rows,
                   "fp16_matmul_us": time_graph([lambda x=x, w=w: x @ w.t() for x, w in zip(xs, dense)]),
                   "nibble_planes_us": time_graph([lambda x=x, w=w: tensor_core_matmul(x, w, check=False)
                                                   for x, w in zip(xs, nibbles)])}
            for block_n, warps, stages in LAUNCHES:
                splits = split_count(inputs, outputs, block_n)
                reserve_workspace(nibbles[0], xs[0].device, Launch(block_n, splits))
                got = bytes_matmul(xs[0], bytes_[0], nibbles[0].scale_bias, block_n, splits, warps, stages)
                key = f"bytes_n{block_n}_w{warps}_s{stages}"
                row[f"{key}_error"] = rel_error(got.float(), reference)
                row[f"{key}_us"] = time_graph([lambda x=x, b=b, w=w: bytes_matmul(x, b, w.scale_bias, block_n, splits, warps,
                                                                                  stages) for x, b, w in zip(xs, bytes_, nibbles)])
            row["nibble_error"] = rel_error(tensor_core_matmul(xs[0], nibbles[0]).float(), reference)
            best = min(v for k, v in row.items() if k.startswith("bytes_") and k.endswith("_us"))
            row["speedup_bytes_vs_fp16"] = row["fp16_matmul_us"] / best
            row["speedup_nibbles_vs_fp16"] = row["fp16_matmul_us"] / row["nibble_planes_us"]
            found.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    if args.out:
        args.out.write_text(json.dumps({**run_header(), "what": __doc__.splitlines()[0], "results": found}, indent=1))


if __name__ == "__main__":
    main()
