"""Command line: generate one answer, streamed, with or without a draft model.

    python -m sts_edge.generate --model DIR --draft DIR --prompt "Explain rotary embeddings."
"""

from __future__ import annotations

import argparse
import sys

from sts_edge.cli import (
    STS_TRADE,
    HelpFormatter,
    add_model_arguments,
    add_policy_arguments,
    add_sampling_arguments,
    load_from_args,
    sampling_from_args,
)
from sts_edge.errors import StsEdgeError
from sts_edge.speculative import GenerationStats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sts_edge.generate",
        description="Generate text from a local model directory (Hugging Face layout: config.json, "
        "*.safetensors, tokenizer.json). With --draft, decoding is speculative: the draft proposes "
        "--gamma tokens per round and the target verifies them in one pass. " + STS_TRADE,
        formatter_class=HelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--prompt", help="prompt text; read from stdin when omitted")
    parser.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    parser.add_argument("--system", help="system message (chat template only)")
    add_sampling_arguments(parser, max_tokens=256)
    add_policy_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompt_text = args.prompt if args.prompt is not None else sys.stdin.read()

    try:
        engine = load_from_args(args)
        if args.raw or not engine.tokenizer.chat_template:
            prompt = prompt_text
        else:
            prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": prompt_text}
            ]
        stats = GenerationStats()
        for piece in engine.stream(prompt, stats=stats, **sampling_from_args(args)):
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
