"""End-to-end latency on this machine: sts-edge (target alone, dense speculative, STS) and the
runtimes people use instead, on the same prompt tokens, greedy; JSON out.

    python scripts/bench_latency.py --out benchmarks/results/latency_cpu.json
    python scripts/bench_latency.py --systems sts-edge --contexts 512 --max-tokens 32   # a quick look

Every system runs in its own subprocess, so each peak resident memory (VmHWM, loading included)
is that system's alone. Systems (--systems):
  sts-edge:target, sts-edge:dense, sts-edge:sts   our runtime on --backend: the target alone (only
          the target loaded), dense speculative decoding, and STS (--budget, --gamma);
  llama.cpp        llama-cpp-python on the target's GGUF (the demo's as shipped, or --gguf);
  transformers     Hugging Face transformers on the bf16 target directory, alone, and
  transformers:assisted   with the draft (assisted generation), float32 activations;
  mlx-lm           mlx-lm on the quantized target directory (MLX's CPU backend on Linux).
A peer that is not installed is skipped with a message. The prompt is Python standard-library
source (code: what the demo pair is for), cut to each context length in the target's tokens; every
system gets the same token ids and generates exactly --max-tokens tokens. Prefill is tokens per
second to the first generated token; decode is the tokens after the first per second.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYSTEMS = ("sts-edge:target", "sts-edge:dense", "sts-edge:sts", "llama.cpp", "transformers", "transformers:assisted", "mlx-lm")


def prompt_ids(tokenizer_dir: Path, tokens: int) -> list[int]:
    """The first `tokens` tokens of a fixed run of standard-library source."""
    import argparse as m1, dataclasses as m2, json.decoder as m3, pathlib as m4, textwrap as m5, typing as m6

    from sts_edge.tokenizer import Tokenizer

    text = "\n\n".join(inspect.getsource(module) for module in (m1, m2, m3, m4, m5, m6))
    ids = Tokenizer(tokenizer_dir).encode(text)
    if len(ids) < tokens:
        raise SystemExit(f"the prompt text has {len(ids)} tokens, fewer than {tokens}")
    return ids[:tokens]


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def result(prompt: int, ttft: float, generated: int, decode_seconds: float, **extra) -> dict:
    return {"prompt_tokens": prompt, "ttft_s": ttft, "prefill_tok_s": prompt / ttft, "generated": generated,
            "decode_tok_s": (generated - 1) / decode_seconds, **extra}


def run_sts_edge(method: str, args, contexts: dict[int, list[int]]) -> list[dict]:
    from sts_edge import api
    from sts_edge.speculative import GenerationStats

    started = time.perf_counter()
    engine = api.load(args.model, None if method == "target" else args.draft, backend=args.backend,
                      max_seq_len=max(contexts) + args.max_tokens + 16, threads=args.threads)
    load_s = time.perf_counter() - started
    rows = []
    for context, ids in contexts.items():
        options = dict(use_draft=False, policy="dense") if method == "target" else \
            dict(policy=method, budget=args.budget if method == "sts" else None)
        if args.gamma is not None and method != "target":
            options["gamma"] = args.gamma
        engine.generate(ids[:64], max_tokens=4, **options)  # warm-up: first-call allocations stay out
        stats = GenerationStats()
        # Generation ends only at max_tokens (a code continuation rarely ends itself; if it does,
        # the rates below still divide by what was generated).
        engine.generate(ids, max_tokens=args.max_tokens, stats=stats, **options)
        rows.append(result(len(ids), stats.prompt_seconds, stats.generated_tokens, stats.decode_seconds,
                           acceptance=stats.acceptance_rate if method != "target" else None,
                           sparsity=stats.sparsity, precision=stats.precision, load_s=load_s,
                           answer_peak_rss_gb=stats.peak_memory_bytes / 1e9))
    return rows


def run_llama_cpp(args, contexts: dict[int, list[int]]) -> list[dict]:
    from llama_cpp import Llama

    from sts_edge.host import physical_cores

    gguf = args.gguf or demo_gguf(args.model)
    started = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=max(contexts) + args.max_tokens + 16, n_batch=512,
                n_threads=args.threads or physical_cores(), verbose=False)
    load_s = time.perf_counter() - started
    rows = []
    for context, ids in contexts.items():
        llm.reset()
        started = time.perf_counter()
        first = None
        count = 0
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            count += 1
            if first is None:
                first = time.perf_counter()
            if count == args.max_tokens:
                break
        end = time.perf_counter()
        rows.append(result(len(ids), first - started, count, end - first, load_s=load_s, gguf=gguf.name))
    return rows


def run_transformers(assisted: bool, args, contexts: dict[int, list[int]]) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from sts_edge.host import physical_cores
    from sts_edge.models import resolve_model

    torch.set_num_threads(args.threads or physical_cores())
    started = time.perf_counter()
    target = AutoModelForCausalLM.from_pretrained(resolve_model(args.model + "-bf16"), torch_dtype=torch.float32)
    draft = AutoModelForCausalLM.from_pretrained(resolve_model(args.draft + "-bf16"), torch_dtype=torch.float32) if assisted else None
    load_s = time.perf_counter() - started
    rows = []
    for context, ids in contexts.items():
        inputs = torch.tensor([ids])
        options = dict(do_sample=False, assistant_model=draft, pad_token_id=0)
        with torch.no_grad():
            started = time.perf_counter()
            target.generate(inputs, max_new_tokens=1, min_new_tokens=1, **options)
            ttft = time.perf_counter() - started
            started = time.perf_counter()
            out = target.generate(inputs, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, **options)
            total = time.perf_counter() - started
        generated = out.shape[1] - len(ids)
        # The second call prefills again: its decode time is its total less the first call's.
        rows.append(result(len(ids), ttft, generated, total - ttft, load_s=load_s, dtype="float32"))
    return rows


def run_mlx_lm(args, contexts: dict[int, list[int]]) -> list[dict]:
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    from sts_edge.models import resolve_model

    started = time.perf_counter()
    model, tokenizer = load(str(resolve_model(args.model)))
    load_s = time.perf_counter() - started
    rows = []
    for context, ids in contexts.items():
        last = None
        for last in stream_generate(model, tokenizer, mx.array(ids), max_tokens=args.max_tokens):
            pass
        ttft = last.prompt_tokens / last.prompt_tps
        rows.append(result(len(ids), ttft, last.generation_tokens, (last.generation_tokens - 1) / last.generation_tps,
                           load_s=load_s, device=str(mx.default_device())))
    return rows


def demo_gguf(alias: str) -> Path:
    """The demo target's GGUF as shipped, assembled from its installed parts into a temporary file."""
    from sts_edge.demo import DEMO_VARIANTS, assemble

    if alias not in DEMO_VARIANTS:
        raise SystemExit(f"llama.cpp needs a GGUF file for {alias}: pass --gguf")
    model = DEMO_VARIANTS[alias].model
    return assemble(model, Path(tempfile.mkdtemp()) / f"{model.name}.gguf")


