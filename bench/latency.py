"""End-to-end latency on this machine: sts-edge (target alone, dense speculative, STS) and the
runtimes people use instead, on the same prompt tokens, greedy; a summary table, JSON out, plots.

    python -m sts_edge.bench --out benchmarks/results/latency_cpu.json --plot benchmarks/results/
    python -m sts_edge.bench --systems sts-edge --contexts 512 --max-tokens 32          # a quick look
    python -m sts_edge.bench --synthetic --model llama-3.1-8b --draft llama-3.2-1b \
        --systems sts-edge,transformers --contexts 8192,32768,131072                     # no weights needed

Systems (--systems; "sts-edge" and "mlx-lm" name all of their modes):
  sts-edge:target, sts-edge:dense, sts-edge:sts   our runtime on --backend: the target alone (only
          the target loaded), dense speculative decoding, and STS (--budget, --gamma, --drafting,
          --candidates);
  llama.cpp        llama-cpp-python on the target's GGUF (the demo's as shipped, or --gguf); its
                   Python binding has no draft-model speculation, so the target alone;
  transformers     Hugging Face transformers (`generate`, static cache) on the target directory
                   (a demo alias's bf16 twin), and
  transformers:assisted   with the draft as `assistant_model`; float32 on a CPU, bf16 on a GPU;
  mlx-lm, mlx-lm:draft    mlx-lm's `stream_generate` on the target directory, alone and with the
                   draft as `draft_model` (--gamma draft tokens).
A peer that is not installed is reported as skipped. Every system runs in its own subprocess, so
each peak memory (resident set, loading included; device memory on a GPU) is that system's alone.
Every system gets the same token ids and generates exactly --max-tokens tokens, after a warm-up
(on a GPU at each context's own length, so CUDA-graph capture and compilation stay out of the
timed decode); each row says how
many leading tokens it shares with sts-edge's target alone (numerics differ between runtimes; a
short shared run is a bug to look at). Prefill is prompt tokens per second to the first generated
token (time to first token); decode is the tokens after the first per second; for speculative
modes the round splits into the draft's steps and verification (selection included).

--synthetic writes random-weight models of a named shape (llama-3.1-8b, llama-3.2-1b) or of a
config.json once into the cache: timing only. Their acceptance is meaningless, so the rows carry a
declared one (--acceptance) and a decode rate projected from the measured round time, labelled as
such. Contexts that do not fit in memory are skipped with the reason. The JSON's fields and units
are documented in bench/schema.json (schema "sts-edge-bench/1").
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

SYSTEMS = ("sts-edge:target", "sts-edge:dense", "sts-edge:sts", "llama.cpp", "transformers", "transformers:assisted",
           "mlx-lm", "mlx-lm:draft")
MODULES = {"llama.cpp": "llama_cpp", "transformers": "transformers", "transformers:assisted": "transformers",
           "mlx-lm": "mlx_lm", "mlx-lm:draft": "mlx_lm"}
SCHEMA = "sts-edge-bench/1"
DEFAULT_CONTEXTS = (1024, 8192, 32768, 131072)


def prompt_ids(tokenizer_dir: Path, tokens: int, vocab: int | None = None) -> list[int]:
    """The first `tokens` tokens of a fixed run of standard-library source (random ids in
    [1, vocab) for a synthetic model, whose tokenizer knows no text)."""
    if vocab is not None:
        import numpy as np

        return np.random.default_rng(0).integers(1, vocab - 1, tokens).tolist()
    import argparse as m1, dataclasses as m2, json.decoder as m3, pathlib as m4, textwrap as m5, typing as m6

    from sts_edge.tokenizer import Tokenizer

    text = "\n\n".join(inspect.getsource(module) for module in (m1, m2, m3, m4, m5, m6))
    ids = Tokenizer(tokenizer_dir).encode(text)
    while len(ids) < tokens:  # beyond its 80K tokens (with the demo tokenizer) the text repeats
        ids = ids + ids
    return ids[:tokens]


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource  # macOS: ru_maxrss in bytes

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def result(prompt: int, ttft: float, tokens: list[int], decode_seconds: float, **extra) -> dict:
    generated = len(tokens)
    return {"prompt_tokens": prompt, "ttft_s": ttft, "prefill_tok_s": prompt / ttft, "generated": generated,
            "decode_tok_s": (generated - 1) / decode_seconds if generated > 1 else None, "tokens": tokens, **extra}


def skipped(prompt: int, reason: str) -> dict:
    return {"prompt_tokens": prompt, "skipped": reason}


def kv_bytes(model_dir: Path, tokens: int, element_bytes: int) -> int:
    """What a model's KV cache of `tokens` rows takes."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * tokens * element_bytes


