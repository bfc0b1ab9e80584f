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

from sts_edge.cli import (
    STS_TRADE,
    HelpFormatter,
    add_model_arguments,
    add_policy_arguments,
    add_sampling_arguments,
    load_from_args,
    sampling_from_args,
)
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
        description="Chat with a local model. With --draft, decoding is speculative: the draft proposes --gamma "
        "tokens per round and the target verifies them in one pass. " + STS_TRADE,
        formatter_class=HelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--list-models", action="store_true", help="show the model aliases and exit")
    parser.add_argument("--system", help="system message")
    add_sampling_arguments(parser, max_tokens=1024)
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


def stats_line(stats: GenerationStats) -> str:
    return f"[{stats.summary()}]"


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
                note(stats_line(last) if last else "[no answer yet]")
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
        note(stats_line(stats))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_models:
        print(list_models())
        return 0
    def note(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        engine = load_from_args(args)
        options = sampling_from_args(args)
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
