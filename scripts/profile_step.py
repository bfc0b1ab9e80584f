"""Where a decode step's device time goes, on a GPU; JSON out.

    python scripts/profile_step.py --out benchmarks/results/profile_step_h200.json

For a Llama-3.2-1B-shaped draft step (1 token) and a Llama-3.1-8B-shaped verification block
(5 tokens) at one context (random weights and caches, as in bench_round.py), each captured as a
CUDA graph at a device-side position: the graph's replay time, and from torch.profiler the
number of kernels the step launches, their summed time and the costliest of them. Then four
draft steps three ways: as one graph, as four replays back to back, and through the backend's
`draft` (the runtime, which brings each step's argmax to the host to choose the next token).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from sts_edge.sampling import GREEDY

from bench_kernels import run_header
from bench_round import LLAMA_1B, LLAMA_8B, graph_ms, random_model, timed


def profile_step(raw: dict, n: int, context: int) -> dict:
    lm = random_model(raw, context + 64)
    tokens = torch.randint(0, 1000, (n,), device="cuda")
    start = torch.tensor([context], dtype=torch.int32, device="cuda")

    def step():
        lm.model(tokens, start, n > 1, bound=context + 32)

    graph_us = graph_ms(step, replays=20) * 1000
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    per_kernel = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name[:90]][0] += 1
            per_kernel[event.name[:90]][1] += event.device_time_total
    costliest = sorted(per_kernel.items(), key=lambda item: -item[1][1])[:12]
    return {"tokens": n, "context": context, "graph_us": graph_us,
            "kernels": sum(count for count, _ in per_kernel.values()),
            "kernel_time_us": sum(us for _, us in per_kernel.values()),
            "costliest": [{"kernel": name, "calls": count, "us": us} for name, (count, us) in costliest]}


def draft_steps(context: int, steps: int = 4, repeats: int = 10) -> dict:
    """Milliseconds for `steps` draft steps: one graph, bare replays, the runtime's forwards."""
    lm = random_model(LLAMA_1B, 131072 + 64)  # bench_round's capacity: the same graph bucket
    ids = torch.arange(5, 5 + steps, device="cuda")

    def runtime() -> float:
        lm.rollback(0)
        lm._length = context  # the caches hold `context` rows already
        return timed(lambda: lm.draft([5], steps, GREEDY, None))

    runtime()  # captures the graph
    runtime_ms = statistics.median(runtime() for _ in range(repeats))
    entry = next(iter(lm.graphs.captured.values()))

    def bare_replays() -> None:
        for i in range(steps):
            entry.start.fill_(context + i)
            entry.graph.replay()

    replays_ms = statistics.median(timed(bare_replays) for _ in range(repeats))
    one_graph_ms = graph_ms(lambda: [lm.model(ids[i : i + 1], context + i, False) for i in range(steps)])
    return {"context": context, "steps": steps, "one_graph_ms": one_graph_ms, "bare_replays_ms": replays_ms,
            "runtime_ms": runtime_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--out", help="JSON output (default: print only)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA GPU", file=sys.stderr)
        return 1
    record = run_header()
    with torch.inference_mode():
        for name, raw, n in (("draft_step", LLAMA_1B, 1), ("verification_block", LLAMA_8B, 5)):
            record[name] = row = profile_step(raw, n, args.context)
            print(f"{name}: graph {row['graph_us']:.0f} us, {row['kernels']} kernels, "
                  f"{row['kernel_time_us']:.0f} us of kernel time", flush=True)
            torch.cuda.empty_cache()
        record["draft_steps"] = row = draft_steps(args.context)
        print(f"{row['steps']} draft steps: one graph {row['one_graph_ms']:.2f} ms, bare replays "
              f"{row['bare_replays_ms']:.2f} ms, runtime {row['runtime_ms']:.2f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