def weight_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))


def available_bytes(backend: str) -> int:
    """Memory a run can still take: the GPU's free memory, else the system's available memory."""
    if backend == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        return next(int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines() if line.startswith("MemAvailable:"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fitting(contexts: dict[int, list[int]], args, dirs: list[Path], backend: str) -> tuple[dict, list[dict]]:
    """The contexts whose caches fit beside the weights (with 10% to spare), and rows for the rest."""
    element = 4 if backend in ("torch-cpu", "mlx") and sys.platform != "darwin" else 2
    free = available_bytes(backend) * 0.9 - sum(weight_bytes(d) for d in dirs)
    fit, rows = {}, []
    for context, ids in contexts.items():
        need = sum(kv_bytes(d, context + args.max_tokens + 16, element) for d in dirs)
        if need > free:
            rows.append(skipped(context, f"does not fit: {need / 1e9:.1f} GB of KV cache, {max(free, 0) / 1e9:.1f} GB free"))
        else:
            fit[context] = ids
    return fit, rows


def run_sts_edge(method: str, args, contexts: dict[int, list[int]]) -> list[dict]:
    from sts_edge import api
    from sts_edge.backend import resolve_backend
    from sts_edge.models import resolve_model
    from sts_edge.speculative import GenerationStats

    backend = resolve_backend(args.backend)
    dirs = [resolve_model(args.model)] + ([] if method == "target" else [resolve_model(args.draft)])
    contexts, rows = fitting(contexts, args, dirs, backend)
    if not contexts:
        return rows
    started = time.perf_counter()
    engine = api.load(args.model, None if method == "target" else args.draft, backend=backend,
                      max_seq_len=max(contexts) + args.max_tokens + 16, threads=args.threads)
    load_s = time.perf_counter() - started
    options = dict(use_draft=False, policy="dense") if method == "target" else \
        dict(policy=method, budget=args.budget if method == "sts" else None, drafting=args.drafting,
             candidates=args.candidates)
    if args.gamma is not None and method != "target":
        options["gamma"] = args.gamma
    engine.generate(contexts[min(contexts)][:64], max_tokens=4, **options)  # warm-up: first-call allocations stay out
    for context, ids in contexts.items():
        if backend == "cuda":  # capture the CUDA graphs of this context's length before timing
            engine.generate(ids, max_tokens=4, **options)
        stats = GenerationStats()
        # Generation ends only at max_tokens (a code continuation rarely ends itself; if it does,
        # the rates below still divide by what was generated).
        generation = engine.generate(ids, max_tokens=args.max_tokens, stats=stats, **options)
        row = result(len(ids), stats.prompt_seconds, list(generation.tokens), stats.decode_seconds, load_s=load_s,
                     sparsity=stats.sparsity, precision=stats.precision, peak_memory_gb=stats.peak_memory_bytes / 1e9,
                     peak_memory_of=stats.peak_memory_of)
        if method != "target" and stats.rounds:
            row["round"] = {"gamma": stats.gamma, "rounds": stats.rounds, "draft_ms": stats.draft_seconds / stats.rounds * 1e3,
                            "verify_ms": stats.target_seconds / stats.rounds * 1e3}
            row.update(project(stats.acceptance_rate, stats.gamma, stats.decode_seconds / stats.rounds, args.acceptance))
        rows.append(row)
    return sorted(rows, key=lambda row: row["prompt_tokens"])


def project(measured: float, gamma: int, round_seconds: float, declared: float | None) -> dict:
    """Acceptance as measured, or for a synthetic model the declared one and the decode rate it would
    give: (1 - a^(gamma + 1)) / (1 - a) tokens per round at the measured round time."""
    if declared is None:
        return {"acceptance": measured, "acceptance_kind": "measured"}
    tokens = gamma + 1 if declared == 1 else (1 - declared ** (gamma + 1)) / (1 - declared)
    return {"acceptance": declared, "acceptance_kind": "declared", "projected_decode_tok_s": tokens / round_seconds}


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
        first, tokens = None, []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            tokens.append(int(token))
            if first is None:
                first = time.perf_counter()
            if len(tokens) == args.max_tokens:
                break
        end = time.perf_counter()
        rows.append(result(len(ids), first - started, tokens, end - first, load_s=load_s, gguf=gguf.name,
                           peak_memory_of="process RSS"))
    return rows


def run_transformers(assisted: bool, args, contexts: dict[int, list[int]]) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from sts_edge.host import physical_cores
    from sts_edge.demo import DEMO_VARIANTS
    from sts_edge.models import resolve_model

    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.set_num_threads(args.threads or physical_cores())

    def model_dir(name: str) -> Path:  # a demo alias's bf16 twin: transformers cannot read packed 4-bit weights
        return resolve_model(name + "-bf16" if name + "-bf16" in DEMO_VARIANTS else name)

    started = time.perf_counter()
    target = AutoModelForCausalLM.from_pretrained(model_dir(args.model), dtype=dtype).to("cuda" if gpu else "cpu")
    draft = AutoModelForCausalLM.from_pretrained(model_dir(args.draft), dtype=dtype).to(target.device) if assisted else None
    load_s = time.perf_counter() - started
    rows = []
    for context, ids in contexts.items():
        inputs = torch.tensor([ids], device=target.device)
        # Assisted generation keeps its dynamic cache (it rolls back rejected drafts); alone, the static one.
        options = dict(do_sample=False, pad_token_id=0) | (dict(assistant_model=draft) if assisted else
                                                            dict(cache_implementation="static"))
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        clock = TokenClock()
        try:
            with torch.no_grad():
                # On a GPU transformers compiles the static cache's forward for its size (the prompt plus
                # max_new_tokens): the warm-up is the very same call. On a CPU it compiles nothing.
                length = dict(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens)
                target.generate(inputs if gpu else inputs[:, :16], **length, **options)
                started = time.perf_counter()
                out = target.generate(inputs, **length, streamer=clock, **options)
        except torch.OutOfMemoryError as error:
            rows.append(skipped(len(ids), f"does not fit: {str(error).splitlines()[0]}"))
            continue
        rows.append(result(len(ids), clock.first - started, out[0, len(ids):].tolist(), clock.last - clock.first,
                           load_s=load_s, dtype=str(dtype),
                           **({"peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9, "peak_memory_of": "GPU"}
                              if gpu else {"peak_memory_of": "process RSS"})))
    return rows


class TokenClock:
    """A transformers streamer that only notes when tokens arrive: its first call brings the prompt,
    the second the first generated token (after prefill), the last the final one."""

    def __init__(self) -> None:
        self.calls, self.first, self.last = 0, 0.0, 0.0

    def put(self, value) -> None:
        self.calls += 1
        now = time.perf_counter()
        if self.calls == 2:
            self.first = now
        self.last = now

    def end(self) -> None:
        pass


def run_mlx_lm(with_draft: bool, args, contexts: dict[int, list[int]]) -> list[dict]:
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    from sts_edge.models import resolve_model

    started = time.perf_counter()
    model, tokenizer = load(str(resolve_model(args.model)))
    draft = load(str(resolve_model(args.draft)))[0] if with_draft else None
    load_s = time.perf_counter() - started
    options = dict(draft_model=draft, num_draft_tokens=args.gamma or 2) if with_draft else {}
    rows = []
    for context, ids in contexts.items():
        tokens, last = [], None
        for last in stream_generate(model, tokenizer, mx.array(ids), max_tokens=args.max_tokens, **options):
            tokens.append(int(last.token))
        ttft = last.prompt_tokens / last.prompt_tps
        rows.append(result(len(ids), ttft, tokens, (last.generation_tokens - 1) / last.generation_tps, load_s=load_s,
                           device=str(mx.default_device()), peak_memory_gb=last.peak_memory,
                           peak_memory_of="MLX peak memory"))
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

    target_dir = resolve_model(args.model)
    vocab = json.loads((target_dir / "config.json").read_text())["vocab_size"] if args.synthetic else None
    ids = prompt_ids(target_dir, max(args.contexts), vocab)
    contexts = {n: ids[:n] for n in args.contexts}
    if system.startswith("sts-edge:"):
        return run_sts_edge(system.partition(":")[2], args, contexts)
    if system == "llama.cpp":
        return run_llama_cpp(args, contexts)
    if system.startswith("transformers"):
        return run_transformers(system.endswith(":assisted"), args, contexts)
    return run_mlx_lm(system.endswith(":draft"), args, contexts)


def header(backend: str = "auto") -> dict:
    """What every results file starts with: schema, date, device, platform and versions."""
    import importlib.metadata as metadata

    from sts_edge.host import cpu_name

    versions = {"python": platform.python_version()}
    for package in ("sts-edge", "torch", "triton", "mlx", "mlx-lm", "llama_cpp_python", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    device = cpu_name()
    gpu = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"], capture_output=True,
                         text=True)
    if gpu.returncode == 0 and backend in ("auto", "cuda"):
        device = f"{gpu.stdout.strip()} ({device})"
    return {"schema": SCHEMA, "date": datetime.date.today().isoformat(), "device": device,
            "platform": platform.platform(), "versions": versions}


def chosen_systems(text: str, parser: argparse.ArgumentParser) -> list[str]:
    systems = []
    for name in text.split(","):
        matches = [system for system in SYSTEMS if system == name or system.startswith(name + ":")]
        if not matches:
            parser.error(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
        systems += [system for system in matches if system not in systems]
    return systems


def build_parser() -> argparse.ArgumentParser:
    from sts_edge.mask import MaskPolicy

    parser = argparse.ArgumentParser(prog="python -m sts_edge.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen-coder-1.5b", help="target: alias, directory, or with --synthetic a shape "
                        "name or config.json (default: the demo's)")
    parser.add_argument("--draft", default="qwen-coder-0.5b", help="draft: the same kinds (default: the demo's)")
    parser.add_argument("--synthetic", action="store_true", help="random weights of --model's and --draft's shapes: timing only")
    parser.add_argument("--acceptance", type=float, default=None,
                        help="with --synthetic: the acceptance to project decode rates from (default 0.7)")
    parser.add_argument("--gguf", type=Path, help="the target's GGUF for llama.cpp (default: the demo's, assembled)")
    parser.add_argument("--backend", default="auto", help="sts-edge's backend: auto, cuda, torch-cpu, mlx (default: auto)")
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=list(DEFAULT_CONTEXTS),
                        help="prompt lengths in tokens, comma separated (default: 1024,8192,32768,131072; those that do "
                        "not fit in memory are skipped)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    parser.add_argument("--gamma", type=int, default=None, help="draft tokens per round (default: the engine's; mlx-lm: 2)")
    parser.add_argument("--budget", type=int, default=256, help="STS tokens per set (default: 256)")
    parser.add_argument("--drafting", choices=("dense", "sparse"), default="dense",
                        help="STS's drafting: sparse reads the draft's own sets after each round's first step (default: dense)")
    parser.add_argument("--candidates", type=int, default=MaskPolicy.candidates,
                        help="STS's two-stage selection: the target keeps the budget's best of the draft's top N x budget; "
                        f"1: the draft's top budget (default: {MaskPolicy.candidates})")
    parser.add_argument("--threads", type=int, default=None, help="threads for every system (default: physical cores)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="render PNGs (tokens/s against context; round split) here")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # one system, in this process: what each subprocess runs
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.acceptance is not None and not 0 <= args.acceptance <= 1:
        parser.error(f"--acceptance must be between 0 and 1, got {args.acceptance}")
    if args.only:
        rows = run_one(args.only, args)
        print(json.dumps({"rows": rows, "peak_rss_gb": peak_rss_bytes() / 1e9}))
        return 0
    systems = chosen_systems(args.systems, parser)
    names = {"target": args.model, "draft": args.draft}
    if args.synthetic:
        from sts_edge.bench.synthetic import write_model
        from sts_edge.paths import cache_root

        args.acceptance = 0.7 if args.acceptance is None else args.acceptance
        for role, shape in names.items():
            label = Path(shape).parent.name if str(shape).endswith(".json") else str(shape)
            print(f"writing a random {label} model (once) ...", flush=True)
            setattr(args, "model" if role == "target" else "draft",
                    str(write_model(shape, cache_root() / "synthetic" / label)))
    elif args.acceptance is not None:
        parser.error("--acceptance is for --synthetic models; real ones measure theirs")

    from tqdm import tqdm

    report = {**header(args.backend), "what": "python -m sts_edge.bench (see its --help)",
              "models": {"target": {"name": names["target"], "synthetic": args.synthetic},
                         "draft": {"name": names["draft"], "synthetic": args.synthetic}},
              "settings": {"backend": args.backend, "contexts": args.contexts, "max_tokens": args.max_tokens,
                           "gamma": args.gamma, "budget": args.budget, "drafting": args.drafting,
                           "candidates": args.candidates, "threads": args.threads,
                           "declared_acceptance": args.acceptance},
              "results": []}
    for system in (bar := tqdm(systems, desc="systems", unit="system")):
        bar.set_postfix_str(system)
        module = MODULES.get(system)
        if module and subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode:
            report["results"].append({"system": system, "skipped": f"{module} is not installed"})
            continue
        if system == "llama.cpp" and args.synthetic:
            report["results"].append({"system": system, "skipped": "synthetic models have no GGUF"})
            continue
        if system in ("transformers:assisted", "mlx-lm:draft") and args.synthetic:
            report["results"].append({"system": system, "skipped": "random weights accept nothing, and this peer's "
                                      "round time cannot be read out for a projection"})
            continue
        command = [sys.executable, "-m", "sts_edge.bench", "--only", system, "--model", args.model, "--draft", args.draft,
                   "--backend", args.backend, "--contexts", ",".join(map(str, args.contexts)),
                   "--max-tokens", str(args.max_tokens), "--budget", str(args.budget), "--drafting", args.drafting,
                   "--candidates", str(args.candidates)]
        command += ["--synthetic"] if args.synthetic else []
        for name in ("gguf", "gamma", "threads", "acceptance"):
            if getattr(args, name) is not None:
                command += [f"--{name}", str(getattr(args, name))]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode:
            tqdm.write(f"{system}: failed\n{done.stderr[-3000:]}")
            report["results"].append({"system": system, "error": done.stderr[-1000:]})
            continue
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        for row in measured["rows"]:
            row.update(system=system, process_peak_rss_gb=measured["peak_rss_gb"])
            report["results"].append(row)
    compare_tokens(report["results"])
    print(summary(report["results"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.plot:
        from sts_edge.bench.plot import plot

        for path in plot(report, args.plot):
            print(f"wrote {path}")
    return 0


def compare_tokens(rows: list[dict]) -> None:
    """Each measured row gets the count of leading tokens it shares with sts-edge's target alone."""
    from sts_edge.speculative import common_prefix

    reference = {row["prompt_tokens"]: row["tokens"] for row in rows if row["system"] == "sts-edge:target" and "tokens" in row}
    for row in rows:
        if "tokens" in row and row["prompt_tokens"] in reference:
            row["shared_prefix_tokens"] = common_prefix(row["tokens"], reference[row["prompt_tokens"]])


def summary(rows: list[dict]) -> str:
    """The table printed at the end: one line per system and context, decode also as a ratio to our target alone."""
    alone = {row["prompt_tokens"]: row["decode_tok_s"] for row in rows if row["system"] == "sts-edge:target" and row.get("decode_tok_s")}
    lines = [f"{'system':22} {'context':>8} {'prefill/s':>10} {'TTFT s':>8} {'decode/s':>9} {'x target':>9} "
             f"{'accept':>7} {'same':>5} {'peak GB':>8}"]
    for row in rows:
        if "prompt_tokens" not in row or "skipped" in row or "error" in row:
            why = row.get("skipped") or "failed (see above)"
            lines.append(f"{row['system']:22} {row.get('prompt_tokens', ''):>8} {why}")
            continue
        decode = row.get("projected_decode_tok_s") or row["decode_tok_s"] or 0.0
        ratio = decode / alone[row["prompt_tokens"]] if row["prompt_tokens"] in alone else float("nan")
        mark = "*" if "projected_decode_tok_s" in row else " "
        accept = f"{row['acceptance']:.2f}" if row.get("acceptance") is not None else ""
        peak = row.get("peak_memory_gb") or row["process_peak_rss_gb"]
        lines.append(f"{row['system']:22} {row['prompt_tokens']:>8} {row['prefill_tok_s']:>10.1f} {row['ttft_s']:>8.2f} "
                     f"{decode:>8.2f}{mark} {ratio:>9.2f} {accept:>7} {row.get('shared_prefix_tokens', ''):>5} {peak:>8.2f}")
    if any("projected_decode_tok_s" in row for row in rows):
        lines.append("* projected from the measured round time at the declared acceptance (synthetic weights)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
