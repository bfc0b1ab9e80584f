"""Command-line options shared by the entry points (generate, chat, server, scripts)."""

from __future__ import annotations

import argparse

from sts_edge.backend import BACKENDS
from sts_edge.mask import AGGREGATIONS, GRANULARITIES, POLICIES, MaskPolicy


def parse_budget(text: str) -> float:
    """'512' -> 512 tokens; '0.1' or '10%' -> a tenth of the context."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a token count (512) or a fraction (0.1 or 10%), got {text!r}")


def parse_layers(text: str) -> tuple[int, ...]:
    """'0,1,2' or '0-2' -> (0, 1, 2)."""
    layers: list[int] = []
    try:
        for part in filter(None, text.split(",")):
            low, _, high = part.partition("-")
            layers += range(int(low), int(high or low) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"dense layers are a list like 0,1 or a range like 0-2, got {text!r}")
    return tuple(layers)


def add_policy_arguments(parser: argparse.ArgumentParser, default_policy: str = "sts") -> None:
    group = parser.add_argument_group(
        "sparse verification",
        "Which context tokens the target reads while verifying the draft's tokens. Each set is sink + window + the "
        "budget's best tokens by the policy's score; contexts that fit the whole set run dense.",
    )
    group.add_argument("--policy", choices=POLICIES, default=default_policy,
                       help="sts: the draft's attention picks the tokens; oracle: the target's own top tokens (an upper "
                       "bound, not faster); streaming: sink + recent tokens; quest: 16-token pages by key bounds; dense")
    group.add_argument("--budget", type=parse_budget, default=512, help="scored tokens per set: a count, or a fraction like 0.1 or 10%%")
    group.add_argument("--sink", type=int, default=4, help="first tokens always read")
    group.add_argument("--window", type=int, default=64, help="most recent tokens always read")
    group.add_argument("--dense-layers", type=parse_layers, default=(), help="target layers that always read everything, e.g. 0,1 or 0-2")
    group.add_argument("--granularity", choices=GRANULARITIES, default="kv", help="one set per KV head (shared by its query heads) or per query head")
    group.add_argument("--aggregation", choices=AGGREGATIONS, default="max", help="how the draft's scores combine over its queries and heads")
    group.add_argument("--calibration", default="auto",
                       help="calibration file from python -m sts_edge.calibrate; 'auto' finds the pair's own, 'none' ignores it")


def policy_from_args(args: argparse.Namespace) -> MaskPolicy:
    return MaskPolicy(args.policy, budget=args.budget, sink=args.sink, window=args.window,
                      dense_layers=args.dense_layers, aggregation=args.aggregation, granularity=args.granularity)


def calibration_from_args(args: argparse.Namespace) -> str | None:
    return None if args.calibration == "none" else args.calibration


def add_model_arguments(parser: argparse.ArgumentParser, model_help: str, model_required: bool = True) -> None:
    """Which models, on which backend, in which dtype, with how large a cache."""
    parser.add_argument("--model", required=model_required, help=model_help)
    parser.add_argument("--draft", help="draft model, same forms as --model; must share the target's tokenizer")
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="compute backend")
    parser.add_argument("--max-seq-len", type=int, default=None, help="KV cache size in tokens (default: the model's context, at most 8192)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="weight and cache dtype (default: bfloat16 on GPUs, float32 on CPUs)")
    parser.add_argument("--quantized", action="store_true", help="prefer an alias's 4-bit variant")
    parser.add_argument("--offline", action="store_true", help="use only models already downloaded (as HF_HUB_OFFLINE=1)")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens per answer at most")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 disables")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens proposed per speculative round")


def sampling_from_args(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, gamma=args.gamma)


def load_from_args(args: argparse.Namespace):
    """The Engine the model, backend and policy arguments describe (sts needs a draft: else dense)."""
    from sts_edge.api import load

    if args.policy == "sts" and not args.draft:
        args.policy = "dense"
    return load(args.model, args.draft, backend=args.backend, max_seq_len=args.max_seq_len, dtype=args.dtype,
                policy=policy_from_args(args), calibration=calibration_from_args(args),
                quantized=args.quantized, offline=args.offline or None)
