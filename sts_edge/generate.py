"""Command line: generate one answer, streamed, with or without a draft model.

    python -m sts_edge.generate --model DIR --draft DIR --prompt "Explain rotary embeddings."
"""

from __future__ import annotations

import argparse
import sys

from sts_edge.backend import BACKENDS
from sts_edge.cli import add_policy_arguments, calibration_from_args, policy_from_args
from sts_edge.errors import StsEdgeError
from sts_edge.speculative import GenerationStats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sts_edge.generate",
        description="Generate text from a local model directory (Hugging Face layout: config.json, "
        "*.safetensors, tokenizer.json). With --draft, decoding is speculative: the draft proposes "
        "--gamma tokens per round and the target verifies them in one pass; the output follows the "
        "target's own distribution (exactly its greedy output at --temp 0).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="target model directory")
    parser.add_argument("--draft", help="draft model directory (same tokenizer as the target)")
    parser.add_argument("--prompt", help="prompt text; read from stdin when omitted")
    parser.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    parser.add_argument("--system", help="system message (chat template only)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 disables")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens proposed per speculative round")
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="compute backend")
    parser.add_argument("--max-seq-len", type=int, default=None, help="KV cache size in tokens (default: the model's context, at most 8192)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="weight and cache dtype (default: bfloat16 on GPUs, float32 on CPUs)")
    add_policy_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompt_text = args.prompt if args.prompt is not None else sys.stdin.read()
    from sts_edge.api import load

    if args.policy == "sts" and not args.draft:
        args.policy = "dense"  # sts needs a draft; without one, plain decoding
    try:
        engine = load(args.model, args.draft, backend=args.backend, max_seq_len=args.max_seq_len, dtype=args.dtype,
                      policy=policy_from_args(args), calibration=calibration_from_args(args))
        if args.raw or not engine.tokenizer.chat_template:
            prompt = prompt_text
        else:
            prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": prompt_text}
            ]
        stats = GenerationStats()
        for piece in engine.stream(
            prompt,
            max_tokens=args.max_tokens,
            temperature=args.temp,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            gamma=args.gamma,
            stats=stats,
        ):
            print(piece, end="", flush=True)
    except (StsEdgeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    print()
    print(f"[{engine.backend}] {stats.summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
