"""Lab (not used by the runtime): weight-only int4 (mlx-lm affine, group 64) x bf16 on tensor cores, decoded in registers by inline PTX.

Layout (repacked once from mlx-lm's [outputs, inputs/8] uint32 words):
  P [groups, outputs, 16] int16: P[g, n, j] holds 4 nibbles, nibble i = q[n, g*64 + i*16 + j]
  S, B [groups, outputs] bf16 (scales, biases; transposed).
Per group and output tile the kernel runs 4 dots (K = 16 each): A_i = decode_i(P tile) [BLOCK_N, 16] bf16
with A_i = 128 + q (bf16 magic 0x4300 | q: one lop3 per two values, one shift for i > 0), against
x^T [16 inputs, 16 rows]. The per-group float32 result d = sum (128 + q) x is scaled in float32:
  y += s * d + (b - 128 s) * sum(x over the group)      (exact algebra: sum (s q + b) x)
Decoding is a pure unary inline-asm op, so Triton can hoist the dot-operand layout conversion above it
(the packed int16 tile goes global -> shared (pipelined) -> registers in the dot-operand layout, and the
decode runs there, feeding the MMA from registers).

Split-K: programs with the same output tile share the groups; each writes its float32 partial, and the
last to arrive (atomic counter per tile, reset by it) sums them and writes bf16: one launch.

    TRITON_INTERPRET=1 python benchmarks/lab/int4_inline_asm.py --check-cpu     # plain-Triton decode, CPU
    python benchmarks/lab/int4_inline_asm.py --dump                              # compile for sm_90 here, print IR stats
    DISABLE_MMA_V3=1 python benchmarks/lab/int4_inline_asm.py --bench --out results.json   # on the GPU

DISABLE_MMA_V3=1 makes Triton use mma.sync instead of Hopper's wgmma, after which it waited for every
product; it is a process-wide setting, so the runtime's version of this kernel
(triton_kernels/tensor_core_matmul.py) gets mma.sync from two-warp programs instead (measurements in
benchmarks/README.md, "Quantized matrix products").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_kernels import copies_for, time_graph  # noqa: E402  (the project's CUDA-graph timing)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GROUP = 64
BIAS_END_CPU = int(os.environ.get("BIAS_END_CPU", "0"))


# ---------------------------------------------------------------- format
def mlx_random(outputs: int, inputs: int, device="cpu"):
    """A random mlx-lm affine 4-bit weight: words [outputs, inputs/8] int32, scales/biases [outputs, groups] bf16."""
    words = torch.randint(-2**31, 2**31 - 1, (outputs, inputs // 8), dtype=torch.int32, device=device)
    scales = (torch.rand(outputs, inputs // GROUP, device=device) * 0.02 + 0.001).to(torch.bfloat16)
    biases = (-8 * scales.float() + torch.randn(outputs, inputs // GROUP, device=device) * 0.004).to(torch.bfloat16)
    return words, scales, biases


def mlx_values(words: torch.Tensor) -> torch.Tensor:
    """[outputs, inputs] int32 values 0..15 (value j of a word from the least significant bits)."""
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    return ((words[:, :, None] >> shifts) & 15).reshape(words.shape[0], -1)


def mlx_dequantize(words, scales, biases) -> torch.Tensor:
    q = mlx_values(words).float()
    o, i = q.shape
    return (q.view(o, i // GROUP, GROUP) * scales.float()[:, :, None] + biases.float()[:, :, None]).view(o, i)


def repack(words, scales, biases):
    """mlx-lm layout -> P [groups, outputs, 16] int16, S/B [groups, outputs] bf16. Done in chunks of outputs."""
    outputs, inputs = words.shape[0], words.shape[1] * 8
    groups = inputs // GROUP
    P = torch.empty(groups, outputs, 16, dtype=torch.int16, device=words.device)
    for o0 in range(0, outputs, 4096):
        q = mlx_values(words[o0:o0 + 4096]).view(-1, groups, 4, 16)  # [n, g, i, j]
        packed = q[:, :, 0] | q[:, :, 1] << 4 | q[:, :, 2] << 8 | q[:, :, 3] << 12  # [n, g, j], 0..65535
        packed = torch.where(packed >= 32768, packed - 65536, packed).to(torch.int16)
        P[:, o0:o0 + 4096] = packed.permute(1, 0, 2)
    sb = (scales.t().contiguous().view(torch.int16).to(torch.int32) & 0xFFFF) | (biases.t().contiguous().view(torch.int16).to(torch.int32) << 16)
    return P.contiguous(), sb.contiguous()


# ---------------------------------------------------------------- kernel
@triton.jit
def _decode(p, i: tl.constexpr, ASM: tl.constexpr, DEC: tl.constexpr = 0):
    """int16 tile of 4 nibbles -> bf16 128 + nibble i. DEC=1: the right shifts as mul.hi (IMAD, FMA pipe)."""
    if ASM and DEC == 1:
        if i == 0:
            v = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xEA;", "=r,r", [p],
                                          dtype=tl.bfloat16, is_pure=True, pack=2)
        elif i == 1:
            v = tl.inline_asm_elementwise(
                "{ .reg .b32 t; mul.hi.u32 t, $1, 0x10000000; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }",
                "=r,r", [p], dtype=tl.bfloat16, is_pure=True, pack=2)
        elif i == 2:
            v = tl.inline_asm_elementwise(
                "{ .reg .b32 t; mul.hi.u32 t, $1, 0x01000000; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }",
                "=r,r", [p], dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            v = tl.inline_asm_elementwise(
                "{ .reg .b32 t; mul.hi.u32 t, $1, 0x00100000; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }",
                "=r,r", [p], dtype=tl.bfloat16, is_pure=True, pack=2)
    elif ASM:
        if i == 0:
            v = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xEA;", "=r,r", [p],
                                          dtype=tl.bfloat16, is_pure=True, pack=2)
        elif i == 1:
            v = tl.inline_asm_elementwise(
                "{ .reg .b32 t; shr.b32 t, $1, 4; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }",
                "=r,r", [p], dtype=tl.bfloat16, is_pure=True, pack=2)
        elif i == 2:
            v = tl.inline_asm_elementwise(
                "{ .reg .b32 t; shr.b32 t, $1, 8; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }",
                "=r,r", [p], dtype=tl.bfloat16, is_pure=True, pack=2)
        elif i == 3:
            v = tl.inline_asm_elementwise(
                "{ .reg .b32 t; shr.b32 t, $1, 12; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }",
                "=r,r", [p], dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        v = (((p.to(tl.int32) >> (4 * i)) & 15) + 128).to(tl.float32).to(tl.bfloat16)
    return v


@triton.jit(do_not_specialize=["rows", "iters_per_split", "splits"])
def _int4_kernel(X, P, SB, Out, WS, Cnt, rows, outputs, iters_per_split, splits, stride_xm,
                 BLOCK_N: tl.constexpr, G: tl.constexpr, SPLIT: tl.constexpr, ASM: tl.constexpr,
                 UPCAST: tl.constexpr, ABL: tl.constexpr = 0, PREFETCH: tl.constexpr = 1,
                 FIX_UNROLL: tl.constexpr = 4, DEC: tl.constexpr = 0, BIAS_END: tl.constexpr = 0,
                 SBLOAD: tl.constexpr = 0):
    """G groups per loop step. SB[g, n] int32 = bf16 scale in the low half, bf16 bias in the high half."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, 16)
    j = tl.arange(0, 16)
    m_ok = m < rows
    if UPCAST:
        ones = tl.full((BLOCK_N, 16), 1.0, tl.float32)
    else:
        ones = tl.full((BLOCK_N, 16), 1.0, tl.bfloat16)
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    it0 = pid_s * iters_per_split
    g_last = (it0 + iters_per_split) * G - 1
    if SBLOAD:
        # row indices in the accumulator's own row layout (a slice of the MMA layout), so that the scales and
        # biases are loaded straight into the threads that own those rows: no layout conversion in the loop
        probe = tl.dot(tl.zeros((BLOCK_N, 16), tl.bfloat16), tl.zeros((16, 16), tl.bfloat16))
        n_acc = tl.max(probe.to(tl.int32) + n[:, None], axis=1)
        sb_next = tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [SB + it0 * G * outputs + n_acc],
                                            dtype=tl.int32, is_pure=False, pack=1)
    elif PREFETCH:  # scales/biases one group ahead, by hand (the pipeliner only takes loads that feed dots)
        sb_next = tl.load(SB + it0 * G * outputs + n)
    for it in range(it0, it0 + iters_per_split):
        for gg in tl.static_range(G):
            g = it * G + gg
            p = tl.load(P + (g * outputs + n[:, None]).to(tl.int64) * 16 + j[None, :])
            if SBLOAD:
                sb = sb_next
                sb_next = tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l",
                                                    [SB + tl.minimum(g + 1, g_last) * outputs + n_acc],
                                                    dtype=tl.int32, is_pure=False, pack=1)
            elif PREFETCH:
                sb = sb_next
                sb_next = tl.load(SB + tl.minimum(g + 1, g_last) * outputs + n)
            else:
                sb = tl.load(SB + g * outputs + n)
            for i in tl.static_range(4):
                xi = tl.load(X + m[None, :] * stride_xm + (g * 64 + i * 16 + j)[:, None], mask=m_ok[None, :],
                             other=0.0)
                if ABL == 1:  # ablation: no decode (wrong values, same data flow)
                    a = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [p], dtype=tl.bfloat16, is_pure=True, pack=2)
                else:
                    a = _decode(p, i, ASM, DEC)
                if UPCAST:
                    xi = xi.to(tl.float32)
                    a = a.to(tl.float32)
                if ABL == 2:  # ablation: no per-group scaling (wrong values)
                    acc = tl.dot(a, xi, acc)
                elif i == 0:
                    d = tl.dot(a, xi)
                    if not BIAS_END:
                        e = tl.dot(ones, xi)
                else:
                    d = tl.dot(a, xi, d)
                    if not BIAS_END:
                        e = tl.dot(ones, xi, e)
            if ABL != 2:
                s = (sb << 16).to(tl.float32, bitcast=True)
                acc = acc + d * s[:, None]
                if not BIAS_END:
                    b = (sb & -65536).to(tl.float32, bitcast=True)
                    acc = acc + e * (b - 128.0 * s)[:, None]
    if BIAS_END and ABL != 2:
        # sum_g (b - 128 s)[n, g] * sum(x over group g)[m] as a [BLOCK_N, groups] x [groups, 16] product on the
        # tensor cores, both factors split into bf16 hi + lo parts (float32-accurate)
        kk = tl.arange(0, 16)
        g_end = g_last + 1
        for gc in tl.range(it0 * G, g_end, 16, num_stages=1):
            gi = gc + tl.arange(0, 16)
            gok = gi < g_end
            sbt = tl.load(SB + gi[None, :] * outputs + n[:, None], mask=gok[None, :], other=0)
            s2 = (sbt << 16).to(tl.float32, bitcast=True)
            c = (sbt & -65536).to(tl.float32, bitcast=True) - 128.0 * s2
            c_hi = c.to(tl.bfloat16)
            c_lo = (c - c_hi.to(tl.float32)).to(tl.bfloat16)
            sx = tl.zeros((16, 16), tl.float32)
            for kc in tl.static_range(4):
                xt = tl.load(X + m[None, None, :] * stride_xm + (gi[:, None, None] * 64 + kc * 16 + kk[None, :, None]),
                             mask=gok[:, None, None] & m_ok[None, None, :], other=0.0)
                sx += tl.sum(xt.to(tl.float32), axis=1)
            sx_hi = sx.to(tl.bfloat16)
            sx_lo = (sx - sx_hi.to(tl.float32)).to(tl.bfloat16)
            if UPCAST:
                acc = tl.dot(c_hi.to(tl.float32), sx_hi.to(tl.float32), acc)
                acc = tl.dot(c_hi.to(tl.float32), sx_lo.to(tl.float32), acc)
                acc = tl.dot(c_lo.to(tl.float32), sx_hi.to(tl.float32), acc)
            else:
                acc = tl.dot(c_hi, sx_hi, acc)
                acc = tl.dot(c_hi, sx_lo, acc)
                acc = tl.dot(c_lo, sx_hi, acc)
    out_ptr = Out + m[None, :] * outputs + n[:, None]
    if not SPLIT:
        tl.store(out_ptr, acc.to(Out.dtype.element_ty), mask=m_ok[None, :])
    else:
        tile = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * 16 + m[None, :]
        tl.store(WS + pid_s * (outputs * 16) + tile, acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(Cnt + pid_n, 1, sem="acq_rel")
        if arrived == splits - 1:
            total = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
            for s0 in range(0, splits, FIX_UNROLL):  # splits is a multiple of FIX_UNROLL or smaller
                for s1 in tl.static_range(FIX_UNROLL):
                    total += tl.load(WS + (s0 + s1) * (outputs * 16) + tile, cache_modifier=".cg",
                                     mask=(tile * 0 + s0 + s1) < splits, other=0.0)
            tl.store(out_ptr, total.to(Out.dtype.element_ty), mask=m_ok[None, :])
            tl.atomic_xchg(Cnt + pid_n, 0)


class Int4Weight:
    def __init__(self, words, scales, biases):
        self.outputs, self.inputs = words.shape[0], words.shape[1] * 8
        self.P, self.SB = repack(words, scales, biases)
        self.groups = self.inputs // GROUP
        self._ws = {}

    def workspace(self, splits, block_n):
        key = (splits, block_n)
        if key not in self._ws:
            dev = self.P.device
            self._ws[key] = (torch.empty(splits, self.outputs * 16, dtype=torch.float32, device=dev),
                             torch.zeros(triton.cdiv(self.outputs, block_n), dtype=torch.int32, device=dev))
        return self._ws[key]


def int4_matmul(x, w: Int4Weight, block_n=128, splits=1, num_warps=4, num_stages=3, G=1, asm=True, abl=0,
                prefetch=1, maxnreg=None, dec=0, bias_end=0, sbload=0):
    rows = x.shape[0]
    assert rows <= 16 and x.stride(1) == 1 and w.outputs % block_n == 0
    ips = w.groups // G // splits
    assert ips * G * splits == w.groups, (w.groups, G, splits)
    out = torch.empty(rows, w.outputs, dtype=torch.bfloat16, device=x.device)
    ws, cnt = w.workspace(splits, block_n) if splits > 1 else (out, out)
    _int4_kernel[(w.outputs // block_n, splits)](
        x, w.P, w.SB, out, ws, cnt, rows, w.outputs, ips, splits, x.stride(0),
        BLOCK_N=block_n, G=G, SPLIT=splits > 1, ASM=asm and not INTERPRET, UPCAST=INTERPRET, ABL=abl,
        PREFETCH=prefetch, FIX_UNROLL=min(2, splits), DEC=dec, BIAS_END=bias_end, SBLOAD=sbload and not INTERPRET, **({"maxnreg": maxnreg} if maxnreg else {}),
        num_warps=num_warps, num_stages=num_stages)
    return out


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    e = float((out - ref).norm() / ref.norm())
    if e != e:
        raise AssertionError("NaN")
    return e


# ---------------------------------------------------------------- modes
def check_cpu():
    torch.manual_seed(0)
    for outputs, inputs, rows, splits, G in ((128, 256, 1, 1, 1), (256, 512, 5, 2, 2), (256, 256, 16, 4, 1), (128, 128, 9, 1, 2)):
        words, sc, bi = mlx_random(outputs, inputs)
        w = Int4Weight(words, sc, bi)
        x = torch.randn(rows, inputs).to(torch.bfloat16)
        ref = x.float() @ mlx_dequantize(words, sc, bi).t()
        got = int4_matmul(x, w, block_n=128, splits=splits, G=G, asm=False, bias_end=BIAS_END_CPU)
        e = rel_err(got, ref)
        print(f"cpu {outputs}x{inputs} rows {rows} splits {splits}: rel err {e:.2e}", flush=True)
        assert e < 1e-2
        if splits > 1:  # twice: the counters must have reset
            e = rel_err(int4_matmul(x, w, block_n=128, splits=splits, G=G, asm=False, bias_end=BIAS_END_CPU), ref)
            assert e < 1e-2


def dump(kernel=None, sig=None, constexprs=None, num_warps=4, num_stages=3, tag="k"):
    """Compile for sm_90 on this machine (no GPU needed); write IR/PTX/cubin under /tmp/int4dump; print stats."""
    import re
    import subprocess
    from triton.backends.compiler import GPUTarget
    if kernel is None:
        kernel = _int4_kernel
        sig = {"X": "*bf16", "P": "*i16", "SB": "*i32", "Out": "*bf16", "WS": "*fp32", "Cnt": "*i32",
               "rows": "i32", "outputs": "i32", "iters_per_split": "i32", "splits": "i32", "stride_xm": "i32",
               "BLOCK_N": "constexpr", "G": "constexpr", "SPLIT": "constexpr", "ASM": "constexpr", "UPCAST": "constexpr",
               "ABL": "constexpr", "PREFETCH": "constexpr", "FIX_UNROLL": "constexpr", "DEC": "constexpr",
               "BIAS_END": "constexpr", "SBLOAD": "constexpr"}
        constexprs = {"BLOCK_N": 128, "G": 1, "SPLIT": 0, "ASM": True, "UPCAST": False, "ABL": 0, "PREFETCH": 1, "FIX_UNROLL": 4, "DEC": 0,
                      "BIAS_END": 0, "SBLOAD": 0, **(constexprs or {})}
    # what the JIT specializes at run time: pointers and multiples of 16 get divisibility 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig.items())
             if v != "constexpr" and k not in ("rows", "iters_per_split", "splits")}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    os.makedirs("/tmp/int4dump", exist_ok=True)
    for k, v in c.asm.items():
        with open(f"/tmp/int4dump/{tag}.{k}", "wb" if isinstance(v, bytes) else "w") as f:
            f.write(v)
    t = c.asm["ttgir"]
    tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    sass = subprocess.run([f"{tools}/cuobjdump", "--dump-sass", f"/tmp/int4dump/{tag}.cubin"], capture_output=True, text=True).stdout
    with open(f"/tmp/int4dump/{tag}.sass", "w") as f:
        f.write(sass)
    res = subprocess.run([f"{tools}/cuobjdump", "--dump-resource-usage", f"/tmp/int4dump/{tag}.cubin"], capture_output=True, text=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass, re.M)
    from collections import Counter
    cnt = Counter(o.split(".")[0] for o in ops)
    print(tag, constexprs, f"warps {num_warps} stages {num_stages}", "shared", c.metadata.shared,
          "async_copy", t.count("async_copy_global_to_local"), "wgmma", t.count("warp_group_dot "),
          "waits", re.findall(r"pendings = (\d+)", t), res.strip().splitlines()[-1] if res.strip() else "")
    # the main loop: the longest backward branch
    lines = re.findall(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", sass)
    loops = []
    for addr, ins in lines:
        mb = re.search(r"BRA (?:`?\(?)(0x[0-9a-f]+)", ins)
        if mb and int(mb.group(1), 16) < int(addr, 16):
            loops.append((int(mb.group(1), 16), int(addr, 16)))
    for lo, hi in loops:
        body = [ins for addr, ins in lines if lo <= int(addr, 16) <= hi and "@!PT" not in ins and not ins.startswith("NOP")]
        if len(body) < 60:
            continue
        lc = Counter(re.sub(r"^@!?U?P\w+\s+", "", i).split()[0].split(".")[0] for i in body)
        print(f"  loop @{lo:#x}: {len(body)} instructions", dict(lc.most_common(22)))
    return c


KEYS = ("block_n", "num_warps", "G", "splits", "num_stages", "asm", "prefetch", "bias_end", "dec", "sbload")
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096), "lm_head": (4096, 128256)}


