"""Calibrate a draft/target pair: which draft layer and head best predict each target layer and head.

    python -m sts_edge.calibrate --model TARGET --draft DRAFT

Writes the maps where `sts_edge.load` finds them (keyed by both models' identities); see
sts_edge.calibration for the method.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sts_edge.api import load
from sts_edge.calibration import calibrate, default_path, default_text, save
from sts_edge.cli import HelpFormatter
from sts_edge.errors import StsEdgeError
from sts_edge.mask import GRANULARITIES
from sts_edge.models import resolve_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sts_edge.calibrate",
        description="Measure which draft layer/head best predicts each target layer/head's attention, and save "
        "the maps where sts_edge.load finds them (keyed by both models' identities).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True, help="target model directory")
    parser.add_argument("--draft", required=True, help="draft model directory")
    parser.add_argument("--text", help="calibration text file (default: the shipped prose + code sample)")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens to use at most")
    parser.add_argument("--top-k", type=int, default=64, help="size of the token sets compared by Jaccard overlap")
    parser.add_argument("--probes", type=int, default=8, help="points in the text where sets are compared")
    parser.add_argument("--layer-map", choices=["proportional", "calibrated"], default="proportional",
                        help="keep f(t) = floor(t * L_d / L_t), or fit the best monotone layer map")
    parser.add_argument("--out", help="output JSON (default: the per-pair file in the sts-edge cache)")
    parser.add_argument("--backend", default="auto", help="compute backend")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Aliases and hub ids name directories: the saved file records (and is keyed by) those.
        args.model, args.draft = resolve_model(args.model), resolve_model(args.draft)
        engine = load(args.model, args.draft, backend=args.backend, max_seq_len=args.tokens + 16, calibration=None)
        text = Path(args.text).read_text(encoding="utf-8", errors="replace") if args.text else default_text()
        tokens = engine.tokenizer.encode(text)[: args.tokens]
        maps = calibrate(engine.target, engine.draft, tokens, top_k=args.top_k, probes=args.probes,
                         calibrate_layers=args.layer_map == "calibrated", progress=True)
        out = Path(args.out) if args.out else default_path(args.model, args.draft)
        save(out, maps, args.model, args.draft, engine.target.config, engine.draft.config,
             tokens=len(tokens), top_k=args.top_k, probes=args.probes, layer_map_source=args.layer_map)
    except (StsEdgeError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    for granularity in GRANULARITIES:
        print(f"  {granularity} heads: mean best Jaccard {maps['jaccard'][granularity]:.3f}, layer map {maps['layer_map'][granularity]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