def run_one(system: str, args) -> list[dict]:
    from sts_edge.models import resolve_model

    ids = prompt_ids(resolve_model(args.model), max(args.contexts))
    contexts = {n: ids[:n] for n in args.contexts}
    if system.startswith("sts-edge:"):
        return run_sts_edge(system.partition(":")[2], args, contexts)
    if system == "llama.cpp":
        return run_llama_cpp(args, contexts)
    if system.startswith("transformers"):
        return run_transformers(system.endswith(":assisted"), args, contexts)
    return run_mlx_lm(args, contexts)


MODULES = {"llama.cpp": "llama_cpp", "transformers": "transformers", "transformers:assisted": "transformers", "mlx-lm": "mlx_lm"}


def header() -> dict:
    import importlib.metadata as metadata

    versions = {}
    for package in ("torch", "llama_cpp_python", "transformers", "mlx", "mlx-lm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"date": datetime.date.today().isoformat(), "device": f"{cpu}, {os.cpu_count()} logical CPUs",
            "platform": platform.platform(), "versions": versions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen-coder-1.5b", help="target: alias or directory (default: the demo's)")
    parser.add_argument("--draft", default="qwen-coder-0.5b", help="draft: alias or directory")
    parser.add_argument("--gguf", type=Path, help="the target's GGUF for llama.cpp (default: the demo's, assembled)")
    parser.add_argument("--backend", default="torch-cpu", help="sts-edge's backend (default: torch-cpu)")
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[512, 4096],
                        help="prompt lengths in tokens, comma separated (default: 512,4096)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    parser.add_argument("--gamma", type=int, default=None, help="draft tokens per round (default: the engine's)")
    parser.add_argument("--budget", type=int, default=256, help="STS tokens per set (default: 256)")
    parser.add_argument("--threads", type=int, default=None, help="threads for every system (default: physical cores)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # one system, in this process: what each subprocess runs
    args = parser.parse_args(argv)

    if args.only:
        rows = run_one(args.only, args)
        print(json.dumps({"rows": rows, "peak_rss_gb": peak_rss_bytes() / 1e9}))
        return 0

    report = {**header(), "what": "scripts/bench_latency.py (see its docstring)", "model": args.model, "draft": args.draft,
              "gamma": args.gamma, "budget": args.budget, "max_tokens": args.max_tokens, "results": []}
    for system in args.systems.split(","):
        if system not in SYSTEMS:
            parser.error(f"unknown system {system!r}")
        module = MODULES.get(system)
        if module and subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode:
            print(f"{system}: skipped ({module} is not installed)", flush=True)
            continue
        command = [sys.executable, __file__, "--only", system, "--model", args.model, "--draft", args.draft,
                   "--backend", args.backend, "--contexts", ",".join(map(str, args.contexts)),
                   "--max-tokens", str(args.max_tokens), "--budget", str(args.budget)]
        for name in ("gguf", "gamma", "threads"):
            if getattr(args, name) is not None:
                command += [f"--{name}", str(getattr(args, name))]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode:
            print(f"{system}: failed\n{done.stderr[-3000:]}", flush=True)
            report["results"].append({"system": system, "error": done.stderr[-1000:]})
            continue
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        for row in measured["rows"]:
            row.update(system=system, peak_rss_gb=measured["peak_rss_gb"])
            report["results"].append(row)
            print(f"{system:22} {row['prompt_tokens']:6} prompt: prefill {row['prefill_tok_s']:7.1f} tok/s, decode "
                  f"{row['decode_tok_s']:6.2f} tok/s" + (f", acceptance {row['acceptance']:.2f}" if row.get("acceptance") else "")
                  + f", peak RSS {measured['peak_rss_gb']:.2f} GB", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