def candidate_settings(inputs, outputs, quick=False):
    """The sweep of run 5: (outputs per program, warps) x split counts near 1-7 programs per multiprocessor."""
    groups = inputs // GROUP
    out = []
    combos = ((64, 2), (64, 4), (128, 2), (128, 4), (128, 8), (256, 4), (256, 8))
    if outputs > 8192:
        combos = tuple(c for c in combos if c[0] >= 128)
    for bn, nw in combos:
        if outputs % bn:
            continue
        tiles = outputs // bn
        ok = [s for s in (1, 2, 3, 4, 6, 7, 8, 14, 16) if groups % s == 0 and (s == 1 or 66 <= tiles * s <= 1100)]
        if tiles >= 264:
            ok = [1]
        pick = sorted(set(min(ok, key=lambda s: abs(tiles * s - t)) for t in (132, 264, 528, 924)))
        for splits in pick:
            out.append(dict(block_n=bn, num_warps=nw, G=1, splits=splits, num_stages=3, asm=True, prefetch=1,
                            bias_end=0, dec=0))
    return out


def bench(args):
    import numpy as np  # noqa: F401
    rows_list = [int(r) for r in args.rows.split(",")]
    shapes = args.shapes.split(",")
    rec = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
           "env": {k: os.environ.get(k) for k in ("DISABLE_MMA_V3",)},
           "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
           "kernel": "benchmarks/lab/int4_inline_asm.py", "results": []}
    t_start = time.time()
    for name in shapes:
        inputs, outputs = SHAPES[name]
        bf16_bytes = inputs * outputs * 2
        nb = copies_for(bf16_bytes)
        n4 = copies_for(bf16_bytes // 4)
        bf = [torch.randn(outputs, inputs, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(nb)]
        mlx = [mlx_random(outputs, inputs, "cuda") for _ in range(n4)]
        ws = [Int4Weight(*t) for t in mlx]
        tp = []
        for _ in range(n4):
            values = torch.randint(0, 16, (outputs, inputs), dtype=torch.int32, device="cuda")
            as_bytes = (values[:, ::2] << 4 | values[:, 1::2]).to(torch.uint8)
            tp.append((torch.ops.aten._convert_weight_to_int4pack(as_bytes, 8),
                       torch.rand(inputs // 64, outputs, 2, device="cuda", dtype=torch.bfloat16) * 0.02))
            del values, as_bytes
        ref_w = mlx_dequantize(*mlx[0])
        settings = (json.load(open(args.settings))[name] if args.settings else candidate_settings(inputs, outputs))
        for rows in rows_list:
            x = torch.randn(rows, inputs, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ ref_w.t()
            row = {"shape": name, "inputs": inputs, "outputs": outputs, "rows": rows}
            row["bf16_us"] = time_graph([lambda w=w: x @ w.t() for w in bf])
            row["torch_int4pack_us"] = time_graph([lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p[0], 64, p[1]) for p in tp])
            best = None
            sweep = []
            for st in settings:
                try:
                    got = int4_matmul(x, ws[0], **st)
                    err = rel_err(got, ref)
                    got2 = int4_matmul(x, ws[0], **st)
                    err2 = rel_err(got2, ref)
                    us = time_graph([lambda w=w: int4_matmul(x, w, **st) for w in ws], replays=15)
                except Exception as exc:  # noqa: BLE001
                    sweep.append({**st, "fail": repr(exc)[:200]})
                    continue
                sweep.append({**st, "us": us, "err": max(err, err2)})
                if st["asm"] and max(err, err2) < 1e-2 and (best is None or us < best["us"]):
                    best = {**st, "us": us, "err": max(err, err2)}
            row["sweep"] = sweep
            row["best"] = best
            if best:
                # re-time best with more replays
                st = {k: best[k] for k in KEYS}
                best["us"] = time_graph([lambda w=w: int4_matmul(x, w, **st) for w in ws])
                row["int4_vs_bf16"] = row["bf16_us"] / best["us"]
                row["int4_vs_int4pack"] = row["torch_int4pack_us"] / best["us"]
                gb = (inputs * outputs * 0.5 + inputs // 64 * outputs * 4) / best["us"] / 1e3
                row["int4_TBps"] = gb / 1e3
                if args.ablate:
                    for abl in (1, 2):
                        row[f"ablate{abl}_us"] = time_graph([lambda w=w: int4_matmul(x, w, abl=abl, **st) for w in ws])
            print(f"{name:>8} x{rows:<2} bf16 {row['bf16_us']:7.1f}us  tinygemm {row['torch_int4pack_us']:7.1f}us  "
                  f"ours {best['us'] if best else float('nan'):7.1f}us  {row.get('int4_vs_bf16', 0):.2f}x bf16  "
                  f"{row.get('int4_vs_int4pack', 0):.2f}x tg  err {best['err'] if best else float('nan'):.1e}  "
                  f"{ {k: best[k] for k in KEYS} if best else ''}  "
                  f"{'abl(no decode) %.1f abl(no scale) %.1f' % (row['ablate1_us'], row['ablate2_us']) if 'ablate1_us' in row else ''} "
                  f"[{time.time() - t_start:.0f}s]", flush=True)
            rec["results"].append(row)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(rec, f, indent=1)
        del bf, mlx, ws, tp, ref_w
        torch.cuda.empty_cache()
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-cpu", action="store_true")
    ap.add_argument("--dump", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--dump-specs", default="BLOCK_N=128,G=1")
    ap.add_argument("--ablate", action="store_true")
    ap.add_argument("--settings", help="JSON {shape: [settings]} instead of the built-in sweep")
    ap.add_argument("--profile-one", help="shape,rows,block_n,splits,stages: run one config a few times (for ncu)")
    ap.add_argument("--rows", default="1,5,9,16")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.check_cpu:
        check_cpu()
    if args.dump:
        for spec in args.dump_specs.split(";"):
            kv = dict(item.split("=") for item in spec.split(","))
            nw, ns = int(kv.pop("warps", 4)), int(kv.pop("stages", 3))
            dump(constexprs={k: int(v) for k, v in kv.items()}, num_warps=nw, num_stages=ns)
    if args.bench:
        bench(args)
    if args.profile_one:
        name, rows, bn, sp, st = args.profile_one.split(",")
        inputs, outputs = SHAPES[name]
        w = Int4Weight(*mlx_random(outputs, inputs, "cuda"))
        x = torch.randn(int(rows), inputs, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            int4_matmul(x, w, block_n=int(bn), splits=int(sp), num_stages=int(st))
        torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main())
