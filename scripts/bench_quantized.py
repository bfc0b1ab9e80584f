"""Benchmark quantized weights on a GPU: the weight-only matrix product, and rounds with 4-bit weights; JSON out.

    python scripts/bench_quantized.py --out benchmarks/results/quantized_h200.json

Sections (--sections):
  matmul  y = x @ W^T for Llama-3.1-8B's shapes (inputs x outputs: 4096x6144 q/k/v, 4096x4096 o,
          4096x28672 gate/up, 14336x4096 down, 4096x128256 LM head) at 1, 5, 9 and 16 rows: the
          tensor-core int4 and int8 kernel (triton_kernels/tensor_core_matmul.py, what the runtime
          runs for 4- and 8-bit layers with groups of 64 or 128), with --general the general
          Triton int4 and int8 kernel (triton_kernels/quantized_matmul.py; the default launch, and
          with --sweep the best of a small sweep), bf16 `x @ w.t()`, and PyTorch's int4 kernel
          (`_weight_int4pack_mm`, what gpt-fast and torchao use), all in this run, group 64, ours
          checked against a float reference first;
  rounds  one decode step of the 8B-shaped target alone, and one speculative round (gamma 4, budget
          512) dense and STS (also with sparse drafting), at 32K and 128K, with bf16 weights and with
          4-bit weights (random, group 64, embeddings and LM head too), as bench_round.py times them
          (runtime and device);
  memory  peak GPU memory of the 4-bit 8B-shaped target with the 4-bit 1B-shaped draft and 32K caches
          through a round, against the same with bf16 weights.

Times are medians of CUDA-graph replays of at least 16 calls, cycling over enough weight copies
to exceed the L2 cache (bench_kernels.time_graph).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from sts_edge.backends.torch.quantized import QuantizedEmbedding, QuantizedLinear
from sts_edge.mask import LayerHeadMap, MaskPolicy, VerificationPlan
from sts_edge.sampling import GREEDY
from sts_edge.triton_kernels.quantized_matmul import QuantizedWeight, dequantize, quantized_matmul
from sts_edge.triton_kernels.tensor_core_matmul import TensorCoreWeight, reserve_workspace, tensor_core_matmul

from bench_kernels import copies_for, run_header, time_graph
from bench_round import LLAMA_1B, LLAMA_8B, graph_ms, graphed_round, one_round, random_model, timed

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096), "lm_head": (4096, 128256)}
SWEEP = [dict(block_n=b, splits=s, num_stages=st) for b in (128, 256, 512) for s in (None, 1) for st in (3, 4)]


def random_weight(inputs: int, outputs: int, bits: int, group: int = 64) -> QuantizedWeight:
    per_word = 32 // bits
    packed = torch.randint(-2**31, 2**31 - 1, (inputs // per_word, outputs), dtype=torch.int32, device="cuda")
    scales = torch.rand(inputs // group, outputs, device="cuda", dtype=torch.bfloat16) * 0.02
    biases = torch.randn(inputs // group, outputs, device="cuda", dtype=torch.bfloat16) * 0.02
    return QuantizedWeight(packed, scales, biases, bits, group)


def tensor_core_layout(weight: QuantizedWeight) -> TensorCoreWeight:
    """The same random weight in the tensor-core kernel's layout."""
    layout = TensorCoreWeight.from_mlx(weight.packed.t(), weight.scales.t(), weight.biases.t(), weight.bits,
                                       weight.group_size, torch.bfloat16)
    reserve_workspace(layout, layout.nibbles.device)
    return layout


def int4pack(inputs: int, outputs: int, group: int = 64):
    """PyTorch's own int4 layout (_convert_weight_to_int4pack) for a random weight, or None."""
    try:
        values = torch.randint(0, 16, (outputs, inputs), dtype=torch.int32, device="cuda")
        as_bytes = (values[:, ::2] << 4 | values[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(as_bytes, 8)
        scales_zeros = torch.rand(inputs // group, outputs, 2, device="cuda", dtype=torch.bfloat16) * 0.02
        return packed, scales_zeros
    except (RuntimeError, AttributeError) as err:
        print(f"_weight_int4pack_mm unavailable: {err}", flush=True)
        return None


def bench_matmul(rows_list: list[int], sweep: bool, general: bool) -> list[dict]:
    out = []
    for name, (inputs, outputs) in SHAPES.items():
        bf16_bytes = inputs * outputs * 2
        copies = copies_for(bf16_bytes // 4)  # the int4 weights exceed L2 cycled over this many copies
        weights = {"bf16": [torch.randn(outputs, inputs, device="cuda", dtype=torch.bfloat16) * 0.02
                            for _ in range(copies_for(bf16_bytes))],
                   "int4": [random_weight(inputs, outputs, 4) for _ in range(copies)],
                   "int8": [random_weight(inputs, outputs, 8) for _ in range(copies_for(bf16_bytes // 2))]}
        packed4 = [int4pack(inputs, outputs) for _ in range(copies)]
        tensor_core = {bits: [tensor_core_layout(w) for w in weights[bits]] for bits in ("int4", "int8")}
        for rows in rows_list:
            x = torch.randn(rows, inputs, device="cuda", dtype=torch.bfloat16)
            sweep_here = sweep and rows <= 16  # 512 rows: a prefill chunk, the default launch only
            row = {"shape": name, "inputs": inputs, "outputs": outputs, "rows": rows}
            row["bf16_us"] = time_graph([lambda w=w: x @ w.t() for w in weights["bf16"]])
            if packed4[0] is not None:
                row["torch_int4pack_us"] = time_graph([lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p[0], 64, p[1])
                                                       for p in packed4])
            for bits in ("int4", "int8"):
                reference = x.float() @ dequantize(weights[bits][0]).float().t()
                got = tensor_core_matmul(x, tensor_core[bits][0]).float()
                row[f"{bits}_tensor_core_error"] = float((got - reference).norm() / reference.norm())
                row[f"{bits}_tensor_core_us"] = time_graph([lambda w=w: tensor_core_matmul(x, w, check=False)
                                                            for w in tensor_core[bits]])
                row[f"{bits}_tensor_core_vs_bf16"] = row["bf16_us"] / row[f"{bits}_tensor_core_us"]
            for bits in ("int4", "int8") if general else ():
                w0 = weights[bits][0]
                reference = x.float() @ dequantize(w0).float().t()
                got = quantized_matmul(x, w0).float()
                row[f"{bits}_error"] = float((got - reference).norm() / reference.norm())
                row[f"{bits}_us"] = time_graph([lambda w=w: quantized_matmul(x, w, check=False) for w in weights[bits]])
                if sweep_here:
                    best = None
                    for setting in SWEEP:
                        try:
                            us = time_graph([lambda w=w: quantized_matmul(x, w, check=False, **setting) for w in weights[bits]],
                                            replays=10)
                        except Exception as err:  # noqa: BLE001 (out of shared memory for some tiles)
                            continue
                        if best is None or us < best[0]:
                            best = (us, setting)
                    row[f"{bits}_best_us"], row[f"{bits}_best_setting"] = best
                row[f"{bits}_vs_bf16"] = row["bf16_us"] / min(row[f"{bits}_us"], row.get(f"{bits}_best_us", 1e9))
            print(f"{name:>8} x{rows:<3}: bf16 {row['bf16_us']:7.1f} us, " + ", ".join(
                f"{bits} tensor cores {row[f'{bits}_tensor_core_us']:7.1f} ({row[f'{bits}_tensor_core_vs_bf16']:.2f}x, "
                f"error {row[f'{bits}_tensor_core_error']:.1e})" + (f", general {row[f'{bits}_us']:7.1f}" if general else "")
                for bits in ("int4", "int8")) + f", torch int4 {row.get('torch_int4pack_us', float('nan')):6.1f} us",
                flush=True)
            out.append(row)
        del weights, packed4, tensor_core
        torch.cuda.empty_cache()
    return out


def quantize_random(model: torch.nn.Module, bits: int = 4, group: int = 64) -> None:
    """Swap every linear layer and the embedding of a random bf16 model for random packed ones, on the GPU."""
    from sts_edge.backends.torch.quantized import swap_in_quantized

    paths = {name: (group, bits) for name, module in model.named_modules()
             if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))}
    swap_in_quantized(model, paths)
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            module.weight = torch.randint(-2**31, 2**31 - 1, module.weight.shape, dtype=torch.int32, device="cuda")
            module.scales = torch.rand(module.scales.shape, device="cuda", dtype=torch.bfloat16) * 0.02
            module.biases = torch.randn(module.biases.shape, device="cuda", dtype=torch.bfloat16) * 0.02
            if getattr(module, "bias", None) is not None:
                module.bias = torch.nn.Parameter(torch.zeros(module.bias.shape, device="cuda", dtype=torch.bfloat16))


def models(capacity: int, bits: int | None):
    target = random_model(LLAMA_8B, capacity, quantize=quantize_random if bits else None)
    draft = random_model(LLAMA_1B, capacity, quantize=quantize_random if bits else None)
    return target, draft


def bench_rounds(contexts: list[int], rounds: int = 5) -> list[dict]:
    out = []
    capacity = max(contexts) + 64
    for weights in ("bf16", "int4"):
        target, draft = models(capacity, 4 if weights == "int4" else None)
        mapping = LayerHeadMap.proportional(target.config, draft.config, "kv")
        plan = VerificationPlan(MaskPolicy("sts", budget=512, sink=4, window=64), mapping)
        sparse_drafting = VerificationPlan(MaskPolicy("sts", budget=512, sink=4, window=64, drafting="sparse"), mapping)
        with torch.inference_mode():
            for context in contexts:
                target.rollback(0)
                target._length = context
                target.draft([5], 1, GREEDY, None)  # the target alone: one decode step (capture, then time)
                steps = []
                for _ in range(rounds):
                    target._length = context
                    steps.append(timed(lambda: target.draft([5], 1, GREEDY, None)))
                token = torch.tensor([5], device="cuda")
                step = {"context": context, "weights": weights, "method": "target alone", "step_ms": statistics.median(steps),
                        "device_step_ms": graph_ms(lambda: target.model(token, context, False))}
                out.append(step)
                print(f"{weights} ctx {context:>6} target alone: {step['step_ms']:.2f} ms per token "
                      f"(device {step['device_step_ms']:.2f})", flush=True)
                for method, sparse in (("dense speculative", None), ("sts", plan), ("sts, sparse drafting", sparse_drafting)):
                    one_round(target, draft, context, 4, sparse)
                    runs = [one_round(target, draft, context, 4, sparse) for _ in range(rounds)]
                    runtime = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                    device = graphed_round(target, draft, context, 4, sparse)
                    row = {"context": context, "weights": weights, "method": method,
                           "runtime": {**runtime, "round_ms": sum(runtime.values())},
                           "device": {**device, "round_ms": sum(device.values())}}
                    out.append(row)
                    print(f"{weights} ctx {context:>6} {method:>20}: runtime {row['runtime']['round_ms']:.2f} ms, "
                          f"device {row['device']['round_ms']:.2f} ms", flush=True)
        del target, draft
        torch.cuda.empty_cache()
    return out


def bench_memory(context: int = 32768) -> list[dict]:
    out = []
    for weights in ("bf16", "int4"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        target, draft = models(context + 64, 4 if weights == "int4" else None)
        plan = VerificationPlan(MaskPolicy("sts", budget=512, sink=4, window=64),
                                LayerHeadMap.proportional(target.config, draft.config, "kv"))
        with torch.inference_mode():
            one_round(target, draft, context, 4, plan)
        torch.cuda.synchronize()
        out.append({"weights": weights, "context": context, "peak_gb": torch.cuda.max_memory_allocated() / 1e9})
        print(f"{weights}: peak GPU memory {out[-1]['peak_gb']:.2f} GB (8B + 1B shapes, {context} caches, one STS round)",
              flush=True)
        del target, draft
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="matmul,rounds,memory")
    parser.add_argument("--rows", default="1,5,9,16,512")
    parser.add_argument("--general", action="store_true", help="also time the general Triton kernel")
    parser.add_argument("--sweep", action="store_true", help="with --general, also time a sweep of its launches")
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--out", help="JSON output (default: print only)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quantized.py needs a CUDA GPU", file=sys.stderr)
        return 1
    record = run_header()

    def save() -> None:  # after every section, so a failure later keeps what was measured
        if args.out:
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)

    sections = args.sections.split(",")
    if "matmul" in sections:
        record["matmul"] = bench_matmul([int(r) for r in args.rows.split(",")], args.sweep, args.general)
        save()
    if "memory" in sections:
        record["memory"] = bench_memory()
        save()
    if "rounds" in sections:
        record["rounds"] = bench_rounds([int(c) for c in args.contexts.split(",")])
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
